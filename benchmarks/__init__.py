"""Speed and memory benchmarks of the package's models against timm peers: ``python -m benchmarks.run``."""
