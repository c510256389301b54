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
# their own, on a free port; nothing of it is configured system-wide). Installed with apt when
# missing: sudo when not root. Installing the package may also start a system service.
redis:
	@if command -v redis-server >/dev/null 2>&1; then \
		echo "redis-server: $$(command -v redis-server)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
		elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
		else echo "make redis: redis-server is missing and installing it needs root (no sudo here)" >&2; exit 1; fi; \
		echo "make redis: installing Debian's redis-server package"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
		|| { $$sudo apt-get update && \
		     $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; } \
		|| { echo "make redis: apt-get could not install redis-server" >&2; exit 1; }; \
		command -v redis-server >/dev/null 2>&1 \
		|| { echo "make redis: redis-server is still not on PATH after installing it" >&2; exit 1; }; \
	else \
		echo "make redis: redis-server is not on PATH and there is no apt-get: install Redis 6 or later" \
		     "so that redis-server is on PATH" >&2; \
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
