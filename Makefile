PYTHON ?= python
PIP = $(PYTHON) -m pip

TORCH_VERSION = 2.13.0
TORCHREC_VERSION = 1.8.0
FBGEMM_VERSION = 1.8.0
# CUDA wheels index for `make install-cuda`, e.g. CUDA_INDEX=https://download.pytorch.org/whl/cu128
CUDA_INDEX ?= https://download.pytorch.org/whl/cu128

.PHONY: install install-cuda test test-fast lint train

## install: CPU machine. torch, fbgemm-gpu-cpu, torchrec (no-deps), then the package with dev tools
install:
	$(PIP) install torch==$(TORCH_VERSION) fbgemm-gpu-cpu==$(FBGEMM_VERSION)
	$(PIP) install --no-deps torchrec==$(TORCHREC_VERSION)
	$(PIP) install -e ".[dev]"

## install-cuda: CUDA machine. CUDA torch and fbgemm-gpu from the PyTorch index
install-cuda:
	$(PIP) install torch==$(TORCH_VERSION) fbgemm-gpu==$(FBGEMM_VERSION) --index-url $(CUDA_INDEX)
	$(PIP) install --no-deps torchrec==$(TORCHREC_VERSION)
	$(PIP) install -e ".[dev]"

## test: the whole suite, slow tests included
test:
	$(PYTHON) -m pytest

## test-fast: skip the tests marked slow
test-fast:
	$(PYTHON) -m pytest -m "not slow"

lint:
	ruff check . && ruff format --check .

train:
	$(PYTHON) train.py
