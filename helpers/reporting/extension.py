"""The extension's results, results/<profile>/extension.csv (its runs: helpers.ops.plans.extension_configs): FedAvg's
mean against TIES-merging inside the round, each dense (step-0 head) and sparse, with the interference diagnostic on.
Its rows for the report's table (TABLES["extension"]) and its figure (FIGURES["extension"]: accuracy and
interference per round). TIES enters at its merge_density chosen on validation, per dense/sparse. Torch-free."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers.reporting.labels import merge_label
from helpers.reporting.plots import PANEL_HEIGHT_IN, TEXT_WIDTH_IN, integer_ticks, line_styles, stack_markers
from helpers.reporting.results import last_rows
from helpers.reporting.summaries import select

SOURCE = "extension"  # results/<profile>/extension.csv
PANELS = {"val_acc": "val. accuracy", "interference": "interference"}
MARKS = 25  # markers per line at most: a marker every round of a long run would hide the lines


def chosen_densities(final: pd.DataFrame) -> dict[float, float]:
    """sparsity -> merge_density of the TIES runs with the best final validation accuracy (mean over seeds) at it;
    a tie goes to the lower validation loss, then to the lower density."""
    ties = final[final["merge"] == "ties"] if "merge" in final else final.iloc[:0]
    means = ties.groupby(["sparsity", "merge_density"])[["val_acc", "val_loss"]].mean().reset_index()
    ranked = means.sort_values(["val_acc", "val_loss", "merge_density"], ascending=[False, True, True])
    return dict(ranked.drop_duplicates("sparsity")[["sparsity", "merge_density"]].itertuples(index=False))


def extension_rows(part: pd.DataFrame) -> pd.DataFrame:
    """The extension's rows (of select(df, SOURCE)) with `variant` (dense or sparse, FedAvg mean or TIES at its
    chosen density) and `mean_interference` (each run's mean over its rounds); the other TIES densities (the tuning)
    and step-0 rows left out."""
    part = part[part["experiment"] != "step0"] if "experiment" in part else part
    merge = part["merge"].fillna("mean") if "merge" in part else pd.Series("mean", index=part.index)
    density = part["merge_density"] if "merge_density" in part else pd.Series(np.nan, index=part.index)
    part = part.assign(merge=merge, merge_density=density)
    chosen = chosen_densities(last_rows(part))
    part = part[(part["merge"] != "ties") | (part["merge_density"] == part["sparsity"].map(chosen))]
    kind = np.where(part["sparsity"].fillna(0) > 0, "sparse", "dense")
    part = part.assign(
        variant=[f"{k}, {merge_label(m, d)}" for k, m, d in zip(kind, part["merge"], part["merge_density"])]
    )
    if "interference" in part:
        part["mean_interference"] = part.groupby("run_id")["interference"].transform("mean")
    return part


def fig_extension(df: pd.DataFrame) -> Figure:
    """Validation accuracy and interference per round, one line per variant (dense/sparse x mean/TIES; band: std
    over seeds)."""
    import seaborn as sns

    part = extension_rows(select(df, SOURCE, ("round", *PANELS)))
    order = sorted(pd.unique(part["variant"]))  # dense before sparse, FedAvg's mean before TIES
    fig = Figure(figsize=(TEXT_WIDTH_IN, PANEL_HEIGHT_IN), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (metric, label) in zip(axes, PANELS.items()):
        data = part.dropna(subset=[metric])
        every = max(1, data.groupby("variant")["round"].nunique().max() // MARKS)
        sns.lineplot(data=data, x="round", y=metric, errorbar="sd", markersize=3, markeredgewidth=0, markevery=every,
                     ax=ax, **line_styles("variant", order))  # fmt: skip
        stack_markers(ax, order)
        integer_ticks(ax)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), frameon=False, columnspacing=1.0,
               handlelength=1.5)  # fmt: skip
    return fig
