# make demo : the main job (bundled tiny models, serial vs two CPU processes)
# make test : the test suite (what CI runs), including the transfer engine against a fake CUDA runtime
# Both set up .venv first (scripts/bootstrap.sh), so they work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench-cpu

setup:
	VENV=$(VENV) bash scripts/bootstrap.sh

test: setup
	HYBRIDIFF_RT_FAKE_CUDA_TESTS=1 $(PY) -m pytest -q

demo: setup
	$(VENV)/bin/hybridiff-rt demo

bench-cpu: setup
	$(PY) bench/cbp_cpu.py
	$(PY) bench/hybrid_cpu.py
