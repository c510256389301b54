"""Small tool modules for the configuration and CLI tests: one good, the others broken or careless on purpose.

Each is named in a config's `server.tool_modules`; none is imported by the suite itself.
"""
