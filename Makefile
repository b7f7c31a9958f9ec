# `make demo` and `make test` set up .venv (CPU torch pinned by constraints-cpu.txt) and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CATALOG ?= catalog.yaml
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test test-all docs benchmark clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e ".[test]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/relcohort run $(CATALOG)

# two test processes (pytest-xdist; each builds the session fixtures its tests use), idle ones taking tests from busy ones
test: $(INSTALLED)
	$(BIN)/python -m pytest -n 2 --dist worksteal

# every test, the slow ones too (killed runs, real SLURM, headless Chromium, the demo and native demo end to end,
# repeated experiments, planted-null simulations): what CI runs
test-all: $(INSTALLED)
	$(BIN)/python -m pytest -m "slow or not slow"

# the documentation site, offline, into workspace/site (open workspace/site/index.html)
docs: $(INSTALLED)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict -f docs/mkdocs.yml

benchmark: $(INSTALLED)
	$(BIN)/python benchmarks/ingest_throughput.py
	$(BIN)/python benchmarks/region_reduction.py
	$(BIN)/python benchmarks/voxelwise_stats.py
	$(BIN)/python benchmarks/stats_scale.py
	$(BIN)/python benchmarks/attribution_cost.py
	$(BIN)/python benchmarks/registration.py

clean:
	rm -rf $(VENV) workspace
