"""Shared pieces of the benchmarks: figures with targets, medians with spread, the table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class Figure:
    """One measured figure: median over repeats, its spread, and the target it is held to."""

    name: str
    value: float
    unit: str
    target: str
    passed: bool
    spread: tuple[float, float] = (0.0, 0.0)
    detail: str = ""

    def row(self) -> str:
        lo, hi = self.spread
        spread = f"[{lo:.4g} .. {hi:.4g}]" if (lo, hi) != (0.0, 0.0) else ""
        verdict = "PASS" if self.passed else "FAIL"
        return f"| {self.name} | {self.value:.4g} {self.unit} | {spread} | {self.target} | {verdict} |"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def median_spread(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    return statistics.median(values), (min(values), max(values))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def table(figures: Sequence[Figure]) -> str:
    head = "| figure | measured (median) | spread (min .. max) | target | result |\n|---|---|---|---|---|"
    return "\n".join([head, *(f.row() for f in figures)])
