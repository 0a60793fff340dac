# Two commands do everything on a fresh machine: `make train` and `make test`.
# Each (re)creates .venv from requirements.txt + pyproject.toml when missing or stale.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test lint bench gpu-check clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/hrt-ray train

lint: $(STAMP)
	$(VENV)/bin/ruff check hrt_ray tests jobs benchmarks

test: lint
	$(VENV)/bin/python -m pytest tests

bench: $(STAMP)
	$(VENV)/bin/hrt-ray bench model

# One CUDA GPU, <= 8 min: bf16 MFU, compile, a 1-GPU job, predict/export (benchmarks/README.md).
gpu-check: $(STAMP)
	$(VENV)/bin/hrt-ray bench gpu $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
