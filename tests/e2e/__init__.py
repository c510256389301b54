"""End-to-end tests: the standalone server as a real process, over stdio and streamable HTTP."""
