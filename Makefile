# Two commands set up a fresh machine: `make demo` and `make test`.
# Nothing here pulls an unpinned torch: with no torch installed it takes the
# CPU build torch==$(TORCH_VERSION); with a torch installed (e.g. a GPU
# machine, offline) it uses that one and installs only what is missing.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
export MAX_JOBS ?= 2

.PHONY: env install test demo bench info check-cuda check-cuda-build compile-proof test-triton36 gpu-check clean

env:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@missing="$$($(PYTHON) tools/missing_packages.py numpy triton pytest hypothesis pytest_benchmark PIL ninja matplotlib transformers safetensors)"; \
	if [ -n "$$missing" ]; then echo "installing: $$missing"; $(PYTHON) -m pip install -q $$missing; fi

install: env
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

# The CUDA compile check runs where nvcc exists; the benchmark smoke runs
# every benchmark once (--benchmark-disable); the test suite runs last.
test: install
	@if command -v nvcc >/dev/null 2>&1 || [ -n "$$CUDA_HOME" ]; then $(PYTHON) tools/check_cuda.py; \
	else echo "check-cuda: no nvcc here, CUDA sources not compiled"; fi
	$(PYTHON) -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m setok_model.cli tokenize --out setok-out

bench: install
	@mkdir -p bench-out
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-json=bench-out/bench.json $(PYTEST_ARGS)
	$(PYTHON) benchmarks/report.py bench-out/bench.json --out bench-out

info: install
	$(PYTHON) -m setok_kernels.info

# Compiles every CUDA source for sm_80 and sm_90 and links it against cudart
# (no GPU): catches CUDA compile errors on a machine whose torch is CPU-only.
check-cuda: env
	$(PYTHON) tools/check_cuda.py

# pip install -e . with a CUDA torch (cached venv), CUDA_HOME unset and nvcc on
# PATH; the library must load with its CUDA part (tools/cuda_build_check.sh; no GPU).
check-cuda-build:
	PYTHON=$(PYTHON) tools/cuda_build_check.sh

# Compiles every Triton launch configuration the dispatcher can make on
# $(COMPILE_ARCHS) (its per-architecture tables) with the installed triton, no GPU;
# fails on a compile error, a register spill or shared memory over the limit
# (docs/GPU.md). Results are cached ($SETOK_COMPILE_PROOF_CACHE): a cold run costs
# ~3-5 minutes per arch on 2 cores, a warm one ~45 s (recording); a rerun compiles only what changed.
COMPILE_ARCHS ?= sm_80 sm_90
compile-proof: env
	$(PYTHON) -m setok_kernels.info --compile $(COMPILE_ARCHS)

# The Triton tests (-k triton: their modules, marks and backend ids) and the
# compile proof (the same targets) under triton 3.6.0, the GPU machine's, in a
# cached venv with the CPU torch (tools/triton36_env.sh).
test-triton36: env
	@venv="$$(PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) tools/triton36_env.sh)" && \
	echo "triton 3.6 venv: $$venv" && \
	PYTHONPATH="$(CURDIR)" "$$venv/bin/python" -m pytest tests -k triton -q -p no:cacheprovider $(PYTEST_ARGS) && \
	PYTHONPATH="$(CURDIR)" "$$venv/bin/python" -m setok_kernels.info --compile $(COMPILE_ARCHS)

# On a GPU machine (offline): build, CUDA tests, sanitizers, CUDA graph,
# benchmarks at the real shapes; one report in $(OUT)/report.md. Without a
# GPU: the parts that need none (CI runs this).
OUT ?= gpu-check-out
gpu-check: env
	$(PYTHON) tools/gpu_check.py $(OUT)

clean:
	rm -rf build dist *.egg-info setok_kernels/_C*.so setok_kernels/_build.json bench-out setok-out gpu-check-out
