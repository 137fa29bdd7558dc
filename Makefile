# make demo : the main job (bundled tiny models, serial vs two CPU processes)
# make test : the test suite (what CI runs), including the transfer engine against a fake CUDA runtime
# make wheels : release wheels (+cu130, +cu12x, +cpu, manylinux) and the sdist into dist/
# make wheels-check : those wheels installed one by one in fresh venvs, checked outside the tree
# test and demo set up .venv first (scripts/bootstrap.sh), so they work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench-cpu wheels wheels-check

setup:
	VENV=$(VENV) bash scripts/bootstrap.sh

test: setup
	HYBRIDIFF_RT_FAKE_CUDA_TESTS=1 $(PY) -m pytest -q

demo: setup
	$(VENV)/bin/hybridiff-rt demo

bench-cpu: setup
	$(PY) bench/cbp_cpu.py
	$(PY) bench/hybrid_cpu.py

wheels:
	bash scripts/build_wheels.sh dist

wheels-check: wheels
	bash scripts/wheels_check.sh dist
