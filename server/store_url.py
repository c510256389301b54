"""The store's URL: what `store.url` may be, and how it is shown without its password.

Tier: runtime foundation (used by `server.config`'s `StoreSettings`, and by everything that
prints or logs the URL). `store_url_problem` refuses, at validation, a URL redis-py could not
connect with (it would otherwise fail only at startup); `safe_url` masks any password in any
text given for it. Neither ever echoes a password.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import ssl
from urllib.parse import parse_qsl, unquote, urlsplit

STORE_URL_SCHEMES = ("redis://", "rediss://", "unix://")


#: `password=`, and `ssl_password=` (the passphrase of the TLS private key `ssl_keyfile`).
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl_)?password=)[^&#]*", re.IGNORECASE)


def safe_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages, logs and printed settings.

    Any text, not only a valid URL (an invalid one is echoed in its error): a `password=` or
    `ssl_password=` query value, and whatever stands between the first `:` of the userinfo and
    the last `@`. No URL parser is used, since a password written unescaped may hold `/`, `?` or `#`, which a parser
    takes for the start of the path and would then print.
    """
    text = _QUERY_PASSWORD.sub(r"\1***", url)  # unix:///run/redis.sock?password=...
    scheme, sep, rest = text.partition("://")
    head, rest = (scheme + sep, rest) if sep else ("", text)
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return head + rest


STORE_URL_EXAMPLE = "redis://127.0.0.1:6379/0"


def store_url_problem(url: str, *, backend: str = "redis") -> str | None:
    """Why redis-py could not connect with `url`, or None; never echoes any part of it.

    The URL's shape (host, port, database index, socket path) is checked whatever the backend,
    with `urllib`. With the redis backend, and redis-py installed, the URL is also parsed by
    `redis.connection.parse_url`, the function redis-py connects with, and each query argument
    is checked against the connection options both of its clients (sync and asyncio) accept:
    what it would refuse, or crash on, at startup is refused here instead.
    """
    if not url.startswith(STORE_URL_SCHEMES):
        return f"must be a Redis URL starting with redis://, rediss:// or unix://, e.g. {STORE_URL_EXAMPLE}"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError: not a number, or out of range
    except ValueError as exc:
        if "IPv6" in str(exc):
            return "is not a valid URL: an IPv6 host must be in brackets, e.g. redis://[::1]:6379/0"
        return f"the port must be a number from 1 to 65535{_encode_hint(url)}, e.g. {STORE_URL_EXAMPLE}"
    if parts.scheme == "unix":
        if parts.hostname or not parts.path.startswith("/"):
            return "must give the socket's absolute path after unix://, e.g. unix:///run/redis.sock"
    else:
        if not parts.hostname:
            return f"names no host{_encode_hint(url)}, e.g. {STORE_URL_EXAMPLE}"
        if port == 0:
            return f"the port must be a number from 1 to 65535, e.g. {STORE_URL_EXAMPLE}"
        database = unquote(parts.path).strip("/")
        if database and not database.isdecimal():
            hint = _encode_hint(url) if _password_split(url) else ""
            return f"the path must be the database index, a whole number{hint}, e.g. {STORE_URL_EXAMPLE}"
    if backend != "redis":
        return None
    return _redis_py_problem(url, parts.scheme)


def _encode_hint(url: str) -> str:
    # A password with an unescaped / ? or # ends the host part early: the parser then reads a
    # piece of the password as the port, or finds no host.
    return " (a password holding / ? # or @ must be percent-encoded, e.g. / as %2F)" if "@" in url else ""


def _password_split(url: str) -> bool:
    """Whether an unescaped `/` or `@` in a password has cut the URL early: more than one `@`
    after the scheme, or a `/` before the last one. The parser then reads the rest of the
    password as the path, while the masked URL shown (cut at the last `@`) looks valid. The query
    and fragment are left out: an `@` there (`?client_name=a@b`) is no password's."""
    before_query = url.partition("://")[2].partition("?")[0].partition("#")[0]
    userinfo = before_query.rpartition("@")[0]
    return "@" in userinfo or "/" in userinfo


#: Connection options the store sets from `store.timeout_seconds` (a URL's own would win).
_SET_BY_STORE_TIMEOUT = frozenset({"socket_timeout", "socket_connect_timeout"})


def _redis_py_problem(url: str, scheme: str) -> str | None:
    try:
        from redis.connection import parse_url
    except ImportError:  # redis is an optional extra; the shape checks above still hold
        return None
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # its messages name a query argument, never its value
        return f"is not a URL redis-py accepts: {safe_url(str(exc))}"
    given = {name for name, _ in parse_qsl(urlsplit(url).query)}
    overriding = sorted(given & _SET_BY_STORE_TIMEOUT)
    if overriding:  # redis-py lets the URL's value win over the one the store passes
        return (
            f"query argument {', '.join(map(repr, overriding))} would override store.timeout_seconds, "
            "which bounds every Redis round trip: remove it and set store.timeout_seconds instead"
        )
    accepted = _query_arguments(scheme)
    unknown = sorted(given - accepted) if accepted else []
    if unknown:  # the known ones listed leave out those refused above
        return (
            f"query argument {', '.join(map(repr, unknown))} is not a connection option redis-py takes "
            f"for {scheme}:// (known: {', '.join(sorted(accepted - _SET_BY_STORE_TIMEOUT))})"
        )
    return _value_problem(url) or _tls_file_problem(url)


#: The fewest connections the store's pool may be capped at (`?max_connections=`): the pool
#: fails a command at once when all are in use, and a replica keeps one for the listener to
#: other replicas' events (`server.cluster`'s `_listen`) while its other tasks may each be in a
#: round trip at the same moment: an admission, the session ends written on their own, the
#: housekeeping, and the listener's catch-up after it (re)subscribes. Each `session_release`
#: or `session_metrics` call under way at once takes one more.
MIN_MAX_CONNECTIONS = 5


def _value_problem(url: str) -> str | None:
    """Why redis-py refuses a query argument's value (`max_connections=-1`, `protocol=9`,
    `ssl_cert_reqs=bogus`) when it builds the pool and a connection, which opens no socket: it
    would otherwise fail at startup, as if the store could not be reached. Also a pool capped
    below `MIN_MAX_CONNECTIONS`, which redis-py accepts but with which calls are refused (at
    1, every one, for good: the listener holds the only connection)."""
    from redis.asyncio import ConnectionPool
    from redis.exceptions import RedisError

    try:
        pool = ConnectionPool.from_url(url)
        pool.make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, RedisError) as exc:
        return f"has a query argument redis-py refuses: {safe_url(str(exc))}"
    if pool.max_connections < MIN_MAX_CONNECTIONS:  # as redis-py reads it (0: its default)
        return (
            f"query argument 'max_connections' must be at least {MIN_MAX_CONNECTIONS} (got {pool.max_connections}): "
            "each replica keeps one connection to hear the other replicas and needs up to "
            f"{MIN_MAX_CONNECTIONS - 1} more for its own round trips, and past the cap redis-py refuses a command "
            "at once; leave it out for redis-py's default"
        )
    return None


#: Query arguments naming a file redis-py loads when it connects over TLS.
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class _NoKeyPassword(Exception):
    pass


def _no_key_password() -> bytes:
    raise _NoKeyPassword  # OpenSSL would otherwise ask on the terminal


def _tls_file_problem(url: str) -> str | None:
    """Why the TLS files a `rediss://` URL names (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
    the folder `ssl_ca_path`) cannot be used: missing, unreadable, or not what OpenSSL loads.
    redis-py loads them only as it connects, and its error then reads as if the host could not
    be reached (`Error 2 connecting to HOST:PORT. No such file or directory`). Paths are shown
    as redis-py reads them; `ssl_password` never is."""
    from redis.connection import parse_url

    options = parse_url(url)  # type: ignore[no-untyped-call]
    for name in _TLS_FILES:
        path = options.get(name)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                return f"query argument {name!r} names {path!r}, which cannot be read: {exc.strerror or exc}"
    folder = options.get("ssl_ca_path")
    if folder and not (os.path.isdir(folder) and os.access(folder, os.R_OK | os.X_OK)):
        return f"query argument 'ssl_ca_path' names {folder!r}, which is not a folder this process can read"
    context = ssl.create_default_context()
    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if keyfile and not certfile:
        return "query argument 'ssl_keyfile' needs 'ssl_certfile' too (the certificate that goes with the key)"
    if certfile:
        given = (
            "query arguments 'ssl_certfile' and 'ssl_keyfile' name"
            if keyfile
            else "query argument 'ssl_certfile' names"
        )
        password = options.get("ssl_password")
        try:
            context.load_cert_chain(certfile, keyfile, password=password or _no_key_password)
        except _NoKeyPassword:
            return f"{given} an encrypted private key: give its password as query argument 'ssl_password'"
        except (ssl.SSLError, OSError, ValueError) as exc:
            wrong = " (or 'ssl_password' is not the key's password)" if password else ""
            return f"{given} no PEM certificate and private key OpenSSL can load{wrong}: {exc}"
    if options.get("ssl_ca_certs") or folder:
        try:
            context.load_verify_locations(options.get("ssl_ca_certs"), folder)
        except (ssl.SSLError, OSError, ValueError) as exc:
            given = "'ssl_ca_certs'" if options.get("ssl_ca_certs") else "'ssl_ca_path'"
            return f"query argument {given} names no PEM CA certificates OpenSSL can load: {exc}"
    return None


@functools.cache
def _query_arguments(scheme: str) -> frozenset[str]:
    """The query arguments a `scheme` URL may carry: the keyword arguments that both redis-py
    clients' connection classes (sync, asyncio) and pools accept. Empty if they cannot be read."""
    try:
        import redis.asyncio.connection as async_connection
        import redis.connection as sync_connection

        def names(*classes: type) -> set[str]:
            found: set[str] = set()
            for cls in classes:
                for klass in cls.__mro__:
                    init = vars(klass).get("__init__")
                    if init is not None:
                        for parameter in inspect.signature(init).parameters.values():
                            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                                found.add(parameter.name)
            return found - {"self"}

        kind = {"unix": "UnixDomainSocketConnection", "rediss": "SSLConnection"}.get(scheme, "Connection")
        connection = names(getattr(sync_connection, kind)) & names(getattr(async_connection, kind))
        pool = names(sync_connection.ConnectionPool) & names(async_connection.ConnectionPool)
    except (ImportError, AttributeError, TypeError, ValueError):
        return frozenset()
    # Only what text can set: parse_url's typed arguments, and options that are plain strings.
    textual = set(sync_connection.URL_QUERY_ARGUMENT_PARSERS) | {
        "client_name",
        "username",
        "password",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_ciphers",
    }
    return frozenset(textual & (connection | pool))
