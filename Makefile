# Everything runs in a virtual environment, created by `make install` where only `python3` exists.
VENV ?= .venv
PYTHON = $(VENV)/bin/python
PIP = $(PYTHON) -m pip
BASE_PYTHON ?= python3

TORCH_VERSION = 2.13.0
TORCHREC_VERSION = 1.8.0
FBGEMM_VERSION = 1.8.0
# litdata's own requirements pull torchvision, which does not load beside torch 2.13: its runtime
# requirements are in pyproject.toml
LITDATA_VERSION = 0.2.76
# CUDA wheels index for `make install-cuda`, e.g. CUDA_INDEX=https://download.pytorch.org/whl/cu128
CUDA_INDEX ?= https://download.pytorch.org/whl/cu128

.PHONY: install install-cuda venv test test-fast lint docs train

## venv: the virtual environment in $(VENV) (Debian: `apt-get install python3-venv` first)
venv:
	test -x $(PYTHON) || $(BASE_PYTHON) -m venv $(VENV)

## install: CPU machine. torch, fbgemm-gpu-cpu, torchrec and litdata (no-deps), then the package with dev tools
install: venv
	$(PIP) install torch==$(TORCH_VERSION) fbgemm-gpu-cpu==$(FBGEMM_VERSION)
	$(PIP) install --no-deps torchrec==$(TORCHREC_VERSION) litdata==$(LITDATA_VERSION)
	$(PIP) install -e ".[dev]"

## install-cuda: CUDA machine. CUDA torch and fbgemm-gpu from the PyTorch index
install-cuda: venv
	$(PIP) install torch==$(TORCH_VERSION) fbgemm-gpu==$(FBGEMM_VERSION) --index-url $(CUDA_INDEX)
	$(PIP) install --no-deps torchrec==$(TORCHREC_VERSION) litdata==$(LITDATA_VERSION)
	$(PIP) install -e ".[dev]"

## test: the whole suite, slow tests included
test:
	$(PYTHON) -m pytest

## test-fast: skip the tests marked slow
test-fast:
	$(PYTHON) -m pytest -m "not slow"

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

## docs: the performance page from benchmarks/results, then the MkDocs site into site/ (strict)
docs:
	$(PYTHON) benchmarks/report.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

train:
	$(PYTHON) train.py
