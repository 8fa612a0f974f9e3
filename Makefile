# cellkit: `make demo` runs the main job on the built-in synthetic dataset, `make test` the suite.
# Both install the exact versions of requirements.lock (refresh it with `make lock`); pyproject.toml
# keeps version ranges for library users.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install lock notebooks-clean screenshots benchmarks clean help

help:
	@echo "make demo   - create $(VENV), install cellkit ($(LOCK)), run the demo job on synthetic data (CPU, < 10 min)"
	@echo "make test   - create $(VENV) if missing, run the whole test suite"
	@echo "make test-fast - the fast lane: pytest -m 'not slow' (no training, kernel or subprocess)"
	@echo "make lock   - re-resolve pyproject.toml's ranges in a fresh venv and write the exact versions to $(LOCK)"

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade "pip>=23.2"
	.lock-venv/bin/python -m pip install --quiet ".[dev]"
	( echo "# exact versions behind every figure in docs/ (make lock regenerates this file from pyproject.toml)"; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(pip==|cellkit( |==))' ) > $(LOCK)
	rm -rf .lock-venv build cellkit.egg-info

demo: $(STAMP)
	$(PY) -m cellkit demo --out runs/demo

# The suite on two pytest workers (pytest-xdist; a test file stays on one worker, so its module
# fixtures are built once) with one torch thread each: two workers of 2 threads on 2 cores fight
# over them (the suite took 25 % longer than on one worker). The few processes that still run 2
# threads wait for each other asleep, not spinning on a core the other worker needs. glibc malloc
# keeps the memory torch frees instead of handing it back and faulting it in again (8 % less CPU
# time on tests/test_trainer.py). Files are handed out longest first (tests/conftest.py,
# LONGEST_FIRST), not by their number of tests. Figures: docs/benchmarks.md, "The test suite".
TEST_ENV := OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
            MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
PYTEST   := $(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

notebooks-clean: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace cellkit/notebooks/*.ipynb

screenshots: $(STAMP)
	$(PY) docs/make_figures.py

benchmarks: $(STAMP)
	$(PY) benchmarks/data_memory.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/eval_speed.py
	$(PY) benchmarks/paste_memory.py
	$(PY) benchmarks/mask_roundtrip.py

clean:
	rm -rf runs .pytest_cache
