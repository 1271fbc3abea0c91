# Two entry points, each doing its own set-up on a fresh clone:
#   make demo   - the main job on the embedded default (synthetic COCO): train, evaluate, draw
#   make test   - the full test suite (what CI runs through .ci/run)
VENV ?= .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test bench

$(STAMP): scripts/setup_env.sh setup.cfg pyproject.toml
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) bash detection/demo.sh

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run
