"""`python -m server`: the same as the `mcp-session-manager` command."""

from server.cli import run

run()
