# Two entry points do all set-up on a fresh machine:
#   make run   - runs the main job (AR-CoPO on the pocket default) into runs/pocket
#   make test  - checks the import layers (lint-imports), then runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m learner.main --output runs/pocket $(ARGS)

test: $(STAMP)
	$(VENV)/bin/lint-imports || { echo 'make test: lint-imports found an import that breaks the layers (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md)' >&2; exit 1; }
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all
