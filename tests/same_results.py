"""Do two results folders hold the same CSVs, row for row and column for column, wall-clock columns aside?

`python tests/same_results.py BEFORE AFTER` (e.g. results/smoke saved before a structural change, and after it):
prints every difference and exits 1 if there is one. Values are compared as the text the CSV holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

WALL_CLOCK = ("elapsed_s", "calibration_s", "step0_s")  # seconds measured by a run: differ from run to run


def differences(before: Path, after: Path) -> list[str]:
    """Human-readable differences between the CSVs of two folders (empty: the same results)."""
    names_before = {p.name for p in before.glob("*.csv")}
    names_after = {p.name for p in after.glob("*.csv")}
    found = [f"{name}: only in {before}" for name in sorted(names_before - names_after)]
    found += [f"{name}: only in {after}" for name in sorted(names_after - names_before)]
    for name in sorted(names_before & names_after):
        a = pd.read_csv(before / name, dtype=str, keep_default_na=False)
        b = pd.read_csv(after / name, dtype=str, keep_default_na=False)
        if list(a.columns) != list(b.columns):
            found.append(f"{name}: columns differ: {list(a.columns)} vs {list(b.columns)}")
            continue
        if len(a) != len(b):
            found.append(f"{name}: {len(a)} rows vs {len(b)}")
            continue
        kept = [c for c in a.columns if c not in WALL_CLOCK]
        unequal = a[kept].ne(b[kept])
        for row, column in zip(*unequal.to_numpy().nonzero()):
            col = kept[column]
            found.append(f"{name}: row {row}, {col}: {a[col].iloc[row]!r} vs {b[col].iloc[row]!r}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    found = differences(Path(argv[0]), Path(argv[1]))
    print("\n".join(found) if found else f"same results: {argv[0]} and {argv[1]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
