"""Tables, labels and figures of the model-editing notebooks (04-06) and the report: what each run trains
(method_label), the step-0 control rows, the editing results CSVs, the dense FedAvg reference of 02/03, the
calibration sample-count study. Mask statistics and plots are in helpers.sparse.mask_stats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from helpers.config.experiments import MASK_ONLY
from helpers.data.datasets import Data
from helpers.editing.calibration import calibrate_centralized
from helpers.sparse.mask_stats import mask_jaccard
from helpers.sparse.masks import DEFAULT_MASK_RULE
from helpers.training.runs import Run, read_results, tidy_results, with_integer_columns, write_results

DENSE_LABEL = "dense, new head"  # dense fine-tuning / FedAvg of 01-03: the head trained from scratch with the rest
DENSE_STEP0_LABEL = "dense, step-0 head"  # control (a): the whole backbone trained, head fixed after step 0
STEP0_LABEL = "step-0 model"  # control (b): the step-0 head on the untouched backbone
INFO_COLUMNS = ("step0_s", "step0_val_acc", "step0_val_loss", "step0_test_acc", "step0_test_loss",
                "step0_upload_bytes", "calibration_s",
                "calibration_scored", "calibration_upload_bytes", "mask_density", "backbone_entries")  # fmt: skip


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per finished run: run id, experiment, every config value and its done.json summary."""
    rows = [{"run_id": r.id, "experiment": r.experiment, **r.config, **r.summary()} for r in runs if r.done]
    return pd.DataFrame(rows)


def write_editing_results(runs: list[Run], name: str, extra: pd.DataFrame | None = None) -> Path:
    """results/<profile>/<name>.csv: tidy rows per (run, epoch|round) plus step-0 and calibration cost columns,
    and a row per step-0 model (step0_rows); `extra` tidy rows (e.g. the dense FedAvg reference read from 02/03)
    are appended as they are."""
    table, info = tidy_results(runs), summary_table(runs)
    columns = ["run_id"] + [c for c in INFO_COLUMNS if c in info]
    if len(columns) > 1 and not table.empty:
        table = table.merge(info[columns], on="run_id", how="left")
    parts = [t for t in (table, step0_rows(runs), extra) if t is not None and not t.empty]
    table = with_integer_columns(pd.concat(parts, ignore_index=True)) if parts else table
    return write_results(runs, name, table=table)


STEP0_METRICS = ("val_loss", "val_acc", "test_loss", "test_acc")


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


def sharding_label(sharding: str, classes_per_client: object) -> str:
    """'IID', or the number of classes per client ('5') of a non-IID sharding (the 'Nc' column of 03)."""
    return "IID" if sharding == "iid" else str(int(classes_per_client))


def method_label(config: Mapping) -> str:
    """Short name of what a run trains: 'dense, new head', 'head only', 'sparse s=0.9 R=4' (+ rule), or a
    control: 'dense, step-0 head' (sparsity 0) and 'step-0 model' (no backbone training, see step0_rows)."""
    if config.get("experiment") == "step0":
        return STEP0_LABEL
    if "sparsity" not in config or pd.isna(config.get("sparsity")):
        return "head only" if config.get("train_mode") == "head" else DENSE_LABEL
    if config["sparsity"] == 0:
        return DENSE_STEP0_LABEL
    rule = "" if config.get("mask_rule", DEFAULT_MASK_RULE) == DEFAULT_MASK_RULE else f" {config['mask_rule']}"
    rounds = f" R={int(config['calibration_rounds'])}" if pd.notna(config.get("calibration_rounds")) else ""
    return f"sparse{rule} s={config['sparsity']:g}{rounds}"


def method_labels(table: pd.DataFrame) -> pd.Series:
    """method_label of every row of a tidy table (computed once per distinct configuration)."""
    keys = [c for c in ("experiment", "sparsity", "train_mode", "mask_rule", "calibration_rounds") if c in table]
    configs = table[keys].astype(object).where(table[keys].notna(), None)
    rows = list(configs.itertuples(index=False, name=None))
    labels = {row: method_label({k: v for k, v in zip(keys, row) if v is not None}) for row in set(rows)}
    return pd.Series([labels[row] for row in rows], index=table.index, dtype=object)


def sparse_rows(table: pd.DataFrame) -> pd.Series:
    """True for the rows of sparse runs proper (sparsity > 0): not the dense control, step-0 or dense rows."""
    if "sparsity" not in table:
        return pd.Series(False, index=table.index)
    return table["sparsity"].fillna(0) > 0


def rules_with_controls(table: pd.DataFrame) -> pd.DataFrame:
    """A labelled table (with `method`) whose `mask_rule` names the controls and dense runs by their method,
    so that one column lists the rules and what they are compared with."""
    rule = sparse_rows(table)
    mask_rule = table["mask_rule"] if "mask_rule" in table else pd.Series(None, index=table.index, dtype=object)
    return table.assign(mask_rule=mask_rule.where(rule, table["method"]))


def with_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Add 'method' (see method_label) and, for federated rows, 'Nc' (see sharding_label) columns."""
    table = table.copy()
    table.insert(0, "method", method_labels(table))
    if "sharding" in table:
        table.insert(1, "Nc", [sharding_label(s, n) for s, n in zip(table["sharding"], table["classes_per_client"])])
    return table


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


def plot_vs_sparsity(
    table: pd.DataFrame,
    metrics: list[str],
    hue: str = "calibration_rounds",
    references: Mapping | None = None,
) -> Figure:
    """Final `metrics` against sparsity (one line per `hue`), with dashed lines for `references`
    ({label: {metric: value}}, e.g. dense fine-tuning and the linear probe)."""
    import seaborn as sns

    fig = Figure(figsize=(5 * len(metrics), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    styles = iter([("grey", "--"), ("black", ":"), ("tab:red", "-.")] * 3)
    refs = {label: (values, next(styles)) for label, values in (references or {}).items()}
    for ax, metric in zip(axes, metrics, strict=True):
        data = table.dropna(subset=[metric]) if metric in table else table.iloc[:0]
        if not data.empty:
            sns.lineplot(data=data, x="sparsity", y=metric, hue=hue, marker="o", errorbar="sd", ax=ax,
                         palette="colorblind")  # fmt: skip
        for label, (values, (color, style)) in refs.items():
            if metric in values and pd.notna(values[metric]):
                ax.axhline(values[metric], color=color, ls=style, lw=1.2, label=label)
        ax.set_xlabel("sparsity (fraction of backbone entries frozen)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend(title=hue.replace("_", " "), fontsize=8)
    return fig


def sample_count_study(model: nn.Module, data: Data, config: dict, counts: list[int]) -> tuple[pd.DataFrame, Figure]:
    """How the mask depends on the calibration sample count: centralized masks (the config's sparsity, rule and
    rounds) from each count, and their Jaccard overlap with the mask from the largest count; with a plot.

    `model` holds its step-0 head. Each count draws its own first samples of one seeded order of the train split,
    so a smaller count scores a subset of a larger one.
    """
    counts = sorted({int(n) for n in counts})
    masks, rows = {}, []
    for n in counts:
        masks[n], cost = calibrate_centralized(model, data, {**config, "calibration_samples": n})
        rows.append({"calibration_samples": n, "calibration_s": cost["calibration_s"]})
    table = pd.DataFrame(rows)
    table["jaccard_vs_largest"] = [mask_jaccard(masks[n].shared, masks[counts[-1]].shared) for n in counts]
    density = 1 - config["sparsity"]
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(table["calibration_samples"], table["jaccard_vs_largest"], marker="o")
    ax.axhline(density / (2 - density), color="grey", ls=":", label="two random masks")
    ax.axvline(config["calibration_samples"], color="tab:red", ls="--", label="profile default")
    ax.set_xscale("log")
    ax.set_xlabel("calibration samples per round (log scale)")
    ax.set_ylabel(f"Jaccard with the mask from {counts[-1]:,}")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return table, fig
