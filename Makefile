# Two commands on a fresh machine: `make run` (the service on SQLite, dev mode) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install run test lint bench-ingest bench-scoring bench-delivery bench-e2e clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Leadscore needs Python 3.11, found " + sys.version'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install
	$(BIN)/leadscore migrate
	$(BIN)/leadscore serve --dev

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-ingest: install
	$(BIN)/python bench/bench_ingest.py

bench-scoring: install
	$(BIN)/python bench/bench_scoring.py

bench-delivery: install
	$(BIN)/python bench/bench_delivery.py

bench-e2e: install
	$(BIN)/python bench/bench_e2e.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
