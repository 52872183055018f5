# Dialtone: `make run` starts the engine on its embedded defaults; `make test` runs lint, types and tests.
# Both create .venv and install what they need; only Python >= 3.11 and make are required.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: run test lint typecheck pytest bench clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Dialtone needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[dev]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/dialtone db migrate
	$(BIN)/dialtone seed-demo
	$(BIN)/dialtone serve

# ruff, mypy and pytest at once: pytest mostly waits on real-time calls, so mypy's ~40 s of CPU fits beside it.
test: $(VENV)/.installed-dev
	$(MAKE) --no-print-directory -j3 lint typecheck pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# Six workers, each taking whole test files (their module-scoped servers and databases stay in one process). Most
# tests wait on calls playing audio in real time, so the suite keeps two cores only about a quarter busy with two
# workers: four finished it in a little over half the time (10 min 37 s -> 6 min 11 s on a 2-core machine), and with
# four the suite of 2026-12-07 (2,465 tests, real engine processes killed and restarted among them) still kept the
# two cores under a third busy (8 min 51 s of CPU in 14 min 4 s).
pytest: $(VENV)/.installed-dev
	$(BIN)/pytest -n 6 --dist loadfile

bench: $(VENV)/.installed-dev
	$(PIP) -e '.[dev,bench]'
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python -m bench.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
