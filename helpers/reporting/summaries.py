"""The report's data layer: load every tidy results CSV of a profile, select, summarise over seeds, label.

Results schema (every CSV under ``results/<profile>/``, written by ``reporting.results.write_results``): one row
per (run, epoch | round), tidy, so any column can be a grouping key.

- identity: ``run_id`` (hash of the config), ``experiment`` (centralized, fedavg, sparse_centralized, ...)
- config: every parameter of the run, one column each (``profile``, ``seed``, ``lr``, ``scheduler``,
  ``sharding``, ``classes_per_client``, ``local_steps``, ``sparsity``, ``calibration_rounds``, ``mask_rule``, ...);
  a column a run does not have is empty (NaN)
- step: ``epoch`` (centralized) or ``round`` (federated), counted from 1
- metrics: ``train_loss``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` (accuracy as a fraction,
  loss as mean cross-entropy in nats; NaN on steps where that split was not evaluated), ``elapsed_s``;
  federated rows add ``upload_bytes`` (bytes uploaded by the clients in that round), ``drift_norm``,
  ``drift_cos``; editing rows may add step-0 and calibration cost columns.

``load_results`` adds ``source`` (the file stem, e.g. ``fedavg_noniid``). A run's *final* metrics are its row with
the largest step; summaries give mean, std and n over the runs sharing a configuration (seeds). Figures and
tables are made for one profile at a time: ``check_one_profile`` refuses a frame that mixes them.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core.settings import default_figures_root, default_results_root, default_tables_root
from helpers.reporting.labels import method_labels, sharding_label
from helpers.reporting.results import last_rows, read_results, with_integer_columns


class MissingResults(LookupError):
    """The results a figure or table needs are not there (yet)."""


# ----------------------------------------------------------------------------- loading and summaries


SETUP_NAME = "setup"  # results/<profile>/setup.csv: the settings helpers.ops.setup writes


def load_results(profile: str, root: str | Path | None = None) -> pd.DataFrame:
    """Every CSV under <root>/<profile>/ in one frame with a `source` column (file stem); empty if none."""
    root = Path(root if root is not None else default_results_root())
    frames = []
    for path in sorted((root / profile).glob("*.csv")):
        if path.stem == SETUP_NAME:  # the study's settings, not runs (helpers.reporting.setup reads it)
            continue
        frame = read_results(path.stem, profile, root)
        if frame is None:
            warnings.warn(f"skipping unreadable results file {path}", stacklevel=2)
            continue
        frames.append(frame.assign(source=path.stem))
    if not frames:
        return pd.DataFrame(columns=["source", "run_id", "experiment", "profile"])
    df = with_integer_columns(pd.concat(frames, ignore_index=True))
    if "profile" not in df:
        df["profile"] = profile
    return df


def check_one_profile(df: pd.DataFrame) -> str | None:
    """The single profile of `df` (None if empty); raises ValueError if it mixes profiles."""
    profiles = sorted(df["profile"].dropna().unique()) if "profile" in df else []
    if len(profiles) > 1:
        raise ValueError(f"results mix profiles {profiles}: make figures and tables for one profile at a time")
    return profiles[0] if profiles else None


def select(df: pd.DataFrame, source: str, columns: tuple[str, ...] = (), **match) -> pd.DataFrame:
    """Rows of one results file (with `columns` present and `match` column == value); raises MissingResults."""
    part = df[df["source"] == source] if "source" in df else df.iloc[:0]
    for key, value in match.items():
        part = part[part[key] == value] if key in part else part.iloc[:0]
    lacking = [c for c in columns if c not in part or part[c].isna().all()]
    if part.empty or lacking:
        detail = f" (no {', '.join(lacking)})" if lacking and not part.empty else ""
        raise MissingResults(f"{source}.csv{detail}")
    return part.copy()


def summarize(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and n over runs (seeds) of each run's final `metrics`, one row per combination of `keys`."""
    last = last_rows(df)
    parts = {}
    for metric in metrics:
        grouped = last.groupby(keys, sort=False, dropna=False)[metric]
        parts[metric] = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    return pd.concat(parts, axis=1)


def with_method_and_setting(df: pd.DataFrame) -> pd.DataFrame:
    """Add `method` (helpers.reporting.labels.method_label: dense, head only, sparse s=.. R=.., the two controls) and
    `setting` (IID or Nc=k) columns where they apply."""
    df = df.copy()
    df["method"] = method_labels(df)
    if "sharding" in df:
        nc = df["classes_per_client"] if "classes_per_client" in df else pd.Series(np.nan, index=df.index)
        df["setting"] = [
            "IID" if s == "iid" else f"Nc={sharding_label(s, n)}" if pd.notna(n) else str(s)
            for s, n in zip(df["sharding"], nc)
        ]
    return df


def setting_order(values) -> list[str]:
    """Non-IID settings by increasing Nc, IID last (from most to least heterogeneous)."""

    def key(v: str) -> float:
        return math.inf if v == "IID" else float(re.sub(r"\D", "", v) or 0)

    return sorted(pd.unique(pd.Series(list(values)).dropna()), key=key)


# ----------------------------------------------------------------------------- output folders


def figures_dir(profile: str, root: str | Path | None = None) -> Path:
    """<root>/<profile>/, created; root is `root`, else $FLME_FIGURES_ROOT, else figures/ beside helpers/."""
    base = root if root is not None else default_figures_root()
    folder = Path(base) / profile
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tables_dir(profile: str, root: str | Path | None = None) -> Path:
    """<root>/<profile>/, created; root is `root`, else $FLME_TABLES_ROOT, else report/generated/."""
    base = root if root is not None else default_tables_root()
    folder = Path(base) / profile
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fmt_key(value: object) -> str:
    """A table or legend key as text: 4 rather than 4.0, 5e-05 rather than 5.0000e-05."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)
