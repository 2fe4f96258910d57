# `make run`: set up .venv and run the main job: disaggregated prefill -> decode serving of a
# small model (router, prefill and decode processes), every token checked.
# `make test`: set up .venv and run the test suite.
# torch==2.13.0 goes in before anything else: a later package asking for plain `torch`
# would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvxfer-installed

.PHONY: setup run run-transfer test bench bench-micro bench-micro-baseline clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/disagg_serving.py --requests 4 --new-tokens 16

run-transfer: $(STAMP)
	$(PY) examples/transfer_two_process.py --model llama-3.1-8b --tokens 4096

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/bench_transfer.py

# Microbenchmarks (pytest-benchmark), outside `make test`: compared with the saved
# baseline (benchmarks/micro/.baseline); a median 25% slower than it fails.
MICRO := $(PY) -m pytest benchmarks/micro -q -p no:cacheprovider \
	--benchmark-storage=file://benchmarks/micro/.baseline --benchmark-columns=median,iqr,ops

bench-micro: $(STAMP)
	$(MICRO) --benchmark-compare --benchmark-compare-fail=median:25%

bench-micro-baseline: $(STAMP)
	$(MICRO) --benchmark-save=baseline

clean:
	rm -rf $(VENV) build *.egg-info
