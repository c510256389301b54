"""The store's words: URLs printed without passwords, and a clear sentence when Redis is not there.

No Redis is needed: the unreachable case uses a loopback port nothing listens on.
"""

from __future__ import annotations

import socket
import sys

import pytest

from server.config import ConfigError, Settings, StoreSettings
from server.extension import make_manager
from server.store import check_reachable
from server.store_url import safe_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:hunter2@cache.internal/1", "rediss://app:***@cache.internal/1"),
        ("rediss://app@cache.internal/1", "rediss://app@cache.internal/1"),
        ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock?db=2&password=***"),
        (
            "rediss://cache/0?ssl_keyfile=/k.pem&ssl_password=hunter2",
            "rediss://cache/0?ssl_keyfile=/k.pem&ssl_password=***",
        ),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_store_is_named_with_its_key_and_reason_but_not_its_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{_closed_port()}/0"

    problem = check_reachable(StoreSettings(backend="redis", url=url, timeout_seconds=0.5))

    assert problem is not None
    assert problem.startswith(f"cannot reach the session store at {safe_url(url)} ([store] url): ")
    assert "Connection" in problem
    assert "hunter2" not in problem


def test_the_redis_backend_without_the_redis_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the redis extra were not installed
    monkeypatch.delitem(sys.modules, "server.cluster", raising=False)
    monkeypatch.delitem(sys.modules, "server.store", raising=False)

    with pytest.raises(ConfigError) as refused:
        make_manager(Settings(store=StoreSettings(backend="redis")))

    [problem] = refused.value.problems
    assert problem.startswith('store.backend: "redis" needs the redis package')
    assert "pip install 'mcp-session-manager[redis]'" in problem
