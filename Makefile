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

.PHONY: install browser demo test test-slow bench bench-grpo results results-table clean

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

# The report's browser test opens the page in headless Chromium (Debian package `chromium`).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) browser
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/dp_overhead.py
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/audit.py
	$(PY) benchmarks/secagg.py

# Needs the demo's artefacts in $(RUNS) (run `make demo` first).
bench-grpo: $(STAMP)
	$(PY) benchmarks/grpo_step.py --workdir $(RUNS)
	$(PY) benchmarks/grpo_step.py --workdir $(RUNS) --network

results: $(STAMP)
	$(VENV)/bin/mor demo run --workdir runs/results --write-results docs/results/dp_reward_models.json

# The full MoR-vs-baselines table (3 seeds, every baseline): docs/results/mor_vs_baselines.json,
# docs/results.md and docs/results/mor_training_*.png. 47 min to about 2 hours on 2 cores by host (52 min on 2026-12-05, 47 on 2026-12-03, 126 on 2026-12-02); resumes if interrupted.
results-table: $(STAMP)
	$(VENV)/bin/mor demo table --workdir runs/table

clean:
	rm -rf $(VENV) runs .pytest_cache
