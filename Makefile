# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Without an active virtual environment they make .venv; where no torch is present they install
# torch==2.13.0 (the CPU wheel here; never an unpinned torch, which pulls gigabytes of CUDA packages).
# DEPS go in after torch: transformers, accelerate, lightning and peft (for tests/test_hf.py,
# tests/test_integrations.py and tests/test_peft.py) require torch, which is then already there, so pip leaves it alone.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PYTHON := python
else
PYTHON := .venv/bin/python
endif
DEPS := numpy pytest tqdm scikit-learn matplotlib ninja setuptools wheel transformers accelerate lightning peft

.PHONY: setup build test bench bench-families bench-quick peers demo clean gpu-check fuzz

.venv/bin/python:
	python3 -m venv .venv

setup: $(if $(VIRTUAL_ENV),,.venv/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@$(PYTHON) -c "import numpy, pytest, tqdm, sklearn, matplotlib, ninja, transformers, accelerate, lightning, peft" 2>/dev/null || $(PYTHON) -m pip install $(DEPS)

build: setup
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PYTHON) -m pytest -q tests

# Random architectures against the float64 oracle (tests/fuzz.py): FUZZ_START and FUZZ_COUNT pick the seeds; the exit
# status is the number of failing seeds (limitations the README lists as known are reported apart, not counted).
FUZZ_START ?= 0
FUZZ_COUNT ?= 500
fuzz: build
	$(PYTHON) tests/fuzz.py --start $(FUZZ_START) --count $(FUZZ_COUNT)

demo: build
	$(PYTHON) -m mas_ext.demo

clean:
	rm -rf build *.egg-info mas_ext/*.so

# The peers the benchmark compares against, from PyPI, without letting pip touch torch: every package
# goes in with --no-deps and its own requirements are listed explicitly (opacus: numpy, scipy, opt_einsum;
# BackPACK: einops, unfoldNd; BackPACK also asks for torchvision, which would pull a CUDA torch, and
# does not need it for BatchGrad). The last line fails if torch is no longer the pinned one.
PEERS := opacus==1.6.0 opt_einsum==3.4.0 backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3
peers: setup
	@$(PYTHON) -c "import opacus, opt_einsum, backpack, einops, unfoldNd" 2>/dev/null || $(PYTHON) -m pip install --no-deps $(PEERS)
	@$(PYTHON) -c "import scipy" 2>/dev/null || $(PYTHON) -m pip install --no-deps scipy
	@$(PYTHON) -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.13.0', 'torch was replaced: ' + torch.__version__; print('peers ready; torch', torch.__version__, 'unchanged')"

# Full run: CPU, plus CUDA where present (--device auto); results in benchmarks/results/.
bench: build peers
	$(PYTHON) -m benchmarks.bench --device auto

# FusedMAS / plain on the Hugging Face families with outputs all samples share (T5, BART, MPNet, Swin, DeBERTa-v3),
# layers run several times (ALBERT) or parameters beside layers (ConvNeXt, BEiT, CLIP, wav2vec2).
bench-families: build
	$(PYTHON) -m benchmarks.families_bench

# Tiny sizes, 1 repeat, results in a temp folder (what tests/test_bench_smoke.py runs).
bench-quick: build peers
	$(PYTHON) -m benchmarks.bench --quick --device auto

# Everything that needs a GPU, one command on a CUDA machine (python3 there, or the active venv; never the CPU
# .venv made above): peers from .whl/ when present, the CUDA build (TORCH_CUDA_ARCH_LIST=9.0), pytest -m cuda,
# compute-sanitizer memcheck + racecheck on `-k small`, the CUDA benchmark; the raw log and results go to
# benchmarks/results/ and to $$OUT when set. GPU_CHECK_STEPS=build,test runs a subset (see .ci/gpu-check).
gpu-check:
	bash .ci/gpu-check
