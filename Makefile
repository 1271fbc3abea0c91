# Two entry points, each doing its own set-up on a fresh clone:
#   make demo   - the main job on the embedded default (synthetic COCO): train, evaluate, draw
#   make test   - the full test suite (what CI runs through .ci/run)
#   make gpu-check - on a GPU machine: the CUDA tests, the paper detectors and the benchmark on the device
VENV ?= .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test bench gpu-check

$(STAMP): scripts/setup_env.sh setup.cfg pyproject.toml
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) bash detection/demo.sh

# one pytest worker per core, at most 4 (each builds its own detectors and synthetic dataset); tests/conftest.py
# shares the cores out between them; a worker that runs out of tests takes some of the other's (worksteal)
TEST_WORKERS ?= auto

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run

# the first run on a GPU machine (set up with CUDA=1): CUDA tests, the six detectors, the quick benchmark
gpu-check: $(STAMP)
	$(VENV)/bin/python scripts/gpu_check.py
