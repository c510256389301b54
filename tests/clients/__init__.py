"""Tests through MCP clients nobody here wrote: the MCP Inspector CLI and the MCP conformance suite."""
