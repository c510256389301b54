# Every target bootstraps .venv itself: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck unit clients redis bench profile clean

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

# The cluster-mode tests (tests/cluster) run a real redis-server on loopback (each start is
# their own, on a free port; nothing of it is configured system-wide), some of them with TLS
# certificates made by `openssl`. Both are installed with apt when missing: sudo when not root.
# Installing redis-server may also start a system service.
redis:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -z "$$missing" ]; then \
		echo "redis-server: $$(command -v redis-server); openssl: $$(command -v openssl)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
		elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
		else echo "make redis:$$missing missing and installing needs root (no sudo here)" >&2; exit 1; fi; \
		echo "make redis: installing Debian's package(s):$$missing"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
		|| { $$sudo apt-get update && \
		     $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; } \
		|| { echo "make redis: apt-get could not install$$missing" >&2; exit 1; }; \
		for tool in redis-server openssl; do command -v $$tool >/dev/null 2>&1 \
		|| { echo "make redis: $$tool is still not on PATH after installing it" >&2; exit 1; }; done; \
	else \
		echo "make redis:$$missing not on PATH and there is no apt-get: install Redis 6 or later (with TLS)" \
		     "and openssl so that both are on PATH" >&2; \
		exit 1; \
	fi

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

unit: $(STAMP) $(CLIENTS_STAMP) redis
	$(BIN)/pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m tests.bench.run

# Where a tool call's overhead goes (tests/bench/profile.py): this package's bytecodes per call,
# then instructions and cache misses under valgrind's cachegrind (installed separately).
# Options through PROFILE_ARGS, e.g. make profile PROFILE_ARGS="--against HEAD~1 --tool noop_sync".
profile: $(STAMP)
	$(BIN)/python -m tests.bench.profile $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(CLIENTS_DIR)/node_modules
