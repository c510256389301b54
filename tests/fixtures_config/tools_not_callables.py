"""A tool module whose `TOOLS` holds names instead of functions."""

TOOLS = ["echo", 42]
