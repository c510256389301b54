"""A tool module that starts a thread at import that is not a daemon thread (a cache refresher, a
common pattern) and never stops it: Python waits for such a thread at exit."""

import threading

#: The thread's name, as the CLI names it when it exits without waiting for it.
THREAD_NAME = "fixture-cache-refresher"

_stop = threading.Event()


def _refresh() -> None:
    _stop.wait(120)  # bounded: a process that waits for this thread at exit hangs 120 s, past the tests' timeouts


threading.Thread(target=_refresh, name=THREAD_NAME).start()


def cache_count() -> int:
    return 0


TOOLS = [cache_count]
