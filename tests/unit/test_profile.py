"""tests/bench/profile.py (`make profile`): its bytecode count and its reading of cachegrind's files.

The cachegrind runs themselves need valgrind and minutes; these cases check what the script
computes from what it measures.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.bench.profile import (
    EXPECT_CODE,
    PACKAGE,
    ROOT,
    _check_child_code,
    bytecodes_per_call,
    checkout,
    counts_by_function,
    per_call,
)


@pytest.mark.parametrize("tool", ["noop_async", "noop_sync"])
def test_bytecodes_per_call_counts_this_package_only(tool: str) -> None:
    counts = bytecodes_per_call(tool, 5)
    assert counts["server.extension.SessionsExtension.handle_tool_call"] > 0
    assert counts["server.sessions.SessionManager.end"] > 0
    # The dataclass's generated constructor (`Session`'s) has no file, but it is this package's code.
    assert any(name.startswith("server.session.") and name.endswith(".__init__") for name in counts)
    assert all(name.startswith(PACKAGE + ".") for name in counts)
    # Per call, not in total: five calls count as one.
    assert (
        bytecodes_per_call(tool, 10)["server.sessions.SessionManager.end"]
        == counts["server.sessions.SessionManager.end"]
    )


CACHEGRIND_OUT = """\
# callgrind format
version: 1
creator: cachegrind-test
pid: 1
cmd: python
events: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw
fl=/src/ceval.c
fn=_PyEval_EvalFrameDefault
10 100 1 0 50 5 2 20 3 1
11 60 0 0 30 1
fl=/src/dictobject.c
fn=insertdict
7 40 0 1 10 2 1 5 1 1
fn=_PyEval_EvalFrameDefault
12 40
summary: 240 1 1 90 8 3 25 4 2
"""


def test_counts_by_function_sums_each_functions_lines(tmp_path: Path) -> None:
    path = tmp_path / "cg.out"
    path.write_text(CACHEGRIND_OUT)
    counts = counts_by_function(str(path))
    assert set(counts) == {"_PyEval_EvalFrameDefault", "insertdict"}
    # Three lines, one of them under a second `fl=` block; short lines leave the rest at 0.
    assert counts["_PyEval_EvalFrameDefault"]["Ir"] == 200
    assert counts["_PyEval_EvalFrameDefault"]["D1mr"] == 6
    assert counts["_PyEval_EvalFrameDefault"]["DLmw"] == 1
    assert counts["insertdict"] == {
        "Ir": 40,
        "I1mr": 0,
        "ILmr": 1,
        "Dr": 10,
        "D1mr": 2,
        "DLmr": 1,
        "Dw": 5,
        "D1mw": 1,
        "DLmw": 1,
    }


def test_per_call_takes_start_up_out_and_derives_the_misses() -> None:
    start = {"f": {"Ir": 1000, "D1mr": 10, "D1mw": 4, "DLmr": 2, "DLmw": 1, "ILmr": 1}}
    run = {
        "f": {"Ir": 5000, "D1mr": 50, "D1mw": 24, "DLmr": 22, "DLmw": 11, "ILmr": 1},
        "g": {"Ir": 400, "D1mr": 0, "D1mw": 0, "DLmr": 4, "DLmw": 0, "ILmr": 4},  # only in the run
    }
    out = per_call(run, start, 4)
    assert out["f"]["Ir"] == 1000
    assert out["f"]["L1d"] == (40 + 20) / 4
    assert out["f"]["LL"] == (20 + 10 + 0) / 4
    assert out["g"]["Ir"] == 100
    assert out["g"]["LL"] == (4 + 0 + 4) / 4


def test_against_takes_the_packages_at_a_ref_and_refuses_a_bad_ref(tmp_path: Path) -> None:
    code = checkout("HEAD", tmp_path / "head")
    committed = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"HEAD:{PACKAGE}/sessions.py"], capture_output=True, check=True, timeout=60
    ).stdout
    assert (code / PACKAGE / "sessions.py").read_bytes() == committed
    assert (code / "tools" / "sessions.py").is_file() and not (code / "tests").exists()
    with pytest.raises(ValueError, match="no-such-ref"):
        checkout("no-such-ref", tmp_path / "bad")


def test_a_child_refuses_to_measure_another_checkout_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EXPECT_CODE, str(ROOT))
    _check_child_code()  # this checkout's package is the one imported here
    monkeypatch.setenv(EXPECT_CODE, str(tmp_path))
    with pytest.raises(SystemExit, match="expected"):
        _check_child_code()
