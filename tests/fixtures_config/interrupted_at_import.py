"""A tool module whose import raises KeyboardInterrupt, as Ctrl-C does under Python's own handler:
it stops the start, never taken for a config problem."""

raise KeyboardInterrupt
