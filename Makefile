# Two commands set up a fresh machine: `make demo` and `make test`.
# Nothing here pulls an unpinned torch: with no torch installed it takes the
# CPU build torch==$(TORCH_VERSION); with a torch installed (e.g. a GPU
# machine, offline) it uses that one and installs only what is missing.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
export MAX_JOBS ?= 2

.PHONY: env install test test-fast demo bench info check-cuda clean

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

# Compiles every CUDA source for sm_90 to an object file (no link, no GPU):
# catches CUDA compile errors on a machine whose torch is CPU-only.
check-cuda: env
	$(PYTHON) tools/check_cuda.py

clean:
	rm -rf build dist *.egg-info setok_kernels/_C*.so bench-out setok-out
