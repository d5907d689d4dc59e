# Quick start: `make test` (fresh machine: venv, install, whole suite) and `make demo`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and on its own so that pip does not pull a second, CUDA-sized torch
# while building sam2. Override on machines where this exact build is not available, e.g.
#   make test TORCH_SPEC="torch>=2.5.1 torchvision>=0.20.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# sam2's CUDA extension (hole filling) needs nvcc; without a toolkit it is skipped and sam2 warns.
SAM2_BUILD_CUDA ?= 0
# `make demo CHECKPOINT=file.pt`: the catalogue entry whose config, input size (MedSAM2: 512 px) and
# intensity recipe apply to that file; a bare state dict does not say which.
MODEL ?= medsam2-latest

.PHONY: install test lint demo benchmark clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet $(TORCH_SPEC)
	SAM2_BUILD_CUDA=$(SAM2_BUILD_CUDA) $(PIP) install --quiet --no-build-isolation "sam2>=1.1.0,<2"
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check MedSAM2Slicer Testing benchmarks
	$(VENV)/bin/mypy

test: install lint
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/medsam2 demo --output demo-output $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT) --model $(MODEL)) $(DEMO_ARGS)

benchmark: install
	$(PY) benchmarks/bench_propagation.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
