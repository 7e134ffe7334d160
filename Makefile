# Quick start:  make bench   (set-up + the quick benchmark suite)
#               make test    (set-up + the whole test suite)
#               make gpu-check  (set-up + GPU tests, compute-sanitizer, GPU benchmark; report in $OUT)
# Each target creates .venv if missing, installs the pinned requirements and builds flashdml._C.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: bench test gpu-check build setup clean

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.requirements $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

setup: $(VENV)/.requirements
build: $(VENV)/.built

bench: $(VENV)/.built
	$(PY) -m benchmarks --quick

test: $(VENV)/.built
	$(PY) -m pytest -q tests

# Everything that needs a GPU, in under 8 minutes after the build; says so and exits 0 when there is none.
gpu-check: $(VENV)/.built
	PY=$(PY) bash tools/gpu_check.sh

clean:
	rm -rf build $(VENV) python/flashdml/_C*.so *.egg-info python/*.egg-info
