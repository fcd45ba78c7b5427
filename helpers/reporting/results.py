"""The tidy results: runs' rows joined with their configs, `results/<profile>/<name>.csv` written and read, each
run's final row, summaries over seeds, the editing and remedies tables of the notebooks. Torch-free: it takes runs
as objects with `experiment`, `config`, `id`, `done`, `metrics()` and `summary()` (helpers.training.runs.Run)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from helpers.core.params import INTEGER_COLUMNS, MASK_ONLY, STEP_COLUMNS, omitted_defaults
from helpers.core.settings import default_results_root
from helpers.core.storage import atomic_write
from helpers.reporting.labels import sharding_label, with_algorithm

if TYPE_CHECKING:  # a type only: a results table never needs the training stack
    from helpers.training.runs import Run

INFO_COLUMNS = ("step0_s", "step0_val_acc", "step0_val_loss", "step0_test_acc", "step0_test_loss",
                "step0_upload_bytes", "calibration_s",
                "calibration_scored", "calibration_upload_bytes", "mask_density", "backbone_entries")  # fmt: skip
STEP0_METRICS = ("val_loss", "val_acc", "test_loss", "test_acc")


def with_integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Integer parameters and steps as nullable integers (J=4, not 4.0), also where some rows lack them (NaN)."""
    for column in INTEGER_COLUMNS:
        if column in table and pd.api.types.is_numeric_dtype(table[column]):
            values = table[column].dropna()
            if (values == values.round()).all():
                table[column] = table[column].astype("Int64")
    return table


def tidy_results(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, epoch|round) of the finished runs: metrics joined with every config column, run id and
    experiment."""
    frames = []
    for run in runs:
        m = run.metrics()
        if m.empty or not run.done:  # rows of a run another session still trains come when it is done
            continue
        clash = sorted(set(run.config) & set(m.columns))
        if clash:  # a metric named like a parameter would hide the parameter's value
            raise ValueError(f"{run.dir}/metrics.csv has columns named like parameters: {clash}")
        for key, value in run.config.items():
            m[key] = value
        m.insert(0, "run_id", run.id)
        m.insert(1, "experiment", run.experiment)
        frames.append(m)
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    for name, default in omitted_defaults().items():  # e.g. algorithm: FedAvg configs leave it out
        if name in table:
            table[name] = table[name].fillna(default)
    return with_integer_columns(table)


def results_dir(profile: str, root: str | Path = "results") -> Path:
    """results/<profile>/, created."""
    folder = Path(root) / profile
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(
    runs: list[Run], name: str, root: str | Path | None = None, table: pd.DataFrame | None = None
) -> Path:
    """Write results/<profile>/<name>.csv (profile taken from the runs): `table`, by default the runs' tidy rows."""
    profiles = {run.config["profile"] for run in runs}
    if len(profiles) != 1:
        raise ValueError(f"runs mix profiles {sorted(profiles)}: write one results file per profile")
    path = results_dir(profiles.pop(), root if root is not None else default_results_root()) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)  # names such as custom/<name>-<hash> (helpers.ops.notebook)
    table = tidy_results(runs) if table is None else table
    unfinished = [run.id for run in runs if not run.done]
    if unfinished:
        print(f"{path.name}: {len(unfinished)} runs left out, not finished (another session trains them: "
              f"{', '.join(unfinished)}); run this notebook again when they are done")  # fmt: skip
    atomic_write(path, table.to_csv(index=False).encode())
    return path


def last_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The final row of every run of a tidy table: its greatest step (round, else epoch), one per (source, run_id)
    where a `source` column tells results files apart. Rows keep their order in `table`."""
    if table.empty:
        return table
    keys = [k for k in ("source", "run_id") if k in table]
    step = pd.Series(0.0, index=table.index)
    for column in STEP_COLUMNS:
        if column in table:
            step = table[column].where(table[column].notna(), step)
    table = table.reset_index(drop=True)
    last = table.assign(_step=step.to_numpy()).groupby(keys, sort=False)["_step"].idxmax()
    return table.loc[sorted(last)].reset_index(drop=True)


def final_rows(runs: list[Run], keys: list[str]) -> pd.DataFrame:
    """One row per run with metrics: run id, the config `keys` and the run's final metrics (for grid tables)."""
    table = last_rows(tidy_results(runs))
    if table.empty:
        return table
    metrics = [c for c in table if c not in ("run_id", "experiment") and all(c not in r.config for r in runs)]
    return table[["run_id", *keys, *metrics]]


def seed_summary(runs: list[Run], keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and count over seeds of each run's final `metrics`, grouped by config `keys`."""
    table = final_rows(runs, keys + ["seed"])
    grouped = table.groupby(keys, dropna=False)[metrics] if keys else table[metrics]
    return grouped.agg(["mean", "std", "count"]) if keys else grouped.agg(["mean", "std", "count"]).T


def read_results(name: str, profile: str, root: str | Path | None = None) -> pd.DataFrame | None:
    """results/<profile>/<name>.csv as written by write_results (same root logic); None if absent or empty."""
    path = Path(root if root is not None else default_results_root()) / profile / f"{name}.csv"
    try:
        return with_integer_columns(pd.read_csv(path, dtype={"clients": str}, low_memory=False))  # one type per column
    except FileNotFoundError:
        return None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError):  # empty, cut short, unreadable
        return None


def final_means(df: pd.DataFrame | None, metrics: list[str]) -> dict[str, float]:
    """Mean over runs of each run's final value (last_rows) of every metric in `metrics` that the table has.

    For reference lines (e.g. the centralized result from `read_results`): metrics missing from the table
    or NaN in every run are left out, so an absent or partial results file gives a smaller (or empty) dict.
    """
    if df is None or df.empty or "run_id" not in df or not set(STEP_COLUMNS) & set(df):
        return {}
    last = last_rows(df)
    means = {m: float(last[m].mean()) for m in metrics if m in last and last[m].notna().any()}
    return means


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per finished run: run id, experiment, every config value and its done.json summary."""
    rows = [{"run_id": r.id, "experiment": r.experiment, **r.config, **r.summary()} for r in runs if r.done]
    return pd.DataFrame(rows)


def editing_table(runs: list[Run], extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy rows per (run, epoch|round) plus step-0 and calibration cost columns, and a row per step-0 model
    (step0_rows); `extra` tidy rows (e.g. the dense FedAvg reference read from 02/03) appended as they are."""
    table, info = tidy_results(runs), summary_table(runs)
    columns = ["run_id"] + [c for c in INFO_COLUMNS if c in info]
    if len(columns) > 1 and not table.empty:
        table = table.merge(info[columns], on="run_id", how="left")
    parts = [t for t in (table, step0_rows(runs), extra) if t is not None and not t.empty]
    return with_integer_columns(pd.concat(parts, ignore_index=True)) if parts else table


def write_editing_results(runs: list[Run], name: str, extra: pd.DataFrame | None = None) -> Path:
    """results/<profile>/<name>.csv: editing_table's rows."""
    return write_results(runs, name, table=editing_table(runs, extra))


def step0_rows(runs: list[Run]) -> pd.DataFrame:
    """The no-backbone-training control: one tidy row (experiment "step0", step 0) per distinct step-0 model
    among the finished sparse runs, holding its val and test metrics. Runs sharing a step 0 (same data, shards,
    seed and head training) give one row; mask settings are left empty."""
    rows = {}
    for run in runs:
        summary = run.summary() if run.done and run.experiment.startswith("sparse_") else {}
        if "step0_test_acc" not in summary:
            continue
        metrics = {m: summary[f"step0_{m}"] for m in STEP0_METRICS}
        config = {k: v for k, v in run.config.items() if k not in ("sparsity", *MASK_ONLY)}
        key = hashlib.sha1(repr(sorted(metrics.items()) + [config.get("sharding"), config.get("classes_per_client"),
                                                            config["seed"]]).encode()).hexdigest()[:12]  # fmt: skip
        step = "round" if "rounds" in run.config else "epoch"
        rows.setdefault(key, {"run_id": f"step0-{key}", "experiment": "step0", step: 0, **metrics, **config})
    return pd.DataFrame(list(rows.values()))


def dense_fedavg_reference(
    profile: str, settings: Iterable[tuple[str, object]] | None = None, **match: object
) -> pd.DataFrame:
    """Tidy rows of the dense FedAvg runs of 02/03 (results/<profile>/fedavg_iid.csv, fedavg_noniid.csv) whose
    columns equal `match` (e.g. local_steps=4, lr=0.01) and, if given, whose (sharding, classes_per_client) is one
    of `settings` (03 may have run more Nc than the caller compares); empty when those notebooks have not run yet."""
    tables = [read_results(name, profile) for name in ("fedavg_iid", "fedavg_noniid")]
    tables = [t for t in tables if t is not None and not t.empty]
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True).drop_duplicates(subset=["run_id", "round"])
    for key, value in {"train_mode": "full", **match}.items():
        if key in table:
            table = table[table[key] == value]
    if settings is not None:
        wanted = {sharding_label(sh, nc) for sh, nc in settings}
        labels = [sharding_label(sh, nc) for sh, nc in zip(table["sharding"], table["classes_per_client"])]
        table = table[pd.Series(labels, index=table.index, dtype=object).isin(wanted)]
    return table.reset_index(drop=True)


def remedy_table(runs: list[Run]) -> pd.DataFrame:
    """Final test accuracy per algorithm (rows) and Nc x dense/sparse (columns), with each run's total upload."""
    final = with_algorithm(last_rows(tidy_results(runs)))
    total = tidy_results(runs).groupby("run_id")["upload_bytes"].sum().div(2**20)
    final = final.assign(kind=final["sparsity"].map(lambda s: "sparse" if s > 0 else "dense"),
                         upload_mib=final["run_id"].map(total))  # fmt: skip
    order = list(dict.fromkeys(final["algorithm"]))
    wide = final.pivot_table(index="algorithm", columns=["classes_per_client", "kind"],
                             values=["test_acc", "upload_mib"])  # fmt: skip
    return wide.reindex(order)
