"""Settings: the validated configuration of the session layer, section by section.

Tier: runtime foundation. Everything else receives a `Settings` object; nothing here
is global. Each section (`[server]`, `[limits]`, ...) is a frozen model whose fields hold
their bounds, so a `Settings` that exists is valid. Loading one from the TOML file, the
environment and the command-line flags, and wording every problem with its source, is
`server.config_loader`'s part (`load_settings`).

A password in any text given for `store.url` is never echoed, and a `store.url` redis-py could
not connect with is refused here, not at startup (`server.store_url`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.store_url import safe_url, store_url_problem
from server.toml_keys import dotted_key

ENV_PREFIX = "MCP_SESSIONS_"
ENV_NESTED_DELIMITER = "__"

#: The error type of the cross-key timeout checks; `load_settings` words these itself.
ABOVE_CAP = "timeout_above_cap"
#: The largest `limits.max_timeout_seconds` (so the largest deadline of any session): 1e9 s,
#: about 31 years.
MAX_TIMEOUT_SECONDS = 1e9
#: The per-tool keys that are timeouts, and so capped by limits.max_timeout_seconds.
TOOL_TIMEOUT_KEYS = ("timeout_seconds", "idle_timeout_seconds")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why, one problem per line.

    `sourced` says each problem already starts with its SOURCE (as `load_settings` words them);
    the later checks of the standalone server (tool modules, `[tools.NAME]` names) start theirs
    with the key path, and `config_problems` puts the source in front.
    """

    def __init__(self, problems: list[str], *, sourced: bool = False) -> None:
        self.problems = problems
        self.sourced = sourced
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _list_to_tuple(value: Any) -> Any:
    # TOML and JSON have arrays, not tuples; without this a strict check would refuse them.
    return tuple(value) if isinstance(value, list) else value


#: The host of a Host header: a DNS name or IPv4 address, or an IPv6 address in brackets.
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
HOST_EXAMPLE = "mcp.example.com:*"


def split_host_port(value: str) -> tuple[str, str | None] | None:
    """The host and the port (None: no port) of a `host[:port]` Host header value or pattern; an
    IPv6 host keeps its brackets. None if a bracketed host is unclosed or followed by anything
    but `:port`."""
    if value.startswith("["):
        host, bracket, rest = value.partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        return host + bracket, rest[1:] if rest else None
    host, colon, port = value.rpartition(":")
    return (host, port) if colon else (value, None)


def _host_pattern_problem(value: str) -> str | None:
    """Why `value` is no `host[:port]` pattern (as the SDK compares them with the Host header), or None.

    The SDK takes an entry as the exact Host header value, or with `:*` as any port of that host,
    so an entry with a scheme, a path or a name wildcard would silently never match.
    """
    if not value:
        return f'must not be empty; give a host[:port], e.g. "{HOST_EXAMPLE}"'
    if any(c.isspace() for c in value):
        return "must not contain spaces; give one host[:port] per entry"
    if "://" in value or "/" in value:
        bare = value.partition("://")[2] if "://" in value else value
        bare = bare.partition("/")[0]
        bare = bare if bare.endswith("]") or ":" in bare else f"{bare}:*"
        example = bare if _host_pattern_problem(bare) is None else HOST_EXAMPLE
        if "://" in value:
            return f'must be a Host header value without a scheme, e.g. "{example}"'
        return f'must be host[:port] with no path, e.g. "{example}"'
    split = split_host_port(value)
    host, port = split if split is not None else (value, None)  # None: refused as a whole
    if not _HOST.fullmatch(host):
        return (
            "must be host[:port] where host is a name, an IPv4 address or an IPv6 address in brackets ([::1]); "
            "only the port may be *"
        )
    if port is not None and port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
        return "the port must be a number from 1 to 65535, or * for any port"
    return None


def _host_pattern(value: str) -> str:
    """`value`, checked, in lower case: host names are case-insensitive and clients send them in
    lower case, but the SDK compares the Host header with each entry as written."""
    problem = _host_pattern_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value.lower()


#: The error type of the off-loopback check; `load_settings` words it itself, on the merged values.
OPEN_HOST = "host_needs_allowed_hosts"
OPEN_HOST_REASON = (
    "so server.allowed_hosts must list the Host header values clients will use, e.g. "
    '["mcp.example.com:*", "10.0.0.5:8765"], so that requests for any other host (DNS rebinding) are refused'
)

#: The error type of the check that the exporter's port is not the HTTP transport's own.
PORT_CLASH = "exporter_port_is_server_port"
PORT_CLASH_REASON = (
    "on streamable-http, /metrics is served on server.port already; "
    "set metrics.prometheus_port = 0, or another port for a second, loopback-only exporter"
)


#: The bounds of a per-tool cap (`[tools.NAME].max_concurrent`, `SessionManager(tool_caps=...)`).
TOOL_CAP_BOUNDS = (1, 1_000_000)


#: Where the standalone server finds tool modules, as said in the hints of module name problems.
MODULE_ROOTS = "modules are found from the working directory and PYTHONPATH"


def module_name_problem(name: str) -> str | None:
    """Why `name` cannot be an entry of `server.tool_modules` (spaces around it, a file path, a
    relative name), or None.

    Checked before anything is imported: `importlib` would take "m_print.py" as the submodule `py`
    of the package `m_print`, and so run `m_print` before failing.
    """
    stripped = name.strip()
    if stripped and stripped != name:  # (a blank name is refused as empty, with the list)
        also = module_name_problem(stripped)
        return (
            f'must not have spaces around it; write "{stripped}"'
            if also is None
            else f"must not have spaces around it, and {also}"
        )
    path = name.replace("\\", "/")
    if path.endswith(".py") or "/" in path:
        parts = [part for part in path.removesuffix(".py").split("/") if part not in ("", ".")]
        absolute = path.startswith(("/", "~")) or path[1:2] == ":" or ".." in parts
        dotted = parts[-1] if absolute and parts else ".".join(parts)
        if dotted and all(part.isidentifier() for part in dotted.split(".")):
            example = f', e.g. "{dotted}"' + (", with its directory on PYTHONPATH" if absolute else "")
        else:
            example = ""
        return f"is a file path, not a module name; write the module's dotted name{example}; {MODULE_ROOTS}"
    if name.startswith("."):
        return f'is a relative module name; write the full dotted name, e.g. "my_package{name}"; {MODULE_ROOTS}'
    return None


def _module_name(name: str) -> str:
    problem = module_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


#: A label of a host name: letters, digits, - and _ (as Docker and /etc/hosts names may hold),
#: 1 to 63 of them, not starting or ending with -.
_NAME_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
#: How server.host is written, as said in its problems.
_BIND_HOST_FORMS = 'an IPv4 address ("0.0.0.0"), an IPv6 address without brackets ("::1") or a host name ("localhost")'


def bind_host_problem(value: str) -> str | None:
    """Why `value` cannot be `server.host` (the interface streamable HTTP binds), or None.

    Only the spelling is checked: an IP address, or a name of valid labels. A name is not looked
    up (no DNS at check time); one that does not resolve fails at start, naming the address.
    """
    if not value:
        return None  # refused as empty by the field's own bound
    if any(c.isspace() for c in value):
        stripped = value.strip()
        if stripped and not any(c.isspace() for c in stripped) and bind_host_problem(stripped) is None:
            return f'must not contain spaces; write "{stripped}"'
        return f"must not contain spaces; write {_BIND_HOST_FORMS}"
    if "://" in value:
        bare = value.partition("://")[2].partition("/")[0]
        bare = _without_port(bare) or bare
        example = f'"{bare}"' if bind_host_problem(bare) is None else _BIND_HOST_FORMS
        return (
            f"must be an address or a host name, not a URL: write {example} (no scheme, no path); "
            "a port goes in server.port"
        )
    if "/" in value:
        bare = value.partition("/")[0]
        example = f'"{bare}"' if bare and bind_host_problem(bare) is None else _BIND_HOST_FORMS
        return f"must be an address or a host name with no path: write {example}"
    if value.startswith("["):
        inner, bracket, rest = value[1:].partition("]")
        if bracket and _is_ip(inner, 6):
            if rest.startswith(":") and rest[1:].isdigit():
                return (
                    f'must not hold a port: write "{inner}" (without brackets) and the port {rest[1:]} in server.port'
                )
            if not rest:
                return (
                    f'is an IPv6 address in brackets: write it without them, "{inner}" '
                    "(brackets are for URLs and Host headers)"
                )
        return f"must be {_BIND_HOST_FORMS}"
    if ":" in value:
        if _is_ip(value, 6):
            return None
        host, _, port = value.rpartition(":")
        if port.isdigit() and host and ":" not in host and bind_host_problem(host) is None:
            return f'must not hold a port: write "{host}" and the port {port} in server.port'
        return f"must be {_BIND_HOST_FORMS}; a port goes in server.port"
    labels = value.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        if _is_ip(value, 4):
            return None
        return 'is not a valid IPv4 address: write four numbers from 0 to 255 separated by dots, e.g. "127.0.0.1"'
    if len(value) > 253 or not all(_NAME_LABEL.fullmatch(label) for label in labels):
        return (
            f"must be {_BIND_HOST_FORMS}; a name is labels of letters, digits, - and _ (up to 63 each, not "
            "starting or ending with -) separated by dots"
        )
    return None


def _without_port(value: str) -> str | None:
    """`value` without a `:port` suffix (and an IPv6 address without its brackets), or None if it has none."""
    if value.startswith("["):
        inner, bracket, _ = value[1:].partition("]")
        return inner if bracket else None
    host, colon, port = value.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else None


def _is_ip(value: str, version: int) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return address.version == version


def _bind_host(value: str) -> str:
    problem = bind_host_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _not_blank(value: str) -> str:
    """`value` unless it is only whitespace (an empty one is refused by the field's own bound)."""
    if value and not value.strip():
        raise ValueError("must not be blank (only whitespace): write the name clients are shown")
    return value


class ServerSettings(_Section):
    """`[server]`: the server's name, how clients connect (stdio or streamable HTTP) and, for
    the standalone server, the tool modules it hosts and its HTTP bounds."""

    name: Annotated[str, AfterValidator(_not_blank)] = Field(
        default="mcp-session-manager", min_length=1, description="Server name shown to clients."
    )
    transport: Literal["stdio", "streamable-http"] = Field(default="stdio", description="How clients connect.")
    host: Annotated[str, AfterValidator(_bind_host)] = Field(
        default="127.0.0.1",
        min_length=1,
        description="Interface for streamable HTTP: an IP address (IPv6 without brackets) or a host name.",
    )
    port: int = Field(default=8765, ge=1, le=65535, description="TCP port for streamable HTTP.")
    tool_modules: Annotated[
        tuple[Annotated[str, AfterValidator(_module_name)], ...], BeforeValidator(_list_to_tuple)
    ] = Field(default=(), description="Importable modules whose `TOOLS` list of functions is hosted by the server.")
    allowed_hosts: Annotated[
        tuple[Annotated[str, AfterValidator(_host_pattern)], ...], BeforeValidator(_list_to_tuple)
    ] = Field(
        default=(),
        description="Host header values streamable HTTP accepts besides loopback (DNS-rebinding protection), "
        'e.g. ["mcp.example.com:*"]; required when host is not a loopback address.',
    )
    http_session_idle_timeout_seconds: float = Field(
        default=1800.0,
        gt=0,
        le=7 * 24 * 3600,
        allow_inf_nan=False,
        description="Streamable HTTP: a client session with no request in flight (and no open event stream) "
        "for this long is closed, its memory freed; the client then initializes a new one.",
    )
    http_max_sessions: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Streamable HTTP: client sessions open at once; past it a new client is refused (503).",
    )
    http_max_connections: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Streamable HTTP: connections open at once; past it a new connection is answered 503 and "
        "closed. 0: what the open-files limit leaves room for, at most 10000.",
    )
    http_request_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Streamable HTTP: a connection whose client has owed a request (its headers and body) this "
        "long, from the connection's start or the request's first byte, is closed (408).",
    )

    @model_validator(mode="after")
    def _hosts_named_off_loopback(self) -> ServerSettings:
        if self.transport == "streamable-http" and not is_loopback(self.host) and not self.allowed_hosts:
            raise PydanticCustomError(
                OPEN_HOST,
                "server.host {host} is not a loopback address, " + OPEN_HOST_REASON,
                {"host": repr(self.host)},
            )
        return self

    @field_validator("tool_modules")
    @classmethod
    def _distinct_module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in value):
            raise ValueError('module names must not be empty; list importable modules, e.g. ["tools.demo"]')
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(map(repr, repeated))} more than once; list each module once")
        return value


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: The same, as a Host or Origin header spells them (an IPv6 address in brackets).
LOOPBACK_HOST_NAMES = tuple(f"[{host}]" if ":" in host else host for host in LOOPBACK_HOSTS)


def is_loopback(host: str) -> bool:
    """Whether `host` (an interface to bind) is the loopback interface, where the SDK's own
    DNS-rebinding protection applies."""
    return host in LOOPBACK_HOSTS


class LimitsSettings(_Section):
    """`[limits]`: the limits in force: call deadlines and their cap, concurrent sessions, metadata
    size, the admission queue, per-client sessions and stuck threads. `session_metrics` reports
    them under `limits`."""

    default_timeout_seconds: float = Field(
        default=30.0, gt=0, allow_inf_nan=False, description="Deadline of a call with no override."
    )
    max_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        # Past about 31 years a deadline no longer fits in a date (`expires_at`), nor in Redis's
        # expiry times: as a cap it already means "none".
        le=MAX_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="Cap for any per-tool or per-session timeout.",
    )
    max_concurrent_sessions: int = Field(default=100, ge=1, le=1_000_000, description="Sessions active at once.")
    max_metadata_bytes: int = Field(
        default=10240, ge=0, le=16 * 1024 * 1024, description="UTF-8 bytes of a session's metadata as compact JSON."
    )
    max_queued: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Calls that may wait for a slot when the server is full; 0 refuses at once.",
    )
    queue_timeout_seconds: float = Field(
        default=10.0, gt=0, le=3600, allow_inf_nan=False, description="How long a queued call waits for a slot."
    )
    max_sessions_per_client: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Sessions one client may hold or queue at once; 0 means no per-client cap.",
    )
    max_abandoned_threads: int = Field(
        default=32,
        ge=0,
        le=10_000,
        description="Sync calls whose thread outlives the call (deadline, cancellation) before sync tools are refused.",
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitsSettings:
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise PydanticCustomError(
                ABOVE_CAP,
                "limits.default_timeout_seconds ({value}) must not exceed limits.max_timeout_seconds ({cap})",
                {"value": self.default_timeout_seconds, "cap": self.max_timeout_seconds},
            )
        return self


class ShutdownSettings(_Section):
    """`[shutdown]`: how long a graceful shutdown lets active sessions drain, and the environment
    variable holding the token `server_shutdown` needs over HTTP."""

    # A token written where the name of its variable belongs is not echoed in an error's text.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    timeout_seconds: float = Field(
        default=30.0, ge=0, allow_inf_nan=False, description="How long a graceful shutdown drains sessions."
    )
    admin_token_env: str = Field(
        default="", description="Name of the environment variable holding the token server_shutdown needs over HTTP."
    )

    @field_validator("admin_token_env")
    @classmethod
    def _is_a_variable_name(cls, value: str) -> str:
        if value and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits and _, e.g. MCP_SESSIONS_ADMIN_TOKEN) "
                "that holds the token, not the token itself"
            )
        return value


def _lower(value: Any) -> Any:
    # Level and format names in any case: DEBUG (as Python's logging spells it) is debug.
    return value.lower() if isinstance(value, str) else value


class LoggingSettings(_Section):
    """`[logging]`: the standalone server's log lines on stderr, their least severe level and format."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = Field(
        default="info", description="Least severe level written to stderr (session ends are info, refusals warning)."
    )
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        default="text", description="One line per record: text, or a JSON object."
    )


class MetricsSettings(_Section):
    """`[metrics]`: an optional loopback-only Prometheus exporter (meant for stdio)."""

    prometheus_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of a loopback-only Prometheus exporter (/metrics) besides the transport; 0 = none.",
    )


def mask_secrets(loc: Loc, value: Any) -> Any:
    """`value` as it may be echoed at `loc`: any text under `store` is masked like a store URL."""
    if not loc or loc[0] != "store":
        return value
    if isinstance(value, str):
        return safe_url(value)
    if isinstance(value, list | tuple):
        return [mask_secrets(loc, item) for item in value]
    return value


class StoreSettings(_Section):
    """`[store]`: where the session space lives, this process (`memory`) or a Redis shared by
    replicas (`redis`, cluster mode), and how to reach that Redis."""

    # A refused value is not echoed in the error's text: the URL may hold a password. (The
    # config loader words its own problems, masking it; this is for `StoreSettings(...)` and
    # `Settings(store=...)` built directly, whose errors a host may log as they are.)
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description='Where the session space lives: "memory" (this process) or "redis" (shared by replicas).',
    )
    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        min_length=1,
        description="Redis URL for the redis backend: redis://, rediss:// (TLS) or unix://.",
    )
    key_prefix: str = Field(
        default="mcp-sessions:",
        min_length=1,
        max_length=200,
        description="Start of every Redis key this server uses; the replicas of one service share it.",
    )
    timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="Bound on each Redis command; past it a call fails with store_unavailable.",
    )

    @field_validator("url")
    @classmethod
    def _is_a_redis_url(cls, value: str, info: ValidationInfo) -> str:
        # `backend` is declared first, so it is in `info.data` here (unless it was invalid itself).
        problem = store_url_problem(value, backend=info.data.get("backend", "redis"))
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("key_prefix")
    @classmethod
    def _printable_prefix(cls, value: str) -> str:
        if not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError('must be printable with no spaces, e.g. "mcp-sessions:"')
        return value


class ToolSettings(_Section):
    """`[tools.<name>]`: one hosted tool's deadline, concurrency cap and idle timeout."""

    timeout_seconds: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Deadline of this tool's calls."
    )
    max_concurrent: int | None = Field(
        default=None,
        ge=TOOL_CAP_BOUNDS[0],
        le=TOOL_CAP_BOUNDS[1],
        description="Calls of this tool active at once (within the global cap).",
    )
    idle_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Time a call may go without reporting progress before it is timed out.",
    )


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`, or directly for tests and embedding.

    Built directly, `Settings(...)` takes its arguments over the environment (no file).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        # As for `StoreSettings`: a refused `store.url` (or an admin token written where the
        # name of its variable belongs) is not echoed in the error's text. Each problem still
        # names its key; `load_settings` words its own problems, values shown but secrets masked.
        hide_input_in_errors=True,
    )

    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    store: StoreSettings = StoreSettings()
    tools: dict[str, ToolSettings] = Field(default_factory=dict, description="Per-tool overrides by tool name.")

    @model_validator(mode="after")
    def _tool_timeouts_within_cap(self) -> Settings:
        cap = self.limits.max_timeout_seconds
        for name, tool in self.tools.items():
            for key in TOOL_TIMEOUT_KEYS:
                value = getattr(tool, key)
                if value is not None and value > cap:
                    raise PydanticCustomError(
                        ABOVE_CAP,
                        "{table}.{key} ({value}) must not exceed limits.max_timeout_seconds ({cap})",
                        {"name": name, "table": dotted_key(("tools", name)), "key": key, "value": value, "cap": cap},
                    )
        return self

    @model_validator(mode="after")
    def _exporter_port_not_server_port(self) -> Settings:
        port = self.metrics.prometheus_port
        if self.server.transport == "streamable-http" and port == self.server.port:
            raise PydanticCustomError(
                PORT_CLASH, "metrics.prometheus_port ({port}) is server.port too: " + PORT_CLASH_REASON, {"port": port}
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments beat the environment. `load_settings` merges the file beneath both itself,
        # so that it knows where each value came from.
        return (init_settings, env_settings)

    def ineffective(self) -> list[str]:
        """Valid settings that cannot take effect as written, each as a sentence naming its keys
        (warned about at start, by `--check-config` and on a reload, never refused: each is
        harmless, but its author expects something that will not happen)."""
        limits = self.limits
        cap = limits.max_concurrent_sessions
        notes = []
        if limits.max_sessions_per_client > cap:
            notes.append(
                f"limits.max_sessions_per_client ({limits.max_sessions_per_client}) is above "
                f"limits.max_concurrent_sessions ({cap}): the server-wide cap is reached first"
            )
        if limits.max_abandoned_threads == 0:
            notes.append(
                "limits.max_abandoned_threads is 0: every call of a sync tool is refused (capacity_exceeded), "
                "even with no thread stuck; set it to 1 or more to serve sync tools"
            )
        token_env = self.shutdown.admin_token_env
        if self.server.transport == "streamable-http" and token_env and not os.environ.get(token_env):
            # Never the value: the variable is unset or empty here, but say nothing of it either way.
            state = "is not set" if token_env not in os.environ else "is empty"
            notes.append(
                f"shutdown.admin_token_env names the environment variable {token_env}, which {state} in the "
                f"server's environment: server_shutdown over streamable HTTP is refused (unauthorized) until the "
                f"server is restarted with {token_env} set to a non-empty token (SIGINT or SIGTERM still stop it)"
            )
        for name, tool in sorted(self.tools.items()):
            table = dotted_key(("tools", name))  # as TOML writes it: tools."my.tool"
            if tool.max_concurrent is not None and tool.max_concurrent > cap:
                notes.append(
                    f"{table}.max_concurrent ({tool.max_concurrent}) is above "
                    f"limits.max_concurrent_sessions ({cap}): the server-wide cap is reached first"
                )
            idle, deadline = tool.idle_timeout_seconds, self.timeout_for(name)
            if idle is not None and idle >= deadline:
                source = f"{table}.timeout_seconds"
                if tool.timeout_seconds is None:
                    source = "limits.default_timeout_seconds"
                notes.append(
                    f"{table}.idle_timeout_seconds ({idle:g}) is not below the call's deadline "
                    f"({deadline:g}, {source}): a call reaches its deadline first, so the idle timeout never fires"
                )
        return notes

    def timeout_for(self, tool: str) -> float:
        """The deadline, in seconds, of one call of `tool`."""
        override = self.tools.get(tool)
        if override is not None and override.timeout_seconds is not None:
            return override.timeout_seconds
        return self.limits.default_timeout_seconds

    def idle_timeout_for(self, tool: str) -> float | None:
        """How long a call of `tool` may go without reporting progress; None if unbounded."""
        override = self.tools.get(tool)
        return override.idle_timeout_seconds if override is not None else None

    def tool_caps(self) -> dict[str, int]:
        """The per-tool concurrency caps (`[tools.NAME].max_concurrent`) that are set."""
        return {name: tool.max_concurrent for name, tool in self.tools.items() if tool.max_concurrent is not None}
