"""Naming the key of a TOML file's "Cannot overwrite a value", the one error of tomllib that
names no key, without ever quoting a value; and key paths as TOML writes them (`dotted_key`),
for every message of the config that names a key (tomllib's own name it as a Python tuple).

Tier: runtime foundation. `server.config_loader` uses all of it, `server.reload` `parse_dotted_key`
too, and `dotted_key` every module whose messages name a config key (`server.config`,
`server.reload`, `server.admission`, `server.extension`, `server.app`). A key set twice is an easy
mistake (a value pasted below the one it should replace), and tomllib says only where the second
value ends. The value must not be shown: it may be a password (`store.url`). So the file is read
again here, by statements: only the text before an `=` is ever parsed for a name, and the table in
force is found by where a probe key lands, never by parsing headers by hand.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (server.config names keys with `dotted_key`)
    from server.config import Loc

#: tomllib's message for a key set twice, and where its value ends ("at end of document" if there).
_OVERWRITE = re.compile(r"Cannot overwrite a value \((?:at line (\d+), column \d+|at end of document)\)")
#: A key no file sets: written after a part of the file, it lands in the table in force there.
_PROBE = "mcp_session_manager_probe_6c1f"
#: How many statement starts are tried, back from where tomllib stopped (a bound on the re-reading).
_MAX_TRIES = 100
#: A bare key: written without quotes.
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def key_set_twice(text: str, message: str) -> str:
    """For tomllib's "Cannot overwrite a value", which names no key: which key, as `: KEY is set
    twice; keep one` (or `cannot be set` under a value), else "". Never the value: it may be a
    password (`store.url`), so only the text before an `=` is ever parsed for a name.

    tomllib reports where the second value ends. Its key is on the last line at or before that
    one which starts a statement: the lines above it form a valid document (a line inside a
    multi-line string or array does not), and it starts with a key and `=`. The table in force
    there is the one a probe key written after those lines lands in."""
    found = _OVERWRITE.fullmatch(message)
    if found is None:
        return ""
    lines = text.split("\n")
    reported = int(found[1]) if found[1] else None
    tries = 0
    for number in range(min(reported or len(lines), len(lines)), 0, -1):
        key = _statement_key(lines[number - 1])
        if key is None:
            continue
        tries += 1
        if tries > _MAX_TRIES:
            break
        try:
            before = tomllib.loads("".join(line + "\n" for line in lines[: number - 1]) + f"{_PROBE} = 0\n")
        except tomllib.TOMLDecodeError:
            continue  # inside a multi-line value: not a statement's start
        table = _probe_path(before)
        if table is not None:
            again = "" if number == reported else f" (the second time on line {number})"
            return _why_not(before, (*table, *key), again)
    return ""


def _statement_key(line: str) -> Loc | None:
    """The key path of `line` if it starts with `KEY =` (a dotted or quoted key too), else None."""
    for at in (index for index, char in enumerate(line) if char == "="):
        try:
            parsed: Any = tomllib.loads(line[:at] + "= 0")
        except tomllib.TOMLDecodeError:
            continue  # this `=` is inside a quoted key, or the line is no statement
        path: list[str] = []
        while isinstance(parsed, dict) and len(parsed) == 1:
            name, parsed = next(iter(parsed.items()))
            path.append(name)
        return tuple(path) if parsed == 0 and path else None
    return None


def _probe_path(data: Any, path: Loc = ()) -> Loc | None:
    """The path of the table holding `_PROBE` in `data` (a table of an array of tables by the array's name)."""
    if isinstance(data, list):
        return next((found for item in data if (found := _probe_path(item, path)) is not None), None)
    if not isinstance(data, dict):
        return None
    if _PROBE in data:
        return path
    return next(
        (found for name, value in data.items() if (found := _probe_path(value, (*path, name))) is not None), None
    )


def _is_table(node: Any) -> bool:
    """A table, or an array of tables (whose last table is the one a key goes in)."""
    return isinstance(node, Mapping) or (isinstance(node, list) and bool(node) and isinstance(node[-1], Mapping))


def _why_not(before: Mapping[str, Any], key: Loc, again: str) -> str:
    """Why `key` cannot be set after the document `before`: it is set already, or a table it is
    under is a value; "" if neither (nothing is guessed)."""
    node: Any = before
    for depth, part in enumerate(key, 1):
        if not _is_table(node):
            parent = dotted_key(key[: depth - 1])
            return f": {dotted_key(key)} cannot be set: {parent} is already a value, not a table{again}"
        table = node[-1] if isinstance(node, list) else node
        if part not in table:
            return ""
        node = table[part]
    return f": {dotted_key(key)} is set twice{again}; keep one"


def dotted_key(key: Loc) -> str:
    """A key path as TOML writes it: bare names as they are, others in quotes (`tools."my.tool"`)."""
    return ".".join(str(part) if _BARE.fullmatch(str(part)) else json.dumps(part) for part in key)


def parse_dotted_key(text: str) -> Loc | None:
    """The key path `text` writes (`dotted_key`'s inverse: `tools."my.tool"` is ("tools", "my.tool")),
    or None if it is not a TOML key."""
    if not text or "\n" in text or "\r" in text:
        return None
    return _statement_key(text + " = 0")


#: A key path as tomllib's messages show it: a Python tuple of strings, `('tools', 'my.tool')`.
_TUPLE_KEY = re.compile(
    r"""\((?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")(?:, (?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"))*,?\)"""
)


def readable_toml_error(message: str) -> str:
    """tomllib's `message` with the key paths it shows as Python tuples written as TOML writes
    them: "Cannot declare ('limits',) twice" is "Cannot declare [limits] twice"."""

    def toml(found: re.Match[str]) -> str:
        try:
            key = ast.literal_eval(found[0])
        except (ValueError, SyntaxError):
            return found[0]
        if not isinstance(key, tuple) or not all(isinstance(part, str) for part in key):
            return found[0]
        return dotted_key(key)

    declared = re.fullmatch(r"Cannot declare (\(.*\)) twice( \(.*\))?", message)
    if declared is not None:
        return f"Cannot declare [{_TUPLE_KEY.sub(toml, declared[1])}] twice{declared[2] or ''}"
    return _TUPLE_KEY.sub(toml, message)
