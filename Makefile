# Two commands do everything on a fresh machine: `make train` and `make test`.
# Each (re)creates .venv from the locks + pyproject.toml when missing or stale: the CPU runtime
# lock (requirements.txt), the test/lint lock (requirements-dev.txt), then the project itself
# with --no-deps, so nothing unpinned enters.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# pytest processes for the unit tier (TEST_FAST_WORKERS=1: one, e.g. to debug with pdb).
TEST_FAST_WORKERS ?= 2
# pytest processes for the slow tier, one half of it each (TEST_SLOW_WORKERS=1: the halves
# one after another). Two on a 2-core box: the cluster rehearsals wait a lot (drain
# deadlines, autoscaler launches, a storage outage) and the other process fills that time; a
# third only made every Ray process poll longer (2026-12-07: 16 min 41 s on two, 19 min 41 s on
# three, 19 min on one).
TEST_SLOW_WORKERS ?= 2

.PHONY: train test test-fast lint bench gpu-check clean-venv system-tools bytecode

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The editable install leaves hrt_ray as source. Where PYTHONDONTWRITEBYTECODE is set (this
# box, CI), every process that imports it (each Ray worker and actor of every run) would compile
# it again; compileall writes the bytecode once and rewrites only what changed (0.05 s then).
bytecode: $(STAMP)
	$(VENV)/bin/python -m compileall -q hrt_ray tests

train: $(STAMP) bytecode
	$(VENV)/bin/hrt-ray train

lint: $(STAMP)
	$(VENV)/bin/ruff check hrt_ray tests jobs benchmarks

# System programs the slow tier runs as a cluster node would: rsync (the launcher's file sync).
# Installed with apt when missing and we may (root on a fresh CI box); otherwise named.
system-tools:
	@command -v rsync >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq rsync >/dev/null); } \
	  || { echo "make test needs rsync (e.g. apt-get install rsync)" >&2; exit 1; }

# Everything (what CI runs): the unit tier as test-fast runs it, then the slow tier (real Ray
# clusters and an S3-compatible server on loopback) as two halves, one per process: the modules
# that start their own clusters, and those on the session's Ray instance and S3 server
# (OWN_CLUSTER_MODULES in tests/conftest.py), the longest first; its 15 slowest tests printed.
test: lint system-tools bytecode
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest tests -m "not slow" -n $(TEST_FAST_WORKERS) -q
	$(VENV)/bin/python -m pytest tests -m slow -n $(TEST_SLOW_WORKERS) --slow-halves --durations=15

# The unit tier for the inner loop: no Ray instance, no S3 server (tests/conftest.py marks those slow).
# Two pytest processes, one torch thread each: these tests run many tiny ops, where a second
# thread per op buys nothing and two processes halve the wall time on a 2-core box.
test-fast: lint bytecode
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest tests -m "not slow" -n $(TEST_FAST_WORKERS) --durations=10

bench: $(STAMP)
	$(VENV)/bin/hrt-ray bench model

# One CUDA GPU, <= 8 min: bf16 MFU, compile, a 1-GPU job, predict/export (benchmarks/README.md).
gpu-check: $(STAMP)
	$(VENV)/bin/hrt-ray bench gpu $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
