# Two commands do everything on a fresh machine (see README):
#   make bench   - set up .venv, run the benchmark suite (the main job)
#   make test    - set up .venv, run the test suite
# Set-up: a virtual environment with the CPU build of torch pinned for development (a range in
# setup.py for users), the package in editable mode, and the test/benchmark extras (the test extra
# brings triton, which a plain `pip install .` leaves out, for the Triton interpreter tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hmx-installed
TORCH_SPEC ?= torch==2.13.0
SPEECHBRAIN_SPEC ?= speechbrain==1.1.2
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: test bench setup clean

setup: $(STAMP)

# speechbrain is installed without its dependencies for the equivalence tests: its HyperMixing needs
# only torch, and its audio dependencies (torchaudio) have no release for the CPU torch used here.
$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps "$(SPEECHBRAIN_SPEC)"
	$(PY) -m pip install -q tqdm hyperpyyaml joblib packaging scipy
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q $(TEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
