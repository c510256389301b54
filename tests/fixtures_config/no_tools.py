"""A tool module that forgot to export `TOOLS`."""


def lonely() -> str:
    """A tool nobody listed."""
    return "lonely"
