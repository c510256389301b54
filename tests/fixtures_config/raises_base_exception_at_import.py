"""A tool module that fails while being imported with an exception of its own derived from
`BaseException` (not `Exception`), as some libraries define theirs."""


class FixtureAbort(BaseException):
    """Not an `Exception`: `except Exception` lets it through."""


raise FixtureAbort("fixture module aborting its import on purpose")
