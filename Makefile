# The two commands:   make demo   and   make test   (both run `make setup` first).
#
# `make setup` creates .venv in the repository root and installs this project (editable) with its test extra.
# On a machine without an NVIDIA GPU it keeps the CPU build of torch 2.13.0 and pins every package through
# constraints-cpu.txt, so pip never downloads CUDA packages. With a GPU it installs torch from the index
# (or keeps the one already in .venv) and pins nothing. The second run is a no-op unless pyproject.toml,
# constraints-cpu.txt or this Makefile changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.setup-done
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

ifeq ($(HAS_GPU),1)
CONSTRAINTS :=
TORCH := torch
else
CONSTRAINTS := -c constraints-cpu.txt
TORCH := torch==2.13.0
endif

.PHONY: setup demo test clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(CONSTRAINTS) $(TORCH)
	$(PIP) install $(CONSTRAINTS) "setuptools>=64" ninja
	# deepspeed ships only as an sdist: build it against the installed torch (no isolated build env,
	# which would download another torch) and without compiling its CUDA ops.
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PIP) install $(CONSTRAINTS) --no-build-isolation deepspeed
	$(PIP) install $(CONSTRAINTS) --no-build-isolation -e ".[test]"
	$(PY) -c "import pipeline, open_clip, deepspeed, diffusers, webdataset, transformers, triton; print('setup ok: torch', __import__('torch').__version__)"
	# DeepSpeed JIT-builds a small C++ op at its first CPU start (~35 s, cached in ~/.cache/torch_extensions): build
	# it now, once, rather than inside the first training run or test, where a kill mid-build leaves a lock behind.
	$(PY) -c "import pipeline; from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

demo: setup
	$(PY) -m pipeline demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
