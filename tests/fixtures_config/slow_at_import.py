"""A tool module that takes its time to import (a model loaded at import, say): it writes
`IMPORTING` to stderr, then waits up to 30 s, so that a test can signal the server mid-start."""

import sys
import time

#: What the module writes to stderr once its import has begun.
IMPORTING = "slow_at_import: importing"

sys.stderr.write(IMPORTING + "\n")
sys.stderr.flush()
time.sleep(30)  # bounded: the test signals the process long before this ends


def slow() -> str:
    return "slow"


TOOLS = [slow]
