"""MCP tool functions: the four session tools (`tools.sessions`) and demo tools (`tools.demo`)."""
