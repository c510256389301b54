"""A tool module that catches KeyboardInterrupt while it imports (a loader's retry loop, say): it
writes `IMPORTING` to stderr, then waits up to 30 s, swallowing a KeyboardInterrupt. A signal
that stops the server's start must still stop it."""

import sys
import time

#: What the module writes to stderr once its import has begun.
IMPORTING = "catches_interrupt_at_import: importing"

try:
    sys.stderr.write(IMPORTING + "\n")
    sys.stderr.flush()
    time.sleep(30)  # bounded: tests signal long before 30 s
except KeyboardInterrupt:
    pass


def patient() -> str:
    return "patient"


TOOLS = [patient]
