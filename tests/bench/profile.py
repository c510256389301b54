"""`make profile`: where the extension's cost per tool call goes (the why behind `make bench`).

Usage: python -m tests.bench.profile [--tool noop_async|noop_sync] [--calls N] [--top K]
                                     [--no-cachegrind] [--ll-bytes B] [--against REF]

Two views of one no-op call, on the overhead benchmark's servers (`tests.bench.overhead`):

1. Python: the bytecodes this package runs per call, by function (`sys.settrace` with opcode
   events; the tracing itself is slow, but it changes no count).
2. Machine (needs valgrind; Debian: `apt-get install valgrind`): instructions and cache misses per
   call under `valgrind --tool=cachegrind --cache-sim=yes`, for the bare SDK, the SDK with a
   pass-through interceptor and the SDK with `SessionsExtension`, then the C functions that
   account for the extension's extra. Each server runs in a child process twice, with warm-up
   calls only and with warm-up plus N calls; the difference over N is the per-call figure, with
   start-up taken out. Six runs of about a minute each. The last-level cache is simulated at
   `--ll-bytes` (default 512 KiB, one core's L2 on the development machine). So that a run can be
   repeated, each child runs with address-space randomisation off (`setarch -R`, where there is
   one), a fixed hash seed, and the garbage collector off during the measured calls (a collection
   more or less in one run moved the per-call figures by up to 8k instructions). Two runs of the
   same code, in the same environment, then agree within about 0.5k instructions and 0.01k misses
   per call. Anything that moves the memory layout moves the figures more: a change of code, and
   even a change in the size of the environment (with randomisation off, it shifts the stack),
   moved the same code's figures by up to 6k instructions and 0.15k LL misses. So compare two
   versions within one run (`--against`), and read differences smaller than that as layout.

`--against REF` adds the extension as it was at a git ref (a commit, a branch, `HEAD~3`): its
`server` and `tools` packages are taken from the ref into a temporary directory, and one more pair
of child runs imports them from there, the rest (the SDK, this script) unchanged. Its row in the
table reads against the same bare run, so a change's effect per call is the difference of the two
extension rows.

The Python interpreter's own loop (`_PyEval_EvalFrameDefault`) is where this package's bytecodes
run, so its share of the extra is the package's Python code; the rest is what that code calls.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import importlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
from mcp import Client

from tests.bench.overhead import VARIANTS, server_for

WARMUP = 30
EVENTS = ("Ir", "L1d", "LL")  # instructions; L1 data misses; last-level misses (data and instructions)
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "server"
#: Tells a child run the checkout root it must import this package from (see `_check_child_code`).
EXPECT_CODE = "MCP_SESSIONS_PROFILE_CODE"


async def _calls(
    variant: str,
    tool: str,
    warmup: int,
    calls: int,
    trace: Any = None,
    *,
    collector_off: bool = False,
    traced: Callable[[], None] | None = None,
) -> None:
    """`warmup` calls of `tool`, then `calls` more, traced by `trace` if given. `traced()`, if
    given, is called after one more call, traced but not one of the `calls`: on Python 3.12+
    (where `sys.settrace` runs on `sys.monitoring`) a function's first run after its frame asked
    for opcode events reports none of them, so the calls to count come after it."""
    async with Client(server_for(variant)) as client:
        for _ in range(warmup):
            await client.call_tool(tool, {})
        if collector_off:
            gc.collect()
            gc.disable()
        if trace is not None:
            sys.settrace(trace)
        try:
            if traced is not None:
                await client.call_tool(tool, {})
                traced()
            for _ in range(calls):
                await client.call_tool(tool, {})
        finally:
            sys.settrace(None)
            gc.enable()


def bytecodes_per_call(tool: str, calls: int) -> collections.Counter[str]:
    """This package's bytecodes per call of `tool` through `SessionsExtension`, by function."""
    counts: collections.Counter[str] = collections.Counter()

    def count(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            counts[f"{frame.f_globals['__name__']}.{frame.f_code.co_qualname}"] += 1
        return count

    def enter(frame: FrameType, event: str, arg: object) -> Any:
        # By module, not file: a dataclass's generated `__init__` has no file but its module's globals.
        module = frame.f_globals.get("__name__", "")
        if module != PACKAGE and not module.startswith(PACKAGE + "."):
            return None
        frame.f_trace_opcodes = True
        return count

    # The call traced before the counted ones: its counts are dropped (see `_calls`).
    anyio.run(functools.partial(_calls, traced=counts.clear), "sessions", tool, WARMUP, calls, enter)
    return collections.Counter({name: n // calls for name, n in counts.items() if n >= calls})


def _cachegrind(
    variant: str, tool: str, calls: int, ll_bytes: int, out_dir: str, code: Path = ROOT
) -> dict[str, dict[str, int]]:
    """Per C function: cachegrind's event counts for one child run, with this package imported
    from `code` (a checkout's root: this one, or another version taken by `checkout`)."""
    out_file = os.path.join(out_dir, f"{variant}.{tool}.{calls}.{code.name}")
    command = [
        *_no_aslr(),
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        f"--LL={ll_bytes},8,64",
        f"--cachegrind-out-file={out_file}",
        sys.executable,
        "-m",
        "tests.bench.profile",
        "--child",
        variant,
        tool,
        str(calls),
    ]
    # The child runs in `code`, so that its `server` comes first on its path; this script and the
    # bench's servers come from this checkout (`tests` is only here). The same dict layouts in
    # every run: a fixed hash seed.
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT), EXPECT_CODE: str(code)}
    subprocess.run(command, check=True, env=env, cwd=code, capture_output=True, timeout=900)
    return counts_by_function(out_file)


def checkout(ref: str, into: Path) -> Path:
    """This repository's `server` and `tools` packages as they are at git `ref`, in `into`.

    Raises:
        ValueError: `ref` names no commit of this repository (git's own message).
    """
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, PACKAGE, "tools"], capture_output=True, timeout=120
    )
    if archive.returncode != 0:
        raise ValueError(f"--against {ref}: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def _check_child_code() -> None:
    """In a child: refuse to measure another checkout's package than the parent asked for."""
    expected = os.environ.get(EXPECT_CODE)
    if expected is None:
        return
    imported = Path(importlib.import_module(PACKAGE).__file__ or "").resolve().parent.parent
    if imported != Path(expected).resolve():
        raise SystemExit(f"profile child: imported {PACKAGE} from {imported}, expected {expected}")


@functools.cache
def _no_aslr() -> list[str]:
    """The command prefix that runs a child with address-space randomisation off (with it, the
    same code's figures moved from run to run); none where `setarch -R` is missing or refused."""
    prefix = ["setarch", platform.machine(), "-R"]
    if shutil.which("setarch") is None:
        return []
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        sys.stderr.write("profile: setarch -R refused here; address-space randomisation stays on\n")
        return []
    return prefix


def counts_by_function(path: str) -> dict[str, dict[str, int]]:
    events: list[str] = []
    functions: dict[str, dict[str, int]] = {}
    current: dict[str, int] = {}
    with open(path) as lines:
        for line in lines:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("fn="):
                current = functions.setdefault(line[3:].strip(), dict.fromkeys(events, 0))
            elif line[:1].isdigit():
                for event, value in zip(events, line.split()[1:], strict=False):
                    current[event] += int(value)
    return functions


def per_call(
    run: dict[str, dict[str, int]], start: dict[str, dict[str, int]], calls: int
) -> dict[str, dict[str, float]]:
    """Per function, (run - start) / calls for each event, plus the derived misses."""
    out: dict[str, dict[str, float]] = {}
    for name in run.keys() | start.keys():
        after, before = run.get(name, {}), start.get(name, {})
        diff = {e: (after.get(e, 0) - before.get(e, 0)) / calls for e in after.keys() | before.keys()}
        diff["L1d"] = diff.get("D1mr", 0) + diff.get("D1mw", 0)
        diff["LL"] = diff.get("DLmr", 0) + diff.get("DLmw", 0) + diff.get("ILmr", 0)
        out[name] = diff
    return out


def _total(per_function: dict[str, dict[str, float]], event: str) -> float:
    return sum(counts.get(event, 0.0) for counts in per_function.values())


def machine_profile(
    tool: str, calls: int, ll_bytes: int, top: int, against: tuple[str, Path] | None = None
) -> list[str]:
    """The machine view, as lines of Markdown; with `against` (a ref and its `checkout`), a row
    for the extension as it is there."""
    per_variant: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mcp-sessions-profile-") as out_dir:
        runs: list[tuple[str, str, Path]] = [(variant, variant, ROOT) for variant in VARIANTS]
        if against is not None:
            ref, code = against
            runs.append((f"sessions at {ref}", "sessions", code))
        for label, variant, code in runs:
            sys.stderr.write(f"profile: cachegrind, {label} ...\n")
            start = _cachegrind(variant, tool, 0, ll_bytes, out_dir, code)
            run = _cachegrind(variant, tool, calls, ll_bytes, out_dir, code)
            per_variant[label] = per_call(run, start, calls)
    bare = per_variant["bare"]
    lines = [
        f"per call of {tool} ({calls} calls after {WARMUP} warm-up; LL = {ll_bytes // 1024} KiB):",
        "| server | instructions | L1d misses | LL misses |",
        "|---|---|---|---|",
    ]
    for variant, counts in per_variant.items():
        cells = []
        for event in EVENTS:
            total, added = _total(counts, event), _total(counts, event) - _total(bare, event)
            cells.append(f"{total / 1e3:,.1f}k" + ("" if variant == "bare" else f" ({added / 1e3:+.1f}k)"))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    sessions = per_variant["sessions"]
    extra_by_function = {
        name: {e: sessions.get(name, {}).get(e, 0.0) - bare.get(name, {}).get(e, 0.0) for e in EVENTS}
        for name in sessions.keys() | bare.keys()
    }
    for event, label in (("LL", "LL misses"), ("Ir", "instructions")):
        lines += [
            "",
            f"the extension's extra {label} per call, by C function (top {top}):",
            "| function | instructions | L1d misses | LL misses |",
            "|---|---|---|---|",
        ]
        for name in sorted(extra_by_function, key=lambda n: -abs(extra_by_function[n][event]))[:top]:
            extra = extra_by_function[name]
            lines.append(f"| {name[:60]} | {extra['Ir']:+,.0f} | {extra['L1d']:+,.1f} | {extra['LL']:+,.1f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=("noop_async", "noop_sync"), default="noop_async")
    parser.add_argument("--calls", type=int, default=400, help="measured calls per run (default 400)")
    parser.add_argument("--top", type=int, default=15, help="functions listed (default 15)")
    parser.add_argument("--no-cachegrind", action="store_true", help="the bytecode view only")
    parser.add_argument("--ll-bytes", type=int, default=512 * 1024, help="simulated last-level cache size")
    parser.add_argument("--against", metavar="REF", help="also profile the extension as it is at this git ref")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "TOOL", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _check_child_code()
        variant, tool, calls = args.child
        anyio.run(functools.partial(_calls, variant, tool, WARMUP, int(calls), collector_off=True))
        return 0
    if args.calls < 1 or args.top < 1:
        parser.error("--calls and --top must be at least 1")
    with tempfile.TemporaryDirectory(prefix="mcp-sessions-profile-") as scratch:
        against = None
        if args.against is not None:
            try:  # a bad ref fails now, not after minutes of profiling
                against = (args.against, checkout(args.against, Path(scratch)))
            except ValueError as exc:
                parser.error(str(exc))
        return _profile(args, against)


def _profile(args: argparse.Namespace, against: tuple[str, Path] | None) -> int:
    counts = bytecodes_per_call(args.tool, min(args.calls, 200))
    lines = [
        f"bytecodes of this package per call of {args.tool}: {sum(counts.values())}",
        "| function | bytecodes |",
        "|---|---|",
        *(f"| {name} | {n} |" for name, n in counts.most_common(args.top)),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.no_cachegrind:
        return 0
    if shutil.which("valgrind") is None:
        sys.stderr.write("valgrind is not installed, so no machine view (Debian: apt-get install valgrind)\n")
        return 1
    profile = machine_profile(args.tool, args.calls, args.ll_bytes, args.top, against)
    sys.stdout.write("\n" + "\n".join(profile) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
