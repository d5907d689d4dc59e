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

.PHONY: install test lint demo benchmark clean test-slicer-oldest

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

test: install lint test-slicer-oldest
	$(VENV)/bin/pytest -q

# --- Slicer panel: its MRML tests also against the oldest slicer-core on PyPI --------------------
# The test extra installs the newest slicer-core; the panel must only use what 5.10-era MRML has, so
# the MRML-facing Slicer tests run a second time with the oldest release (and the vtk it pins) first on
# the path. The folder is outside the venv, so the main run is unaffected.
SLICER_CORE_OLDEST ?= 5.11.0.2
SLICER_CORE_OLDEST_VTK ?= 9.6.0
SLICER_CORE_OLDEST_DIR := .slicer-core-oldest
SLICER_OLDEST_TESTS := Testing/Python/test_slicer_logic.py Testing/Python/test_slicer_session.py

$(SLICER_CORE_OLDEST_DIR)/.installed: Makefile
	rm -rf $(SLICER_CORE_OLDEST_DIR)
	$(PIP) install --quiet --no-deps --target $(SLICER_CORE_OLDEST_DIR) \
		slicer-core==$(SLICER_CORE_OLDEST) vtk==$(SLICER_CORE_OLDEST_VTK)
	touch $@

test-slicer-oldest: install $(SLICER_CORE_OLDEST_DIR)/.installed
	PYTHONPATH=$(SLICER_CORE_OLDEST_DIR) $(PY) -c "import importlib.metadata as m, os, slicer; \
		v = m.version('slicer-core'); assert v == '$(SLICER_CORE_OLDEST)', v; \
		assert os.path.abspath(slicer.__file__).startswith('$(abspath $(SLICER_CORE_OLDEST_DIR))'), slicer.__file__; \
		print('slicer-core', v, 'from', os.path.dirname(slicer.__file__))"
	PYTHONPATH=$(SLICER_CORE_OLDEST_DIR) $(VENV)/bin/pytest -q $(SLICER_OLDEST_TESTS)

demo: install
	$(VENV)/bin/medsam2 demo --output demo-output $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT) --model $(MODEL)) $(DEMO_ARGS)

benchmark: install
	$(PY) benchmarks/bench_propagation.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache $(SLICER_CORE_OLDEST_DIR)
