"""A tool module that fails while being imported."""

raise RuntimeError("fixture module failing at import on purpose")
