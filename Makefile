# Every target bootstraps .venv itself: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck unit clients bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The pinned MCP Inspector, MCP conformance suite and Node 22 binary the client tests drive
# (tests/clients/package.json + lockfile), installed from the lockfile into an ignored folder.
CLIENTS_DIR := tests/clients
CLIENTS_STAMP := $(CLIENTS_DIR)/node_modules/.installed

$(CLIENTS_STAMP): $(CLIENTS_DIR)/package.json $(CLIENTS_DIR)/package-lock.json
	npm ci --prefix $(CLIENTS_DIR) --no-audit --no-fund --loglevel=error
	touch $@

clients: $(CLIENTS_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/mcp-session-manager --config config/demo.toml --transport streamable-http

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(CLIENTS_STAMP)
	$(BIN)/pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m tests.bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(CLIENTS_DIR)/node_modules
