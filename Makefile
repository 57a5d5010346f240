# Two commands for a fresh machine: `make demo` (the built-in demo) and `make test` (the test suite).
# Both create .venv on first use with the CPU torch pinned (constraints-cpu.txt); GPU clusters install
# with `pip install -e .` instead (see README).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unitmatch

test: $(STAMP)
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

test-all: $(STAMP)
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m ""

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_match.py

clean:
	rm -rf $(VENV) outputs
