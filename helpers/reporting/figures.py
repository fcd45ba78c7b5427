"""Report figures from the tidy results, drawn at their printed size (see helpers.reporting.plots.paper_style).

Every figure is exactly HALF or FULL text width wide (no tight bounding box, no scaling in LaTeX), so its
fonts print at their point size; step axes (epoch, round, J, R) carry integer ticks; a legend holds at most
MAX_LEGEND entries and sits above the panels, shared by all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers.core.params import STEP_COLUMNS
from helpers.reporting.extension import fig_extension
from helpers.reporting.labels import (
    STEP0_LABEL,
    algorithm_order,
    algorithm_title,
    rules_with_controls,
    sparse_rows,
    with_algorithm,
)
from helpers.reporting.plots import (
    HALF_WIDTH_IN,
    MARKERS,
    PANEL_HEIGHT_IN,
    REFERENCE_COLOUR,
    TEXT_WIDTH_IN,
    integer_ticks,
    line_styles,
    log_ticks,
    palette_for,
    paper_style,
    plot_heatmap,
    stack_markers,
)
from helpers.reporting.results import last_rows
from helpers.reporting.summaries import (
    MissingResults,
    check_one_profile,
    figures_dir,
    fmt_key,
    select,
    setting_order,
    with_method_and_setting,
)

FULL, HALF = TEXT_WIDTH_IN, HALF_WIDTH_IN
HEIGHT = PANEL_HEIGHT_IN  # inches: one row of panels with its legend
MAX_LEGEND = 8
LABELS = {  # axis labels, short enough for a panel a quarter of the text wide
    "epoch": "epoch",
    "round": "round",
    "train_loss": "train loss (nats)",
    "val_loss": "val. loss (nats)",
    "test_loss": "test loss (nats)",
    "val_acc": "val. accuracy",
    "test_acc": "test accuracy",
    "drift_norm": "client update norm",
    "drift_cos": "client update cosine",
    "upload_mb": "uploaded by clients (MB, cumulative)",
    "local_steps": "local steps J",
    "sparsity": "sparsity (fraction frozen)",
    "calibration_rounds": "calibration rounds R",
    "setting": "classes per client Nc",
}


def placeholder_figure(title: str, missing: str, width: float = HALF) -> Figure:
    """A figure that says 'not run yet' and which results file it needs."""
    fig = Figure(figsize=(width, 1.2), layout="constrained")
    ax = fig.subplots()
    ax.text(0.5, 0.6, "not run yet", ha="center", va="center", fontsize=12, transform=ax.transAxes)
    ax.text(0.5, 0.2, f"needs results/<profile>/{missing}", ha="center", va="center", fontsize=7,
            transform=ax.transAxes, wrap=True)  # fmt: skip
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    return fig


def save_figure(fig: Figure, name: str, profile: str, root: str | Path | None = None) -> list[Path]:
    """Write `fig` as <name>.png (150 dpi) and <name>.pdf under figures/<profile>/, at its own size (no cropping)."""
    folder = figures_dir(profile, root)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        metadata = None if path.suffix == ".png" else {"CreationDate": None}  # reproducible PDFs
        fig.savefig(path, dpi=150, metadata=metadata)
    return paths


# ----------------------------------------------------------------------------- building blocks


def _figure(width: float, ncols: int = 1, height: float = HEIGHT, sharey: bool = False) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, list(np.atleast_1d(fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]))


def _legend_on_top(fig: Figure, axes: list, title: str | None = None, ncols: int = 4) -> None:
    """One legend for all panels, above them: the entries of every panel, each label once."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside upper center", ncols=min(ncols, len(entries)),
                   title=title, frameon=False, columnspacing=1.0, handlelength=1.5)  # fmt: skip


def _order(part: pd.DataFrame, hue: str | None) -> list | None:
    if hue is None:
        return None
    return setting_order(part[hue]) if hue == "setting" else list(pd.unique(part[hue].dropna()))


def _curves(
    part: pd.DataFrame,
    x: str,
    metrics: list[str],
    hue: str | None,
    width: float,
    reference: dict[str, float] | None = None,
    reference_label: str = "centralized",
    legend: str | None = None,
    ncols: int = 4,
    height: float = HEIGHT,
) -> Figure:
    """One panel per metric against step `x`, one line per `hue` value (band: std over the runs sharing it)."""
    import seaborn as sns

    fig, axes = _figure(width, len(metrics), height)
    order = _order(part, hue)
    for ax, metric in zip(axes, metrics):
        data = part.dropna(subset=[metric])
        styles = line_styles(hue, order) if hue else {"marker": "o"}
        sns.lineplot(data=data, x=x, y=metric, errorbar="sd", markersize=3, markeredgewidth=0, ax=ax, **styles)
        if hue:
            stack_markers(ax, order)
        if reference and metric in reference:
            ax.axhline(reference[metric], ls="--", color=REFERENCE_COLOUR, lw=1, label=reference_label)
        integer_ticks(ax)
        ax.set_xlabel(LABELS.get(x, x))
        ax.set_ylabel(LABELS.get(metric, metric))
    _legend_on_top(fig, axes, legend, ncols)
    return fig


def _heatmap(part: pd.DataFrame, index: str, columns: str, value: str, width: float = HALF) -> Figure:
    fig = plot_heatmap(part, index, columns, value, figsize=(width, HEIGHT))
    ax = fig.axes[0]
    ax.set_ylabel(LABELS.get(index, index))
    ax.set_xlabel(LABELS.get(columns, columns))
    fig.axes[-1].set_ylabel(LABELS.get(value, value))  # the colour bar
    return fig


def _label_columns(df: pd.DataFrame, mapping: dict[str, str]) -> pd.Series:
    """A legend label per row naming the configuration, e.g. 'scheduler=cosine, lr=0.01'."""
    cols = [c for c in mapping if c in df and df[c].nunique(dropna=True) > 1]
    return df[cols].apply(lambda r: ", ".join(f"{mapping[c]}={fmt_key(v)}" for c, v in r.items() if pd.notna(v)),
                          axis=1) if cols else pd.Series("", index=df.index)  # fmt: skip


def _short_setting(setting: pd.Series) -> pd.Series:
    return setting.str.replace("Nc=", "", regex=False)


# ----------------------------------------------------------------------------- the figures


def fig_centralized_curves(df: pd.DataFrame) -> Figure:
    """Test loss and accuracy per epoch of the final centralized runs (band: std over seeds)."""
    part = select(df, "centralized_final", ("epoch", "test_acc"))
    part["config"] = _label_columns(part, {"scheduler": "scheduler", "lr": "lr", "weight_decay": "wd"})
    hue = "config" if part["config"].nunique() > 1 else None
    return _curves(part, "epoch", ["test_loss", "test_acc"], hue, HALF, ncols=2)


def fig_schedulers(df: pd.DataFrame) -> Figure:
    """Validation loss and accuracy per epoch for each learning-rate scheduler."""
    part = select(df, "centralized_schedulers", ("epoch", "scheduler", "val_acc"))
    part["scheduler"] = part["scheduler"].str.replace("_", " ")
    return _curves(part, "epoch", ["val_loss", "val_acc"], "scheduler", HALF, ncols=2)


def fig_hparam_search(df: pd.DataFrame) -> Figure:
    """Final validation accuracy over the lr x weight-decay grid (mean over momentum values)."""
    part = last_rows(select(df, "centralized_grid", ("lr", "weight_decay", "val_acc")))
    fig = _heatmap(part.sort_values(["lr", "weight_decay"]), "lr", "weight_decay", "val_acc")
    fig.axes[0].set_ylabel("learning rate")
    fig.axes[0].set_xlabel("weight decay")
    return fig


def _centralized_reference(df: pd.DataFrame) -> dict[str, float]:
    try:
        last = last_rows(select(df, "centralized_final"))
    except MissingResults:
        return {}
    metrics = ("val_acc", "val_loss", "test_acc")
    return {m: float(last[m].mean()) for m in metrics if m in last and last[m].notna().any()}


def fig_fedavg_iid(df: pd.DataFrame) -> Figure:
    """FedAvg IID validation loss/accuracy per round, the centralized final result dashed."""
    part = select(df, "fedavg_iid", ("round", "val_acc"))
    part["config"] = "FedAvg, IID " + _label_columns(part, {"local_steps": "J", "participation": "C", "lr": "lr"})
    return _curves(part, "round", ["val_loss", "val_acc"], "config", HALF, reference=_centralized_reference(df),
                   ncols=2)  # fmt: skip


def fig_fedavg_heatmap(df: pd.DataFrame) -> Figure:
    """Final test accuracy over (Nc, J), IID as the last row."""
    part = last_rows(with_method_and_setting(select(df, "fedavg_noniid", ("local_steps", "test_acc"))))
    order = setting_order(part["setting"])
    part = part.assign(_o=part["setting"].map(order.index)).sort_values(["_o", "local_steps"])
    part["setting"] = _short_setting(part["setting"])
    return _heatmap(part, "setting", "local_steps", "test_acc")


def fig_fedavg_curves(df: pd.DataFrame) -> Figure:
    """Validation accuracy per round, one panel per J, one line per Nc (same step budget per J)."""
    import seaborn as sns

    part = with_method_and_setting(select(df, "fedavg_noniid", ("round", "local_steps", "val_acc"))).dropna(
        subset=["val_acc"]
    )
    steps = sorted(part["local_steps"].unique())
    fig, axes = _figure(FULL, len(steps), sharey=True)
    order = setting_order(part["setting"])
    # markers: a run of one round (large J at a small budget) is a single point, invisible as a line
    for ax, j in zip(axes, steps):
        sns.lineplot(data=part[part["local_steps"] == j], x="round", y="val_acc", errorbar="sd", markersize=4,
                     markeredgewidth=0, ax=ax, **line_styles("setting", order))  # fmt: skip
        stack_markers(ax, order)
        ax.set_title(f"J = {int(j)}")
        integer_ticks(ax)
        ax.set_xlabel(LABELS["round"])
        ax.set_ylabel(LABELS["val_acc"])
    _legend_on_top(fig, axes, None, ncols=MAX_LEGEND)
    return fig


def fig_drift(df: pd.DataFrame) -> Figure:
    """Client drift (mean over rounds of update norm and pairwise cosine) against Nc, one line per J."""
    import seaborn as sns

    part = with_method_and_setting(select(df, "fedavg_noniid", ("drift_norm", "local_steps")))
    per_run = part.groupby(["run_id", "setting", "local_steps"], as_index=False)[["drift_norm", "drift_cos"]].mean()
    order = list(_short_setting(pd.Series(setting_order(per_run["setting"]))))
    per_run = per_run.assign(setting=_short_setting(per_run["setting"]), J=per_run["local_steps"].map("J={}".format))
    j_order = [f"J={j}" for j in sorted(per_run["local_steps"].unique())]
    fig, axes = _figure(FULL, 2)
    for ax, metric in zip(axes, ["drift_norm", "drift_cos"]):
        sns.pointplot(data=per_run, x="setting", y=metric, hue="J", order=order, hue_order=j_order, errorbar="sd",
                      palette=palette_for(j_order), markers=list(MARKERS[: len(j_order)]), dodge=0.3, markersize=3,
                      linewidth=1, ax=ax)  # fmt: skip
        ax.set_xlabel(LABELS["setting"])
        ax.set_ylabel(LABELS[metric])
    _legend_on_top(fig, axes, None)
    return fig


def fig_sparse_grid(df: pd.DataFrame) -> Figure:
    """Centralized sparse fine-tuning: final test accuracy over sparsity x calibration rounds."""
    part = last_rows(with_method_and_setting(select(df, "editing_centralized", ("test_acc",))))
    sparse = part[sparse_rows(part)]
    if sparse.empty or sparse["calibration_rounds"].isna().all():
        raise MissingResults("editing_centralized.csv (no sparse runs)")
    return _heatmap(sparse.sort_values(["sparsity", "calibration_rounds"]), "sparsity", "calibration_rounds",
                    "test_acc")  # fmt: skip


def fig_editing_curves(df: pd.DataFrame) -> Figure:
    """Validation accuracy per epoch: each sparsity at the largest R, the dense runs; the step-0 model dashed."""
    part = with_method_and_setting(select(df, "editing_centralized", ("epoch", "val_acc")))
    sparse = sparse_rows(part)
    top_r = part.loc[sparse, "calibration_rounds"].max()
    keep = ~sparse | (part["calibration_rounds"] == top_r)
    step0 = part.loc[part["method"] == STEP0_LABEL, "val_acc"].dropna()
    lines = part[keep & (part["method"] != STEP0_LABEL)]
    reference = {"val_acc": float(step0.mean())} if not step0.empty else None
    return _curves(lines, "epoch", ["val_acc"], "method", HALF, reference=reference, reference_label=STEP0_LABEL,
                   ncols=2, height=HEIGHT + 0.4)  # fmt: skip


def _cumulative_upload(part: pd.DataFrame) -> pd.Series:
    """MB uploaded by the clients up to each round, the one-off uploads before training included: step 0's (the
    head's FedAvg run, for runs that start from the step-0 head) and the calibration scores."""
    part = part.sort_values(["run_id", "round"])
    total = part.groupby("run_id")["upload_bytes"].cumsum()
    for before in ("step0_upload_bytes", "calibration_upload_bytes"):
        if before in part:
            total = total + part[before].fillna(0)
    return total / 1e6


def _accuracy_per_upload(ax, data: pd.DataFrame, hue: str, order: list[str], title: str) -> None:
    """One panel: validation accuracy against cumulative upload (MB, log scale), one line per `hue` value."""
    import seaborn as sns

    sns.lineplot(data=data, x="upload_mb", y="val_acc", errorbar="sd", markeredgewidth=0, ax=ax,
                 **line_styles(hue, order))  # fmt: skip
    stack_markers(ax, order)
    ax.set_xscale("log")
    log_ticks(ax)
    ax.set_title(title)
    ax.set_xlabel("")
    ax.set_ylabel(LABELS["val_acc"])


def fig_communication(df: pd.DataFrame) -> Figure:
    """Federated fine-tuning: validation accuracy against cumulative upload, one panel per sharding; each sparsity at
    the largest R (the most calibration upload; the grid's 9 cells would crowd a panel), the dense runs."""
    part = with_method_and_setting(select(df, "editing_federated", ("round", "upload_bytes", "val_acc")))
    sparse = sparse_rows(part)
    part = part[~sparse | (part["calibration_rounds"] == part.loc[sparse, "calibration_rounds"].max())]
    part = part.dropna(subset=["upload_bytes"]).sort_values(["run_id", "round"])
    part["upload_mb"] = _cumulative_upload(part)
    part = part.dropna(subset=["val_acc"])
    settings = setting_order(part["setting"])
    fig, axes = _figure(FULL, len(settings), sharey=True)
    order = list(pd.unique(part.sort_values("method", key=lambda m: ~m.str.startswith("dense"))["method"]))
    for ax, setting in zip(axes, settings):
        title = setting if setting == "IID" else setting.replace("=", " = ")
        _accuracy_per_upload(ax, part[part["setting"] == setting], "method", order, title)
    fig.supxlabel(LABELS["upload_mb"] + ", log scale; step-0 and calibration uploads included", fontsize=8)
    _legend_on_top(fig, axes, None)
    return fig


def fig_remedies(df: pd.DataFrame) -> Figure:
    """Remedies against client drift, dense and sparse: validation accuracy against cumulative upload, one panel per
    (sharding, dense/sparse), one line per algorithm."""
    part = with_method_and_setting(select(df, "remedies", ("round", "upload_bytes", "val_acc")))
    part = with_algorithm(part.dropna(subset=["upload_bytes"])).sort_values(["run_id", "round"])
    part["upload_mb"] = _cumulative_upload(part)
    part["kind"] = np.where(part["sparsity"].fillna(0) > 0, "sparse", "dense")
    part = part.dropna(subset=["val_acc"])
    panels = [(s, k) for s in setting_order(part["setting"]) for k in ("dense", "sparse")]
    fig, axes = _figure(FULL, len(panels), sharey=True)
    order = [algorithm_title(a) for a in algorithm_order(part["algorithm"])]  # the registry's order, FedAvg first
    part["algorithm"] = part["algorithm"].map(algorithm_title)  # the legend reads FedAdam, not fedadam
    for ax, (setting, kind) in zip(axes, panels):
        data = part[(part["setting"] == setting) & (part["kind"] == kind)]
        _accuracy_per_upload(ax, data, "algorithm", order, f"{setting.replace('=', ' = ')}, {kind}")
    fig.supxlabel(LABELS["upload_mb"] + ", log scale; step-0 and calibration uploads included", fontsize=8)
    _legend_on_top(fig, axes, None)
    return fig


def fig_mask_rules(df: pd.DataFrame) -> Figure:
    """Per mask rule and control: final test accuracy and mean client-update cosine, one bar per sharding."""
    import seaborn as sns

    part = rules_with_controls(with_method_and_setting(select(df, "mask_strategies", ("mask_rule", "test_acc"))))
    part["mask_rule"] = part["mask_rule"].str.replace("_", " ")
    final = last_rows(part)
    if "drift_cos" in part:
        cos = part.groupby("run_id")["drift_cos"].mean()
        final = final.assign(drift_cos=final["run_id"].map(cos))
    order, hue_order = list(pd.unique(final["mask_rule"])), setting_order(final["setting"])
    fig, axes = _figure(FULL, 2, height=HEIGHT + 0.3, sharey=True)
    for ax, metric in zip(axes, ["test_acc", "drift_cos"]):
        if metric in final and final[metric].notna().any():
            sns.barplot(data=final, y="mask_rule", x=metric, hue="setting", order=order, hue_order=hue_order,
                        errorbar="sd", palette=palette_for(hue_order), orient="h", ax=ax)  # fmt: skip
        ax.set_xlabel(LABELS[metric] + (" (mean over rounds)" if metric == "drift_cos" else ""))
        ax.set_ylabel("")
    _legend_on_top(fig, axes, "sharding (classes per client)")
    return fig


FIGURES: dict[str, Callable[[pd.DataFrame], Figure]] = {
    "centralized_curves": fig_centralized_curves,
    "centralized_schedulers": fig_schedulers,
    "hparam_search": fig_hparam_search,
    "fedavg_iid": fig_fedavg_iid,
    "fedavg_heatmap": fig_fedavg_heatmap,
    "fedavg_curves": fig_fedavg_curves,
    "client_drift": fig_drift,
    "sparse_grid": fig_sparse_grid,
    "editing_curves": fig_editing_curves,
    "communication": fig_communication,
    "mask_rules": fig_mask_rules,
    "remedies": fig_remedies,
    "extension": fig_extension,
}


def make_figure(df: pd.DataFrame, name: str, strict: bool = False) -> Figure:
    """Figure `name` (see FIGURES) or a 'not run yet' placeholder; with strict=False other errors become one too."""
    check_one_profile(df)
    with paper_style():
        try:
            return FIGURES[name](df)
        except MissingResults as exc:
            return placeholder_figure(name.replace("_", " "), exc.args[0])
        except Exception as exc:  # a partial results file must not stop the notebook; strict for tests
            if strict:
                raise
            warnings.warn(f"figure {name}: {type(exc).__name__}: {exc}", stacklevel=2)
            return placeholder_figure(name.replace("_", " "), f"(could not plot: {type(exc).__name__})")


def write_figures(
    df: pd.DataFrame, profile: str, root: str | Path | None = None, strict: bool = False
) -> dict[str, Figure]:
    """Make and save every figure in FIGURES as PNG and PDF under figures/<profile>/; returns them."""
    figures = {}
    for name in FIGURES:
        figures[name] = make_figure(df, name, strict=strict)
        save_figure(figures[name], name, profile, root)
    return figures


def explore_figure(df: pd.DataFrame, source: str, metric: str, group: str | None) -> Figure:
    """`metric` per epoch/round of one results file, one line (mean +- std over the rest) per `group` value."""
    part = df[df["source"] == source].dropna(axis=1, how="all")
    step = next((s for s in STEP_COLUMNS[::-1] if s in part), None)
    if part.empty or step is None or metric not in part:
        return placeholder_figure(f"{source}: {metric}", f"{source}.csv with column {metric}")
    group = group if group in part else None
    if group:
        part = part.assign(**{group: part[group].astype(str)})
    with paper_style():
        return _curves(part.dropna(subset=[metric]), step, [metric], group, HALF * 1.5, legend=group)
