# Two-command quick start: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3.11
# The machine's pip config names local mirrors that may be absent; drop that noise, keep real errors.
QUIET_PIP := sed -u '/is ignored: it is neither/d'
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNS ?= runs/demo

.PHONY: install demo test test-slow bench results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel is pre-staged on this machine.
	$(PY) -m pip install --quiet torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet -e ".[test]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import mor_secure, silo_agent, coordinator, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mor demo run --workdir $(RUNS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/dp_overhead.py

results: $(STAMP)
	$(VENV)/bin/mor demo run --workdir runs/results --write-results docs/results/dp_reward_models.json

clean:
	rm -rf $(VENV) runs .pytest_cache
