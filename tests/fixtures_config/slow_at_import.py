"""A tool module that takes its time to import (a model loaded at import, say): it writes
`IMPORTING` to stderr, then waits up to 30 s (or `SLOW_AT_IMPORT_SECONDS`), so that a test can
signal the server mid-start."""

import os
import sys
import time

#: What the module writes to stderr once its import has begun.
IMPORTING = "slow_at_import: importing"

sys.stderr.write(IMPORTING + "\n")
sys.stderr.flush()
time.sleep(float(os.environ.get("SLOW_AT_IMPORT_SECONDS", "30")))  # bounded: tests signal long before 30 s


def slow() -> str:
    return "slow"


TOOLS = [slow]
