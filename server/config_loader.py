"""Loading the settings: the TOML file, the environment and the command-line flags, merged
and validated, with every problem worded by where it came from.

Tier: runtime foundation (beside `server.config`, which defines what valid settings are).
Sources, highest priority first: explicit overrides (the CLI flags), the environment
(`MCP_SESSIONS_` prefix, `__` between nested keys), the TOML file, and the built-in defaults
(which `config/default.toml` spells out).

`load_settings` reports every problem of the settings at once (an unreadable file alone), one
per line, as `SOURCE: key.path: reason (got VALUE)`, where SOURCE is the file, the environment
variable or the command-line option the value came from, for example:

    bad.toml: limits.max_concurent_sessions: unknown key; did you mean 'max_concurrent_sessions'?
    bad.toml: server.port: must be between 1 and 65535 (got 70000)

Values in the file must have the type the key needs (`port = "80"` and `true` for a number
are errors); values from the environment are text and are parsed, but JSON's `true` and `false`
in a table's variable are no number either (`MCP_SESSIONS_SERVER='{"port": true}'`).

The standalone server's own checks (tool modules, `[tools.NAME]` names) need valid settings, so
they run after `load_settings`; `config_problems` names the source of their keys the same way.
"""

from __future__ import annotations

import difflib
import errno
import json
import math
import os
import stat
import tomllib
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from annotated_types import Ge, Le
from pydantic import (
    BaseModel,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    create_model,
)
from pydantic_core import ErrorDetails
from pydantic_settings import EnvSettingsSource
from pydantic_settings.exceptions import SettingsError

from server.config import (
    ABOVE_CAP,
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    HOST_EXAMPLE,
    OPEN_HOST,
    OPEN_HOST_REASON,
    PORT_CLASH,
    PORT_CLASH_REASON,
    TOOL_TIMEOUT_KEYS,
    ConfigError,
    LimitsSettings,
    Loc,
    LoggingSettings,
    MetricsSettings,
    ServerSettings,
    Settings,
    ShutdownSettings,
    StoreSettings,
    ToolSettings,
    is_loopback,
    mask_secrets,
)
from server.toml_keys import dotted_key, key_set_twice, parse_dotted_key, readable_toml_error


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
        loc: Loc = (parse_dotted_key(key) or ()) if sep else ()
        if loc and sources.origin(loc) is not None:
            named.append(f"{sources.describe(loc)}: {problem}")
        else:
            named.append(f"{path}: {problem}" if path is not None else problem)
    return named


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


#: The hint of a config path that cannot be read: the CLI's --config, or a host's load_settings(path).
_CHECK_PATH = "(check the path given with --config, or to load_settings)"


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse one TOML file, turning every failure into a ConfigError that names the file.

    Only a regular file (after symlinks) is read: a FIFO, a device or a socket is refused without
    being opened for reading, which could wait forever. A UTF-8 byte-order mark at the start (as
    some Windows editors write) is skipped.
    """
    if not os.fspath(path):  # Path("") would read as ".", the working directory
        raise ConfigError(
            ["the config path is empty: give the path of a .toml file (or no --config, for the built-in defaults)"],
            sourced=True,
        )
    file = Path(path)
    try:
        data = _read_regular_file(file)
    except FileNotFoundError:
        raise ConfigError([f"{file}: config file not found {_CHECK_PATH}"], sourced=True) from None
    except PermissionError:
        raise ConfigError([f"{file}: cannot read the config file: permission denied"], sourced=True) from None
    except _NotRegular as exc:
        raise ConfigError([f"{file}: {exc.reason}"], sourced=True) from None
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the config file: {_os_error(exc)}"], sourced=True) from None
    try:
        text = data.removeprefix(UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: invalid TOML: {_not_utf8(data, exc)}"], sourced=True) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = f"{readable_toml_error(str(exc))}{key_set_twice(text, str(exc))}"
        raise ConfigError([f"{file}: invalid TOML: {message}"], sourced=True) from None
    except RecursionError:  # the parser recurses per level of nested arrays or inline tables
        raise ConfigError(
            [f"{file}: invalid TOML: arrays or inline tables nest too deeply to be read (a config nests a few levels)"],
            sourced=True,
        ) from None


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where the file stops being UTF-8, and how to fix it (a UTF-16 file, as Windows' "Unicode"
    saves, says so)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "the file is UTF-16 (a byte-order mark says so), not UTF-8: save it as UTF-8"
    start = exc.start + (len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0)
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return (
        f"the file is not UTF-8 ({exc.reason}: byte 0x{data[start]:02x} at line {line}, column {column}); "
        "save it as UTF-8"
    )


#: The UTF-8 encoding of U+FEFF, which some editors write at the start of a text file.
UTF8_BOM = b"\xef\xbb\xbf"


class _NotRegular(Exception):
    """The path names something that is not a regular file; `reason` says what it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _kind(mode: int) -> str | None:
    """Why a file of this `st_mode` is no config file, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a config file (give the path of a .toml file)"
    kinds = {
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    what = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return (
        f"is {what}, not a regular file: the config must be a regular file (or a symlink to one), "
        "which is read whole; write the settings to a .toml file and give its path"
    )


def _read_regular_file(file: Path) -> bytes:
    """The bytes of `file` if it is a regular file (symlinks followed); raises OSError or `_NotRegular`.

    What the path names is checked before it is opened, and again on the descriptor, which is
    opened non-blocking: a FIFO put in the file's place in between is refused, not waited on.
    """
    reason = _kind(os.stat(file).st_mode)
    if reason is not None:
        raise _NotRegular(reason)
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as handle:
        reason = _kind(os.fstat(fd).st_mode)
        if reason is not None:
            raise _NotRegular(reason)
        return handle.read()


def _os_error(exc: OSError) -> str:
    """An OS error reading the config file, as a reason: the system's wording, and a hint where one helps."""
    text = exc.strerror or str(exc)
    hints = {
        errno.ENOTDIR: f"part of the path is a file, not a directory {_CHECK_PATH}",
        errno.ELOOP: f"the path is a symlink loop {_CHECK_PATH}",
        errno.ENAMETOOLONG: f"the path or one of its names is too long {_CHECK_PATH}",
    }
    hint = hints.get(exc.errno) if exc.errno is not None else None
    return f"{text}; {hint}" if hint else text


def _env_path(name: str) -> list[str] | None:
    if not name.upper().startswith(ENV_PREFIX):
        return None
    return name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)


def _read_env() -> tuple[dict[str, Any], list[str]]:
    """The `MCP_SESSIONS_*` variables nested like the file (values still text), and their problems."""
    problems = _env_name_problems() + _env_null_tables()
    source = EnvSettingsSource(Settings)
    try:
        return dict(source()), problems
    except (SettingsError, RecursionError) as exc:  # (JSON nested too deeply for the reader: RecursionError)
        not_json = _env_json_problems()
        problems += [problem for _, problem in not_json] or [f"environment: {exc}"]
    # Read the other variables without the ones that are not JSON, so that their problems are
    # reported too, not only after the JSON is fixed.
    skipped = {name.lower() for name, _ in not_json}
    source.env_vars = {name: value for name, value in source.env_vars.items() if name.lower() not in skipped}
    try:
        return dict(source()), problems
    except (SettingsError, RecursionError):
        return {}, problems


def _env_name_problems() -> list[str]:
    """Variables that look meant for us but name no key (the environment source would ignore them):
    an unknown section, a section and its key joined by one underscore, a key without its section.
    Any other name is left alone (a token variable such as MCP_SESSIONS_ADMIN_TOKEN)."""
    problems = []
    for name in sorted(os.environ):
        path = _env_path(name)
        if path is None:
            continue
        if len(path) > 1 and path[0] not in Settings.model_fields:
            problems.append(f"environment variable {name}: {dotted_key(tuple(path))}: {_unknown_key(path[0], ())}")
            continue
        for section, model in _SECTIONS.items():
            for key in model.model_fields:
                if path == [f"{section}_{key}"]:
                    fixed = ENV_PREFIX + f"{section}{ENV_NESTED_DELIMITER}{key}".upper()
                    problems.append(
                        f"environment variable {name}: {section}.{key}: "
                        f"nested keys are separated by two underscores; did you mean {fixed}?"
                    )
        if len(path) == 1 and path[0] not in Settings.model_fields:
            meant = _env_names_of_key(path[0])
            if meant:
                where = meant[0] if len(meant) == 1 else f"{', '.join(meant[:-1])} or {meant[-1]}"
                problems.append(
                    f"environment variable {name}: {path[0]}: names a key but not its table; did you mean {where}?"
                )
    return problems


def _env_names_of_key(key: str) -> list[str]:
    """The variables for `key` in each table that has it (`max_concurrent_sessions`:
    MCP_SESSIONS_LIMITS__MAX_CONCURRENT_SESSIONS), for a variable that names the key alone."""
    sections = [section for section, model in _SECTIONS.items() if key in model.model_fields]
    if key in ToolSettings.model_fields:
        sections.append(f"tools{ENV_NESTED_DELIMITER}<name>")
    return [
        ENV_PREFIX + f"{section}{ENV_NESTED_DELIMITER}{key}".upper().replace("<NAME>", "<name>") for section in sections
    ]


def _env_null_tables() -> list[str]:
    """Variables that set a whole table to JSON's `null` (`MCP_SESSIONS_LIMITS=null`): the
    environment source drops them, and the file's table would stay in force unsaid."""
    problems = []
    for name, value in sorted(os.environ.items()):
        path = _env_path(name)
        if path is None or len(path) != 1 or path[0] not in Settings.model_fields:
            continue
        if _json_value(value) is None:  # (text that is no JSON is reported by `_env_json_problems`)
            problems.append(f"environment variable {name}: {path[0]}: {_not_an_object(name, path)} (got null)")
    return problems


#: What `_json_value` gives for text that is not JSON (or nests too deep to be read).
_NOT_JSON = object()


def _json_value(text: str) -> Any:
    """`text` read as JSON, or `_NOT_JSON`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _not_an_object(name: str, path: list[str]) -> str:
    """The reason for JSON from the variable `name` that is not the object the table at `path`
    takes: the example is the variable's own where it sets that table (else the table's value)."""
    example = _json_example(path)
    return (
        f"must be a JSON object, e.g. {name}='{example}'"
        if _env_path(name) == path
        else f"must be a JSON object, e.g. {example}"
    )


def _env_json_problems() -> list[tuple[str, str]]:
    """Variables for a list or a table whose value is not JSON, or nests too deep (the environment
    source gave up on them), with their problems."""
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
            too_deep = _levels(json.loads(value)) > MAX_JSON_LEVELS
        except RecursionError:
            too_deep = True
        except ValueError:
            example = _json_example(path)
            shape = "a list" if example.startswith("[") else "a table"
            problems.append(
                (
                    name,
                    f"environment variable {name}: {dotted_key(tuple(path))}: must be JSON for {shape}, "
                    f"e.g. {name}='{example}' (got {_show(mask_secrets(tuple(path), value))})",
                )
            )
            continue
        if too_deep:  # (the environment source's reader, deeper in the stack, may give up on it: RecursionError)
            problems.append(
                (
                    name,
                    f"environment variable {name}: {dotted_key(tuple(path))}: its JSON nests more than "
                    f"{MAX_JSON_LEVELS} levels deep (a config value nests a few)",
                )
            )
    return problems


#: A variable the environment source gave up on is said to nest too deep past this many levels: a
#: config value nests a few, and the source's JSON reader fails (RecursionError) near a thousand,
#: sooner or later than `json.loads` here depending on the stack.
MAX_JSON_LEVELS = 32


def _levels(value: Any) -> int:
    """How deep `value` (parsed JSON) nests: 0 for a scalar, 1 for a flat list or object."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


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
        return f'["{HOST_EXAMPLE}"]'
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


def _at(data: Any, path: Loc) -> Any:
    """The value at `path` in `data` (see `_has_path`)."""
    node = data
    for part in path:
        node = node[part]
    return node


def _show(value: Any, depth: int = 0) -> str:
    """A value as the user wrote it (TOML spelling), shortened (the first items of a long list,
    the outer levels of nested ones)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:  # (JSON's null, from a variable, or None in a host's overrides)
        text = "null"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, list | tuple):
        if depth >= _SHOWN_LEVELS:
            text = "[...]" if value else "[]"
        else:
            items = [_show(item, depth + 1) for item in value[:_SHOWN_ITEMS]]
            if len(value) > _SHOWN_ITEMS:
                items.append("...")
            text = "[" + ", ".join(items) + "]"
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, datetime | date | time):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


#: How much of a list `_show` spells out: its first items, and the outer levels of nested lists
#: (the text is cut to 100 characters anyway; a file may nest hundreds of levels).
_SHOWN_ITEMS = 20
_SHOWN_LEVELS = 5


def _known_keys(parent: Loc) -> list[str]:
    if parent == ():
        return list(Settings.model_fields)
    if len(parent) == 1 and parent[0] in _SECTIONS:
        return list(_SECTIONS[str(parent[0])].model_fields)
    if len(parent) == 2 and parent[0] == "tools":
        return list(ToolSettings.model_fields)
    return []


def _homes(key: str, parent: Loc) -> list[str]:
    """The other tables where `key` is a known key, as dotted paths (`limits.max_concurrent_sessions`)."""
    homes = [
        f"{section}.{key}" for section, model in _SECTIONS.items() if (section,) != parent and key in model.model_fields
    ]
    if key in ToolSettings.model_fields and not (len(parent) == 2 and parent[0] == "tools"):
        homes.append(f"tools.<name>.{key}")
    return homes


def _belongs(homes: list[str]) -> str:
    """Where a key in the wrong table belongs: `it belongs in [limits] (limits.max_concurrent_sessions)`."""
    tables = [f"[{home.rpartition('.')[0]}]" for home in homes]
    where = tables[0] if len(tables) == 1 else f"{', '.join(tables[:-1])} or {tables[-1]}"
    return f"it belongs in {where} ({', '.join(homes)})"


def _unknown_key(key: str | int, parent: Loc, value: Any = None) -> str:
    known = _known_keys(parent)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    homes = _homes(str(key), parent)
    # A key of another table, written in this one, unless this table has a near-twin of it (a
    # typo here is likelier than a misplaced key that happens to look like one of its keys).
    if homes and not (close and difflib.SequenceMatcher(None, str(key), close[0]).ratio() >= 0.85):
        return f"unknown key here; {_belongs(homes)}"
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    if parent == () and isinstance(value, Mapping) and value and set(value) <= set(ToolSettings.model_fields):
        return f"unknown key; per-tool settings belong in [{dotted_key(('tools', str(key)))}]"
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
#: An example of each list the file holds, for the message of a value that is not a list.
_LIST_EXAMPLES = {"tool_modules": '["tools.demo"]', "allowed_hosts": '["mcp.example.com:*"]'}


def _bound(value: float) -> str:
    """A bound as it would be written: a large float as 1e9, not 1000000000.0."""
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"{value:g}".replace("e+0", "e").replace("e+", "e")
    return str(value)


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown_key(loc[-1], loc[:-1], error.get("input"))
    if kind in ("greater_than_equal", "less_than_equal"):
        low, high = _bounds(loc)
        if low is not None and high is not None:
            return f"must be between {low} and {high}"
        if kind == "greater_than_equal":
            if loc[:1] == ("tools",) and loc[-1] == "max_concurrent":
                return f"must be at least {_bound(ctx['ge'])}; for no cap on the tool, leave max_concurrent out"
            return f"must be at least {_bound(ctx['ge'])}"
        return f"must be at most {_bound(ctx['le'])}"
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
    }
    if kind in simple:
        return simple[kind]
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, e.g. {_LIST_EXAMPLES.get(str(loc[-1]), '[...]')}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind in _TABLE_TYPES:
        key = dotted_key(loc)
        homes = _homes(str(loc[-1]), ("tools",)) if len(loc) == 2 and loc[0] == "tools" else []
        if homes:  # `[tools] tool_modules = [...]`: a key of another table, not a tool
            return f"is not a tool's table but a key of another table: {_belongs(homes)}"
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
            # The CLI passes only its flags; any other key comes from a host's `overrides`.
            return f"command line option --{loc[1]}" if loc[:2] in _FLAGS else "overrides passed to load_settings"
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
        key = dotted_key(loc)
        got = f" (got {_show(value)})" if show else ""
        return f"{self.describe(loc)}: {key}: {reason}{got}"

    def as_written(self, loc: Loc, value: Any) -> Any:
        """The value at `loc` as its source holds it, for `value` as pydantic reports it. Pydantic
        reports a value after the field's before-validators (`logging.level = "WARN"` as "warn"),
        and a problem quotes what the user wrote. A table is left as reported: it may be merged
        from several sources."""
        if isinstance(value, Mapping):
            return value
        for _, data in self.layers:
            if loc and _has_path(data, loc):
                return _at(data, loc)
        return value

    def error(self, error: ErrorDetails) -> str:
        loc: Loc = tuple(error["loc"])
        value = self.as_written(loc, error.get("input"))
        secret = loc == ("shutdown", "admin_token_env")  # might be the token itself: never echo it
        show = error["type"] != "extra_forbidden" and not isinstance(value, Mapping) and not secret
        reason = _reason(error)
        if loc == ("server", "host") and self.origin(loc, exact=True) == "flags":
            reason = reason.replace("in server.port", "with --port")  # the fix on the same command line
        if isinstance(value, Mapping) and error["type"] not in _TABLE_TYPES and error["type"] != "extra_forbidden":
            # A table where a value belongs: a key one level too deep, say ([limits.max_queued]
            # with keys of its own, or MCP_SESSIONS_LIMITS__MAX_QUEUED__X). Its keys are named,
            # never its values (they might be secrets).
            names = ", ".join(_show(str(name)) for name in list(value)[:5]) + (", ..." if len(value) > 5 else "")
            reason = f"{reason}, not a table (got a table with the key{'s' if len(value) > 1 else ''} {names})"
        if error["type"] in _TABLE_TYPES and self.origin(loc, exact=True) == "env":
            name = self.describe(loc).removeprefix("environment variable ")
            path = [str(part) for part in loc]
            text = os.environ.get(name, "")
            if isinstance(value, str) and _env_path(name) == path and _json_value(text) is _NOT_JSON:
                reason = f"must be JSON for a table, e.g. {name}='{_json_example(path)}'"  # its text, not JSON
            else:  # JSON, but not an object: null, a number, a list, a string inside the variable's JSON
                reason = _not_an_object(name, path)
        return self.problem(loc, reason, mask_secrets(loc, value), show)


def _effective_float(merged: Mapping[str, Any], loc: Loc, bad: set[Loc]) -> float | None:
    """The value in force at `loc` if it is a valid number on its own, else None (already reported)."""
    if any(loc[:depth] in bad for depth in range(1, len(loc) + 1)):
        return None
    if _has_path(merged, loc):
        raw = _at(merged, loc)
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
            for key in TOOL_TIMEOUT_KEYS:
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
    reason = f"is not a loopback address{also}, {OPEN_HOST_REASON}"
    return [(host_loc, sources.problem(host_loc, reason, host, show=True))]


_EXPORTER_PORT: Loc = ("metrics", "prometheus_port")


def _port_problems(merged: Mapping[str, Any], bad: set[Loc], sources: _Sources) -> list[tuple[Loc, str]]:
    """The exporter's port must not be the HTTP transport's own (it would fail to start, and the
    transport then with it, blamed on server.port): checked on the merged values."""
    server, metrics = merged.get("server", {}), merged.get("metrics", {})
    watched: set[Loc] = {("server",), ("metrics",), ("server", "transport"), ("server", "port")}
    if not isinstance(server, Mapping) or not isinstance(metrics, Mapping) or bad & (watched | {_EXPORTER_PORT}):
        return []  # each already reported as a problem of its own
    defaults = ServerSettings.model_fields
    transport = server.get("transport", defaults["transport"].default)
    port = server.get("port", defaults["port"].default)
    exporter = metrics.get("prometheus_port", 0)
    try:
        if transport != "streamable-http" or not exporter or int(exporter) != int(port):
            return []
    except (TypeError, ValueError):
        return []  # reported as the field's own problem
    loc = _EXPORTER_PORT
    port_loc: Loc = ("server", "port")
    if sources.origin(port_loc, exact=True) is None:
        same = "(built-in default)"
    elif sources.origin(port_loc, exact=True) == sources.origin(loc, exact=True) == "file":
        same = "in this file"
    else:
        same = f"({sources.describe(port_loc, exact=True)})"
    reason = f"is server.port too, {_show(port)} {same}: {PORT_CLASH_REASON}"
    return [(loc, sources.problem(loc, reason, exporter, show=True))]


def _field_at(loc: Loc) -> Any:
    """The pydantic field a leaf key path names (`("limits", "max_queued")`,
    `("tools", "echo", "timeout_seconds")`), or None."""
    if len(loc) == 2 and loc[0] in _SECTIONS:
        return _SECTIONS[str(loc[0])].model_fields.get(str(loc[1]))
    if len(loc) == 3 and loc[0] == "tools":
        return ToolSettings.model_fields.get(str(loc[2]))
    return None


def _env_bool_problems(env: Mapping[str, Any], sources: _Sources) -> dict[Loc, str]:
    """JSON's `true` and `false` in a variable that holds a table (`MCP_SESSIONS_LIMITS=
    '{"max_queued": true}'`) where a number belongs, worded as the file's `max_queued = true` is.
    The pass over the merged values parses text, which is what a variable holds, and would take
    them as 1 and 0."""
    problems: dict[Loc, str] = {}

    def visit(data: Mapping[str, Any], loc: Loc) -> None:
        for key, value in data.items():
            here: Loc = (*loc, key)
            if isinstance(value, Mapping):
                visit(value, here)
                continue
            field = _field_at(here)
            if not isinstance(value, bool) or field is None:
                continue
            adapter: TypeAdapter[Any] = TypeAdapter(field.annotation)
            try:
                adapter.validate_python(value, strict=True)
            except ValidationError as exc:
                error = exc.errors()[0]
                problems[here] = sources.error(ErrorDetails(**{**error, "loc": here}))

    visit(env, ())
    return problems


def _section_order(loc: Loc) -> int:
    fields = list(Settings.model_fields)
    return fields.index(str(loc[0])) if loc and loc[0] in fields else len(fields)


# -- loading -----------------------------------------------------------------------------


#: Error types of the checks across keys, which `load_settings` words itself from the merged values.
CROSS_KEY = (ABOVE_CAP, OPEN_HOST, PORT_CLASH)


def overridden_in_file(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
) -> dict[str, tuple[Any, str]]:
    """The keys the file at `path` sets that the environment or `overrides` set too, so that
    the file's value is not the one `load_settings(path, overrides)` gives: dotted key -> (the
    file's value, what sets it, as problems name sources: "environment variable MCP_SESSIONS_...",
    "command line option --host").

    Raises:
        ConfigError: the file cannot be read (see `read_toml`).
    """
    file_data = read_toml(path)
    env, _ = _read_env()
    sources = _Sources(Path(path), file_data, env, dict(overrides or {}))
    found: dict[str, tuple[Any, str]] = {}

    def visit(data: Mapping[str, Any], loc: Loc) -> None:
        for key, value in data.items():
            if isinstance(value, Mapping):
                visit(value, (*loc, key))
            elif sources.origin((*loc, key)) != "file":
                found[dotted_key((*loc, key))] = (value, sources.describe((*loc, key)))

    visit(file_data, ())
    return found


def load_settings(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load settings from `path` (TOML), the environment and `overrides`, in rising priority.

    `overrides` is nested like the file (`{"server": {"port": 9000}}`); the CLI passes its flags
    this way. With no path, the built-in defaults (the same as `config/default.toml`) are the base.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, or a value has the wrong
            type or is out of bounds. Every problem of the file, the environment and `overrides`
            is reported, one per line (an unreadable file alone, since nothing else can be checked).
    """
    return load_settings_noting(path, overrides)[0]


def load_settings_noting(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[Settings, list[str]]:
    """`load_settings`, and the problems of values in the file that the environment or
    `overrides` replace, so that the settings pass without them: each worded as a problem of the
    file, then what replaces the value ("...; not in effect while environment variable
    MCP_SESSIONS_... sets it"). The file would fail once the override is gone: `--check-config`
    notes them, a start and a reload warn of them.

    Raises:
        ConfigError: as `load_settings`.
    """
    file_data = read_toml(path) if path is not None else {}  # (an empty path is refused, not read as ".")
    file = Path(path) if path is not None else None
    env, env_problems = _read_env()
    flags = dict(overrides or {})
    sources = _Sources(file, file_data, env, flags)
    merged = _merge(file_data, env, flags)

    found: dict[Loc, str] = {}
    hidden: list[str] = []  # the file's own problems, which something overrides

    def record(exc: ValidationError, keep: set[str | None]) -> None:
        for error in exc.errors():
            loc: Loc = tuple(error["loc"])
            # The cross-key checks are worded below, from the merged values and each one's source.
            if error["type"] not in CROSS_KEY and sources.origin(loc) in keep:
                found.setdefault(loc, sources.error(error))

    # The file alone, strictly: TOML has types, so `port = "80"` or `true` for a number is a mistake.
    try:
        _Layout.model_validate(file_data, strict=True)
    except ValidationError as exc:
        record(exc, {"file"})
        as_file = _Sources(file, file_data, {}, {})  # words a problem as the file's own
        for error in exc.errors():
            loc = tuple(error["loc"])
            if error["type"] not in CROSS_KEY and sources.origin(loc) not in ("file", None):
                hidden.append(f"{as_file.error(error)}; not in effect while {sources.describe(loc)} sets it")
    # JSON's `true` where a number belongs in a variable is a mistake, as in the file, not 1 (the
    # pass below parses text, and would take it as one).
    for loc, problem in _env_bool_problems(env, sources).items():
        found.setdefault(loc, problem)
    # Everything merged; values from the environment are text, so this pass parses them.
    checked: BaseModel | None = None
    cross_key: list[str] = []  # pydantic's own wording, should the checks below find nothing
    try:
        checked = _Layout.model_validate(merged)
    except ValidationError as exc:
        record(exc, {"flags", "env", "file", None})
        cross_key = [sources.error(error) for error in exc.errors() if error["type"] in CROSS_KEY]
    if checked is not None and not found and not env_problems:
        try:
            return Settings(**{name: getattr(checked, name) for name in Settings.model_fields}), hidden
        except ValidationError as exc:  # only the cross-key checks are left to fail here
            cross_key = [sources.error(error) for error in exc.errors()]
    # Pydantic skips the cross-key checks once a field fails; run them on whatever is valid.
    bad = set(found)
    for check in (_cap_problems, _host_problems, _port_problems):
        for loc, problem in check(merged, bad, sources):
            found.setdefault(loc, problem)
    ordered = sorted(found.items(), key=lambda item: _section_order(item[0]))
    raise ConfigError(env_problems + [problem for _, problem in ordered] or cross_key, sourced=True)
