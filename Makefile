# Two commands do everything on a fresh machine (see README):
#   make bench   - set up .venv, run the benchmark suite (the main job); results go to the untracked
#                  benchmarks/results/local/, `make bench UPDATE=1` replaces the committed ones
#   make test    - set up .venv, run the test suite (about 22 min on a quiet 2-core machine)
#   make test-fast - the suite without the GPU compile reports, extension builds and multi-process
#                  runs (pytest -m "not slow and not compile")
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
UPDATE ?= 0
# speechbrain's dependencies that its HyperMixing and Conformer encoder import (not torchaudio,
# sentencepiece, soundfile, huggingface_hub, requests: the tests and benchmarks stub or never reach them)
SPEECHBRAIN_DEPS ?= tqdm hyperpyyaml joblib packaging scipy

.PHONY: test test-fast bench setup clean

setup: $(STAMP)

# speechbrain is installed without its dependencies for the equivalence tests: its HyperMixing needs
# only torch, and its audio dependencies (torchaudio) have no release for the CPU torch used here.
# It is installed last, after the dependencies it needs: pip checks the requirements of every
# installed package that an installation touches, and would print an `ERROR:` line listing
# speechbrain's unmet ones (torchaudio, ...) on any later install. A re-run of the set-up removes
# it first for the same reason.
$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip uninstall -q -y speechbrain 2>/dev/null || true
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]" $(SPEECHBRAIN_DEPS)
	$(PY) -m pip install -q --no-deps "$(SPEECHBRAIN_SPEC)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q $(TEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow and not compile" $(TEST_ARGS)

bench: $(STAMP)
	HMX_BENCH_UPDATE=$(UPDATE) $(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
