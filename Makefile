# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Without an active virtual environment they make .venv; where no torch is present they install
# torch==2.13.0 (the CPU wheel here; never an unpinned torch, which pulls gigabytes of CUDA packages).
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PYTHON := python
else
PYTHON := .venv/bin/python
endif
DEPS := numpy pytest tqdm scikit-learn matplotlib ninja setuptools wheel

.PHONY: setup build test bench bench-quick demo clean

.venv/bin/python:
	python3 -m venv .venv

setup: $(if $(VIRTUAL_ENV),,.venv/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@$(PYTHON) -c "import numpy, pytest, tqdm, sklearn, matplotlib, ninja" 2>/dev/null || $(PYTHON) -m pip install $(DEPS)

build: setup
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PYTHON) -m pytest -q tests

demo: build
	$(PYTHON) -m mas_ext.demo

clean:
	rm -rf build *.egg-info mas_ext/*.so
