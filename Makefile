# cellkit: `make demo` runs the main job on the built-in synthetic dataset, `make test` the suite.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test install notebooks-clean screenshots benchmarks clean help

help:
	@echo "make demo   - create $(VENV), install cellkit, run the demo job on synthetic data (CPU, < 10 min)"
	@echo "make test   - create $(VENV) if missing, run the whole test suite"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cellkit demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

notebooks-clean: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

screenshots: $(STAMP)
	$(PY) docs/make_figures.py

benchmarks: $(STAMP)
	$(PY) benchmarks/data_memory.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/eval_speed.py
	$(PY) benchmarks/paste_memory.py

clean:
	rm -rf runs .pytest_cache
