"""Settings: the validated configuration of the session layer.

Tier: runtime foundation. Everything else receives a `Settings` object; nothing here
is global. Sources, highest priority first: explicit overrides (the CLI flags), the
environment (`MCP_SESSIONS_` prefix, `__` between nested keys), the TOML file, and the
built-in defaults (which `config/default.toml` spells out).

`load_settings` reports every problem of the settings at once (an unreadable file alone), one
per line, as `SOURCE: key.path: reason (got VALUE)`, where SOURCE is the file, the environment
variable or the command-line option the value came from, for example:

    bad.toml: limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?
    bad.toml: server.port: must be between 1 and 65535 (got 70000)

Values in the file must have the type the key needs (`port = "80"` and `true` for a number
are errors); values from the environment are text and are parsed. A password in any text given
for `store.url` is never echoed (`safe_url`).

The standalone server's own checks (tool modules, `[tools.NAME]` names) need valid settings, so
they run after `load_settings`; `config_problems` names the source of their keys the same way.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

ENV_PREFIX = "MCP_SESSIONS_"
ENV_NESTED_DELIMITER = "__"

#: The error type of the cross-key timeout checks; `load_settings` words these itself.
_ABOVE_CAP = "timeout_above_cap"
#: The per-tool keys that are timeouts, and so capped by limits.max_timeout_seconds.
_TOOL_TIMEOUT_KEYS = ("timeout_seconds", "idle_timeout_seconds")

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


def config_problems(error: ConfigError, path: str | os.PathLike[str] | None) -> list[str]:
    """The problems of `error`, each naming its source once, as `SOURCE: key.path: reason`.

    A problem that starts with its key path (`tools.nosuchtool: ...`) gets the source of that
    key in front: the environment variable that set it, else the file `path`. The file and the
    environment are read again for this, which only happens on the way out with an error.
    """
    if error.sourced:
        return list(error.problems)
    try:
        file_data = read_toml(path) if path is not None else {}
    except ConfigError:
        file_data = {}
    sources = _Sources(Path(path) if path is not None else None, file_data, _read_env()[0], {})
    named = []
    for problem in error.problems:
        key, sep, _ = problem.partition(": ")
        loc: Loc = tuple(key.split(".")) if sep and key and not any(c.isspace() for c in key) else ()
        if loc and sources.origin(loc) is not None:
            named.append(f"{sources.describe(loc)}: {problem}")
        else:
            named.append(f"{path}: {problem}" if path is not None else problem)
    return named


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _list_to_tuple(value: Any) -> Any:
    # TOML and JSON have arrays, not tuples; without this a strict check would refuse them.
    return tuple(value) if isinstance(value, list) else value


#: The host of a Host header: a DNS name or IPv4 address, or an IPv6 address in brackets.
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_HOST_EXAMPLE = "mcp.example.com:*"


def _host_pattern_problem(value: str) -> str | None:
    """Why `value` is no `host[:port]` pattern (as the SDK compares them with the Host header), or None.

    The SDK takes an entry as the exact Host header value, or with `:*` as any port of that host,
    so an entry with a scheme, a path or a name wildcard would silently never match.
    """
    if not value:
        return f'must not be empty; give a host[:port], e.g. "{_HOST_EXAMPLE}"'
    if any(c.isspace() for c in value):
        return "must not contain spaces; give one host[:port] per entry"
    if "://" in value or "/" in value:
        bare = value.partition("://")[2] if "://" in value else value
        bare = bare.partition("/")[0]
        bare = bare if bare.endswith("]") or ":" in bare else f"{bare}:*"
        example = bare if _host_pattern_problem(bare) is None else _HOST_EXAMPLE
        if "://" in value:
            return f'must be a Host header value without a scheme, e.g. "{example}"'
        return f'must be host[:port] with no path, e.g. "{example}"'
    if value.startswith("["):
        host, _, rest = value.partition("]")
        host += "]"
        port: str | None = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            host = value  # text after the brackets that is no port: refused as a whole
    else:
        host, colon, after = value.rpartition(":")
        host, port = (host, after) if colon else (value, None)
    if not _HOST.fullmatch(host):
        return (
            "must be host[:port] where host is a name, an IPv4 address or an IPv6 address in brackets ([::1]); "
            "only the port may be *"
        )
    if port is not None and port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
        return "the port must be a number from 1 to 65535, or * for any port"
    return None


def _host_pattern(value: str) -> str:
    problem = _host_pattern_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: The error type of the off-loopback check; `load_settings` words it itself, on the merged values.
_OPEN_HOST = "host_needs_allowed_hosts"
_OPEN_HOST_REASON = (
    "so server.allowed_hosts must list the Host header values clients will use, e.g. "
    '["mcp.example.com:*", "10.0.0.5:8765"], so that requests for any other host (DNS rebinding) are refused'
)


class ServerSettings(_Section):
    name: str = Field(default="mcp-session-manager", min_length=1, description="Server name shown to clients.")
    transport: Literal["stdio", "streamable-http"] = Field(default="stdio", description="How clients connect.")
    host: str = Field(default="127.0.0.1", min_length=1, description="Interface for streamable HTTP.")
    port: int = Field(default=8765, ge=1, le=65535, description="TCP port for streamable HTTP.")
    tool_modules: Annotated[tuple[str, ...], BeforeValidator(_list_to_tuple)] = Field(
        default=(), description="Importable modules whose `TOOLS` list of functions is hosted by the server."
    )
    allowed_hosts: Annotated[
        tuple[Annotated[str, AfterValidator(_host_pattern)], ...], BeforeValidator(_list_to_tuple)
    ] = Field(
        default=(),
        description="Host header values streamable HTTP accepts besides loopback (DNS-rebinding protection), "
        'e.g. ["mcp.example.com:*"]; required when host is not a loopback address.',
    )

    @model_validator(mode="after")
    def _hosts_named_off_loopback(self) -> ServerSettings:
        if self.transport == "streamable-http" and not is_loopback(self.host) and not self.allowed_hosts:
            raise PydanticCustomError(
                _OPEN_HOST,
                "server.host {host} is not a loopback address, " + _OPEN_HOST_REASON,
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


def is_loopback(host: str) -> bool:
    """Whether `host` (an interface to bind) is the loopback interface, where the SDK's own
    DNS-rebinding protection applies."""
    return host in LOOPBACK_HOSTS


class LimitsSettings(_Section):
    default_timeout_seconds: float = Field(
        default=30.0, gt=0, allow_inf_nan=False, description="Deadline of a call with no override."
    )
    max_timeout_seconds: float = Field(
        default=300.0, gt=0, allow_inf_nan=False, description="Cap for any per-tool or per-session timeout."
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
        description="Sync calls stuck in threads past their deadline before sync tools are refused.",
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitsSettings:
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise PydanticCustomError(
                _ABOVE_CAP,
                "limits.default_timeout_seconds ({value}) must not exceed limits.max_timeout_seconds ({cap})",
                {"value": self.default_timeout_seconds, "cap": self.max_timeout_seconds},
            )
        return self


class ShutdownSettings(_Section):
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


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe level written to stderr (session ends are info, refusals warning)."
    )
    format: Literal["text", "json"] = Field(default="text", description="One line per record: text, or a JSON object.")


class MetricsSettings(_Section):
    prometheus_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of a loopback-only Prometheus exporter (/metrics) besides the transport; 0 = none.",
    )


STORE_URL_SCHEMES = ("redis://", "rediss://", "unix://")


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def safe_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages, logs and printed settings.

    Any text, not only a valid URL (an invalid one is echoed in its error): a `password=` query
    value, and whatever stands between the first `:` of the userinfo and the last `@`. No URL
    parser is used, since a password written unescaped may hold `/`, `?` or `#`, which a parser
    takes for the start of the path and would then print.
    """
    text = _QUERY_PASSWORD.sub(r"\1***", url)  # unix:///run/redis.sock?password=...
    scheme, sep, rest = text.partition("://")
    head, rest = (scheme + sep, rest) if sep else ("", text)
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return head + rest


def _mask_secrets(loc: Loc, value: Any) -> Any:
    """`value` as it may be echoed at `loc`: any text under `store` is masked like a store URL."""
    if not loc or loc[0] != "store":
        return value
    if isinstance(value, str):
        return safe_url(value)
    if isinstance(value, list | tuple):
        return [_mask_secrets(loc, item) for item in value]
    return value


class StoreSettings(_Section):
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
    def _is_a_redis_url(cls, value: str) -> str:
        if not value.startswith(STORE_URL_SCHEMES):
            raise ValueError(
                "must be a Redis URL starting with redis://, rediss:// or unix://, e.g. redis://127.0.0.1:6379/0"
            )
        return value

    @field_validator("key_prefix")
    @classmethod
    def _printable_prefix(cls, value: str) -> str:
        if not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError('must be printable with no spaces, e.g. "mcp-sessions:"')
        return value


class ToolSettings(_Section):
    timeout_seconds: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Deadline of this tool's calls."
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Calls of this tool active at once (within the global cap)."
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
            for key in _TOOL_TIMEOUT_KEYS:
                value = getattr(tool, key)
                if value is not None and value > cap:
                    raise PydanticCustomError(
                        _ABOVE_CAP,
                        "tools.{name}.{key} ({value}) must not exceed limits.max_timeout_seconds ({cap})",
                        {"name": name, "key": key, "value": value, "cap": cap},
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


#: The same shape as `Settings` without its sources (and so without the `BaseSettings` init
#: parameters such as `_env_file`, which must not be settable from a file): validates plain data.
_LAYOUT_FIELDS: dict[str, Any] = {name: (field.annotation, field) for name, field in Settings.model_fields.items()}
_Layout: type[BaseModel] = create_model("_Layout", __config__=ConfigDict(extra="forbid"), **_LAYOUT_FIELDS)

_SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerSettings,
    "limits": LimitsSettings,
    "shutdown": ShutdownSettings,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
    "store": StoreSettings,
}
_FLAGS = {("server", "transport"), ("server", "host"), ("server", "port")}
_FLOAT = TypeAdapter(float)


# -- reading the sources -----------------------------------------------------------------


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse one TOML file, turning every failure into a ConfigError that names the file."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{file}: config file not found (check the --config path)"], sourced=True) from None
    except IsADirectoryError:
        raise ConfigError(
            [f"{file}: is a directory, not a config file (give the path of a .toml file)"], sourced=True
        ) from None
    except PermissionError:
        raise ConfigError([f"{file}: cannot read the config file: permission denied"], sourced=True) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: invalid TOML: {exc}"], sourced=True) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: invalid TOML: the file is not UTF-8 ({exc.reason})"], sourced=True) from None


def _env_path(name: str) -> list[str] | None:
    if not name.upper().startswith(ENV_PREFIX):
        return None
    return name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)


def _read_env() -> tuple[dict[str, Any], list[str]]:
    """The `MCP_SESSIONS_*` variables nested like the file (values still text), and their problems."""
    problems = _env_name_problems()
    source = EnvSettingsSource(Settings)
    try:
        return dict(source()), problems
    except SettingsError as exc:
        not_json = _env_json_problems()
        problems += [problem for _, problem in not_json] or [f"environment: {exc}"]
    # Read the other variables without the ones that are not JSON, so that their problems are
    # reported too, not only after the JSON is fixed.
    skipped = {name.lower() for name, _ in not_json}
    source.env_vars = {name: value for name, value in source.env_vars.items() if name.lower() not in skipped}
    try:
        return dict(source()), problems
    except SettingsError:
        return {}, problems


def _env_name_problems() -> list[str]:
    """Variables that look meant for us but name no key (the environment source would ignore them)."""
    problems = []
    for name in sorted(os.environ):
        path = _env_path(name)
        if path is None:
            continue
        if len(path) > 1 and path[0] not in Settings.model_fields:
            problems.append(f"environment variable {name}: {'.'.join(path)}: {_unknown_key(path[0], ())}")
            continue
        for section, model in _SECTIONS.items():
            for key in model.model_fields:
                if path == [f"{section}_{key}"]:
                    fixed = ENV_PREFIX + f"{section}{ENV_NESTED_DELIMITER}{key}".upper()
                    problems.append(
                        f"environment variable {name}: {section}.{key}: "
                        f"nested keys are separated by two underscores; did you mean {fixed}?"
                    )
    return problems


def _env_json_problems() -> list[tuple[str, str]]:
    """Variables for a list or a table whose value is not JSON (the environment source gave up on them),
    with their problems."""
    problems = []
    for name, value in sorted(os.environ.items()):
        path = _env_path(name)
        if path is None or not path or path[0] not in Settings.model_fields:
            continue
        takes_json = (
            len(path) == 1
            or path in (["server", "tool_modules"], ["server", "allowed_hosts"])
            or (path[0] == "tools" and len(path) == 2)
        )
        if not takes_json:
            continue
        try:
            json.loads(value)
        except ValueError:
            example = _json_example(path)
            shape = "a list" if example.startswith("[") else "a table"
            problems.append(
                (
                    name,
                    f"environment variable {name}: {'.'.join(path)}: must be JSON for {shape}, "
                    f"e.g. {name}='{example}' (got {_show(_mask_secrets(tuple(path), value))})",
                )
            )
    return problems


#: A key of each section to show in the example of a section given as one JSON variable.
_SECTION_EXAMPLES: dict[str, tuple[str, Any]] = {
    "server": ("port", 8765),
    "limits": ("max_concurrent_sessions", 100),
    "shutdown": ("timeout_seconds", 30.0),
    "logging": ("level", "info"),
    "metrics": ("prometheus_port", 9100),
    "store": ("backend", "redis"),
}


def _json_example(path: list[str]) -> str:
    """A JSON value of the shape the key at `path` takes: a list for lists, a table for tables."""
    if path == ["server", "tool_modules"]:
        return '["tools.demo"]'
    if path == ["server", "allowed_hosts"]:
        return f'["{_HOST_EXAMPLE}"]'
    if path == ["tools"]:
        return '{"my_tool": {"timeout_seconds": 60}}'
    if path[0] == "tools":
        return '{"timeout_seconds": 60}'
    key, value = _SECTION_EXAMPLES[path[0]]
    return json.dumps({key: value})


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge tables; a later layer wins."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            previous = result.get(key)
            if isinstance(value, Mapping) and isinstance(previous, Mapping):
                result[key] = _merge(previous, value)
            else:
                result[key] = value
    return result


# -- describing problems -----------------------------------------------------------------


def _has_path(data: Any, path: Loc) -> bool:
    node = data
    for part in path:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def _show(value: Any) -> str:
    """A value as the user wrote it (TOML spelling), shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, datetime | date | time):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _known_keys(parent: Loc) -> list[str]:
    if parent == ():
        return list(Settings.model_fields)
    if len(parent) == 1 and parent[0] in _SECTIONS:
        return list(_SECTIONS[str(parent[0])].model_fields)
    if len(parent) == 2 and parent[0] == "tools":
        return list(ToolSettings.model_fields)
    return []


def _unknown_key(key: str | int, parent: Loc) -> str:
    known = _known_keys(parent)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    if known:
        return f"unknown key; the keys here are {', '.join(known)}"
    return "unknown key"


def _bounds(loc: Loc) -> tuple[Any, Any]:
    """The (lower, upper) inclusive bounds declared on the field at `loc`, where both exist."""
    if len(loc) != 2 or loc[0] not in _SECTIONS:
        return None, None
    field = _SECTIONS[str(loc[0])].model_fields.get(str(loc[1]))
    low = next((m.ge for m in field.metadata if isinstance(m, Ge)), None) if field else None
    high = next((m.le for m in field.metadata if isinstance(m, Le)), None) if field else None
    return low, high


_TABLE_TYPES = ("model_type", "model_attributes_type", "dict_type")


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown_key(loc[-1], loc[:-1])
    if kind in ("greater_than_equal", "less_than_equal"):
        low, high = _bounds(loc)
        if low is not None and high is not None:
            return f"must be between {low} and {high}"
        return f"must be at least {ctx['ge']}" if kind == "greater_than_equal" else f"must be at most {ctx['le']}"
    if kind == "greater_than":
        return f"must be greater than {_show(ctx['gt'])}"
    simple = {
        "int_type": "must be a whole number",
        "int_parsing": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number (nan and inf are not allowed)",
        "string_type": "must be a string (in quotes)",
        "string_too_short": "must not be empty",
        "tuple_type": 'must be a list, e.g. ["tools.demo"]',
        "list_type": 'must be a list, e.g. ["tools.demo"]',
    }
    if kind in simple:
        return simple[kind]
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind in _TABLE_TYPES:
        key = ".".join(map(str, loc))
        return f"must be a table ([{key}] with its own keys), not a single value"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"]).replace("Input should be", "must be")


class _Sources:
    """Where each key's value came from: the flags, the environment, the file or the defaults."""

    def __init__(
        self, file: Path | None, file_data: Mapping[str, Any], env: Mapping[str, Any], flags: Mapping[str, Any]
    ) -> None:
        self.file = file
        self.layers = (("flags", flags), ("env", env), ("file", file_data))

    def origin(self, loc: Loc, exact: bool = False) -> str | None:
        """The layer the value at `loc` comes from (else the one holding its nearest parent, unless `exact`)."""
        for depth in range(len(loc), len(loc) - 1 if exact else 0, -1):
            for layer, data in self.layers:
                if _has_path(data, loc[:depth]):
                    return layer
        return None

    def describe(self, loc: Loc, exact: bool = False) -> str:
        layer = self.origin(loc, exact)
        if layer == "flags":
            return f"command line option --{loc[1]}" if loc[:2] in _FLAGS else "command line"
        if layer == "env":
            for depth in range(len(loc), 0, -1):
                wanted = ENV_PREFIX + ENV_NESTED_DELIMITER.join(map(str, loc[:depth])).upper()
                for name in os.environ:
                    if name.upper() == wanted:
                        return f"environment variable {name}"
            # A table set key by key (MCP_SESSIONS_TOOLS__ECHO__TIMEOUT_SECONDS for tools.echo).
            wanted = ENV_PREFIX + ENV_NESTED_DELIMITER.join(map(str, loc)).upper() + ENV_NESTED_DELIMITER
            names = sorted(name for name in os.environ if name.upper().startswith(wanted))
            if names:
                return f"environment variable{'s' if len(names) > 1 else ''} {', '.join(names)}"
            return "environment"
        if layer == "file" and self.file is not None:
            return str(self.file)
        return "built-in default"

    def problem(self, loc: Loc, reason: str, value: Any = None, show: bool = False) -> str:
        key = ".".join(map(str, loc))
        got = f" (got {_show(value)})" if show else ""
        return f"{self.describe(loc)}: {key}: {reason}{got}"

    def error(self, error: ErrorDetails) -> str:
        loc: Loc = tuple(error["loc"])
        value = error.get("input")
        secret = loc == ("shutdown", "admin_token_env")  # might be the token itself: never echo it
        show = error["type"] != "extra_forbidden" and not isinstance(value, Mapping) and not secret
        reason = _reason(error)
        if error["type"] in _TABLE_TYPES and isinstance(value, str) and self.origin(loc, exact=True) == "env":
            name = self.describe(loc).removeprefix("environment variable ")
            reason = f"must be JSON for a table, e.g. {name}='{_json_example([str(part) for part in loc])}'"
        return self.problem(loc, reason, _mask_secrets(loc, value), show)


def _effective_float(merged: Mapping[str, Any], loc: Loc, bad: set[Loc]) -> float | None:
    """The value in force at `loc` if it is a valid number on its own, else None (already reported)."""
    if any(loc[:depth] in bad for depth in range(1, len(loc) + 1)):
        return None
    if _has_path(merged, loc):
        raw: Any = merged
        for part in loc:
            raw = raw[part]
    elif loc[0] == "limits":
        raw = LimitsSettings.model_fields[str(loc[1])].default
    else:
        return None
    try:
        return _FLOAT.validate_python(raw)
    except ValidationError:
        return None


def _cap_problems(merged: Mapping[str, Any], bad: set[Loc], sources: _Sources) -> list[tuple[Loc, str]]:
    """The cross-key checks (timeouts within limits.max_timeout_seconds), on the merged values."""
    cap_loc: Loc = ("limits", "max_timeout_seconds")
    default_loc: Loc = ("limits", "default_timeout_seconds")
    cap = _effective_float(merged, cap_loc, bad)
    if cap is None:
        return []

    def above_cap(loc: Loc) -> str:
        where = sources.describe(cap_loc, exact=True)
        if where == sources.describe(loc):
            where = "in this file" if sources.origin(loc) == "file" else f"(also from {where})"
        else:
            where = f"({where})"
        return f"must not exceed limits.max_timeout_seconds, which is {_show(cap)} {where}; lower it or raise the cap"

    problems: list[tuple[Loc, str]] = []
    default = _effective_float(merged, default_loc, bad)
    if default is not None and default > cap:
        if sources.origin(default_loc, exact=True) is not None:
            reason = above_cap(default_loc)
            problems.append((default_loc, sources.problem(default_loc, reason, default, show=True)))
        else:
            reason = (
                f"must be at least limits.default_timeout_seconds, which is {_show(default)} (built-in default); "
                "raise it or set a lower limits.default_timeout_seconds"
            )
            problems.append((cap_loc, sources.problem(cap_loc, reason, cap, show=True)))
    tools = merged.get("tools")
    if isinstance(tools, Mapping):
        for name in tools:
            for key in _TOOL_TIMEOUT_KEYS:
                loc: Loc = ("tools", name, key)
                value = _effective_float(merged, loc, bad)
                if value is not None and value > cap:
                    reason = above_cap(loc)
                    problems.append((loc, sources.problem(loc, reason, value, show=True)))
    return problems


def _host_problems(merged: Mapping[str, Any], bad: set[Loc], sources: _Sources) -> list[tuple[Loc, str]]:
    """The off-loopback check (streamable HTTP on a public interface needs server.allowed_hosts),
    on the merged values, so that it is reported with the other problems and names each source."""
    server = merged.get("server", {})
    keys = {"transport", "host", "allowed_hosts"}
    if not isinstance(server, Mapping) or any(loc[:1] == ("server",) and set(loc[1:2]) <= keys for loc in bad):
        return []
    defaults = ServerSettings.model_fields
    transport = server.get("transport", defaults["transport"].default)
    host = server.get("host", defaults["host"].default)
    if transport != "streamable-http" or is_loopback(host) or server.get("allowed_hosts"):
        return []
    host_loc: Loc = ("server", "host")
    where = sources.describe(("server", "transport"), exact=True)
    also = "" if where == sources.describe(host_loc) else f' and server.transport is "streamable-http" ({where})'
    reason = f"is not a loopback address{also}, {_OPEN_HOST_REASON}"
    return [(host_loc, sources.problem(host_loc, reason, host, show=True))]


def _section_order(loc: Loc) -> int:
    fields = list(Settings.model_fields)
    return fields.index(str(loc[0])) if loc and loc[0] in fields else len(fields)


# -- loading -----------------------------------------------------------------------------


def load_settings(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load settings from `path` (TOML), the environment and `overrides`, in rising priority.

    `overrides` is nested like the file (`{"server": {"port": 9000}}`); the CLI passes its flags
    this way. With no path, the built-in defaults (the same as `config/default.toml`) are the base.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, or a value has the wrong
            type or is out of bounds. Every problem of the file, the environment and `overrides`
            is reported, one per line (an unreadable file alone, since nothing else can be checked).
    """
    file = Path(path) if path is not None else None
    file_data = read_toml(file) if file is not None else {}
    env, env_problems = _read_env()
    flags = dict(overrides or {})
    sources = _Sources(file, file_data, env, flags)
    merged = _merge(file_data, env, flags)

    found: dict[Loc, str] = {}

    def record(exc: ValidationError, keep: set[str | None]) -> None:
        for error in exc.errors():
            loc: Loc = tuple(error["loc"])
            # The cross-key checks are worded below, from the merged values and each one's source.
            if error["type"] not in (_ABOVE_CAP, _OPEN_HOST) and sources.origin(loc) in keep:
                found.setdefault(loc, sources.error(error))

    # The file alone, strictly: TOML has types, so `port = "80"` or `true` for a number is a mistake.
    try:
        _Layout.model_validate(file_data, strict=True)
    except ValidationError as exc:
        record(exc, {"file"})
    # Everything merged; values from the environment are text, so this pass parses them.
    checked: BaseModel | None = None
    cross_key: list[str] = []  # pydantic's own wording, should the checks below find nothing
    try:
        checked = _Layout.model_validate(merged)
    except ValidationError as exc:
        record(exc, {"flags", "env", "file", None})
        cross_key = [sources.error(error) for error in exc.errors() if error["type"] in (_ABOVE_CAP, _OPEN_HOST)]
    if checked is not None and not found and not env_problems:
        try:
            return Settings(**{name: getattr(checked, name) for name in Settings.model_fields})
        except ValidationError as exc:  # only the cross-key checks are left to fail here
            cross_key = [sources.error(error) for error in exc.errors()]
    # Pydantic skips the cross-key checks once a field fails; run them on whatever is valid.
    bad = set(found)
    for loc, problem in _cap_problems(merged, bad, sources) + _host_problems(merged, bad, sources):
        found.setdefault(loc, problem)
    ordered = sorted(found.items(), key=lambda item: _section_order(item[0]))
    raise ConfigError(env_problems + [problem for _, problem in ordered] or cross_key, sourced=True)
