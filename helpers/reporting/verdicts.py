"""How the findings weigh a difference: a metric over seeds (mean, std, n), a verdict that calls a gap within the
seeds' spread no difference, and the words for it. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

# With one seed no spread is measured: a gap below this (in accuracy, interference or cosine, all fractions) is taken
# for noise. An assumption, not a measurement: the sentences say when a verdict rests on one seed.
MIN_GAP = 0.01


@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, std (NaN with one seed) and the number of seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        v = pd.Series(list(values), dtype=float).dropna()
        return cls(float(v.mean()), float(v.std()) if len(v) > 1 else math.nan, len(v))

    def text(self, digits: int = 3) -> str:
        """'0.812 ± 0.004', or '0.812' with one seed (seeds_said's sentence gives the seeds once per finding)."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"

    def brief(self, digits: int = 3, open_: str = "", close: str = "") -> str:
        """'0.812 ± 0.004, 3 seeds' (inside parentheses) or '0.812, 1 seed'."""
        sep = " " + open_ if open_ else ", "
        if self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}{sep}{self.n} seeds{close}"
        return f"{self.mean:.{digits}f}{sep}1 seed{close}"


def differs(a: Stat, b: Stat, min_gap: float = MIN_GAP) -> bool:
    """True when the means are further apart than the seeds' spread: the sum of their stds, and at least `min_gap`
    where a side has one seed (no spread measured)."""
    spread = sum(s.std for s in (a, b) if s.n > 1)
    if min(a.n, b.n) < 2:
        spread = max(spread, min_gap)
    return abs(a.mean - b.mean) > spread


def compare(name_a: str, a: Stat, name_b: str, b: Stat) -> str:
    """'A 0.81 against B 0.78: higher' where the gap exceeds the spread, else ': no difference established'."""
    return f"{name_a} {a.text()} against {name_b} {b.text()}: {change(b, a)}"


def change(a: Stat, b: Stat) -> str:
    """`b` against `a` in one word: 'higher', 'lower' or 'no difference established'."""
    return ("higher" if b.mean > a.mean else "lower") if differs(a, b) else "no difference established"


def seeds_said(*stats: Stat) -> str:
    """A finding's last sentence: over how many seeds its ± are, and that a number without ± rests on one seed."""
    several = "/".join(str(n) for n in sorted({s.n for s in stats if s.n > 1}))
    parts = [f"± is the std over {several} seeds"] if several else []
    parts += ["a number without ± rests on 1 seed"] if any(s.n < 2 for s in stats) else []
    return f" {'; '.join(parts).capitalize()}." if parts else ""


def stats(final: pd.DataFrame, keys: list[str], metric: str) -> dict:
    """Stat of `metric` over the runs (seeds) sharing each combination of `keys` (a 1-tuple key is its value)."""
    groups = final.groupby(keys, sort=False, dropna=False)[metric]
    out = {k[0] if isinstance(k, tuple) and len(k) == 1 else k: Stat.of(group) for k, group in groups}
    return {k: s for k, s in out.items() if s.n}


def best_of(table: dict, higher: bool = True) -> tuple[object, list]:
    """The key with the best mean and the keys whose gap to it is within the spread (not established as worse)."""
    best = (max if higher else min)(table, key=lambda k: table[k].mean)
    return best, [k for k in table if k != best and not differs(table[best], table[k])]
