"""The README's Development section against the tree: every module and every Makefile target."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def development_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Development\n", 1)[1].split("\n## ", 1)[0]


def layout_block() -> str:
    return development_section().split("```\n", 2)[1]


def test_the_layout_lists_every_module_of_server_and_tools() -> None:
    lines = layout_block().splitlines()
    listed: dict[str, set[str]] = {}
    package = ""
    for line in lines:
        if re.match(r"(server|tools)/\s", line):
            package = line.split("/", 1)[0]
        elif line.startswith("  ") and package and line.strip().split()[0].endswith(".py"):
            listed.setdefault(package, set()).add(line.split()[0])
        elif not line.startswith(" "):
            package = ""
    for package in ("server", "tools"):
        modules = {path.name for path in (ROOT / package).glob("*.py")}
        missing, extra = sorted(modules - listed.get(package, set())), sorted(listed.get(package, set()) - modules)
        assert not missing, f"the README's layout lacks {package}/ {missing}"
        assert not extra, f"the README's layout lists {package}/ {extra}, which do not exist"


def test_the_layout_and_the_targets_table_name_every_makefile_target() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    [phony] = re.findall(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    targets = set(phony.split())
    [makefile_line] = [line for line in layout_block().splitlines() if line.startswith("Makefile ")]
    in_line = set(re.findall(r"[a-z]+", makefile_line.split(";", 1)[0].removeprefix("Makefile")))
    in_table = set(re.findall(r"^\| `make ([a-z]+)` \|", development_section(), re.MULTILINE))
    assert targets - in_line == set(), f"the layout's Makefile line lacks {sorted(targets - in_line)}"
    assert in_line - targets == set(), f"the layout's Makefile line names no target {sorted(in_line - targets)}"
    assert targets == in_table, f"the targets table differs: {sorted(targets ^ in_table)}"
