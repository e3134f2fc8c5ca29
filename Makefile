# Every target sets itself up on a fresh machine: a project-local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on the CI machines' disk; override for another build, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The MRML glue runs against real MRML from slicer-core (it pins vtk), kept in its own environment
# without torch; in the main environment those tests skip.
SLICER_VENV := .venv-slicer
SLICER_PY := $(SLICER_VENV)/bin/python
SLICER_STAMP := $(SLICER_VENV)/.installed

.PHONY: venv test test-slicer-core demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[server,test]"
	touch $(STAMP)

test: $(STAMP) $(SLICER_STAMP)
	$(PY) -m pytest -q Testing
	$(SLICER_PY) -m pytest -q --confcutdir Testing/slicer_core Testing/slicer_core

$(SLICER_STAMP): pyproject.toml
	test -x $(SLICER_PY) || $(PYTHON) -m venv $(SLICER_VENV)
	$(SLICER_PY) -m pip install -q "slicer-core>=5.10" SimpleITK numpy scipy pynrrd slicerio pytest pytest-timeout
	$(SLICER_PY) -m pip install -q --no-deps -e .
	touch $(SLICER_STAMP)

test-slicer-core: $(SLICER_STAMP)
	$(SLICER_PY) -m pytest -q --confcutdir Testing/slicer_core Testing/slicer_core

demo: $(STAMP)
	$(PY) -m dafne_logic.demo

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(SLICER_VENV) build *.egg-info demo-out
