"""The extension's results, results/<profile>/extension.csv (its runs: helpers.ops.comparisons.extension_configs):
FedAvg's mean against TIES-merging inside the round, each dense (step-0 head) and sparse, at the remedies' settings
(Nc in REMEDY_NC, J = REMEDY_J), with the interference diagnostic on; TIES at its merge_density chosen on validation
(its tuning: extension_tuning.csv). Its rows for the report's table (TABLES["extension"]) and its figure
(FIGURES["extension"]: accuracy and interference per round at the hardest Nc). Torch-free."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers.reporting.labels import merge_label
from helpers.reporting.plots import PANEL_HEIGHT_IN, TEXT_WIDTH_IN, integer_ticks, line_styles, stack_markers
from helpers.reporting.results import last_rows
from helpers.reporting.summaries import MissingResults, select

SOURCE = "extension"  # results/<profile>/extension.csv
PANELS = {"val_acc": "val. accuracy", "interference": "interference"}
MARKS = 25  # markers per line at most: a marker every round of a long run would hide the lines


def extension_rows(part: pd.DataFrame) -> pd.DataFrame:
    """The extension's rows (of select(df, SOURCE), or of tidy results) with `variant` (dense or sparse, FedAvg's
    mean or TIES at its density) and `mean_interference` (each run's mean over its rounds; NaN for a run trained
    without the diagnostic); step-0 rows left out."""
    part = part[part["experiment"] != "step0"] if "experiment" in part else part
    merge = part["merge"].fillna("mean") if "merge" in part else pd.Series("mean", index=part.index)
    density = part["merge_density"] if "merge_density" in part else pd.Series(np.nan, index=part.index)
    kind = np.where(part["sparsity"].fillna(0) > 0, "sparse", "dense")
    part = part.assign(
        merge=merge,
        merge_density=density,
        variant=[f"{k}, {merge_label(m, d)}" for k, m, d in zip(kind, merge, density)],
    )
    interference = part["interference"] if "interference" in part else pd.Series(np.nan, index=part.index)
    return part.assign(mean_interference=interference.groupby(part["run_id"]).transform("mean"))


def extension_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run of the extension (tidy rows of its runs): Nc, variant, final validation and test accuracy,
    the interference averaged over its rounds and in its last round."""
    final = last_rows(extension_rows(table))
    columns = ["classes_per_client", "variant", "val_acc", "test_acc", "mean_interference", "interference"]
    final = final.reindex(columns=columns).rename(
        columns={"classes_per_client": "Nc", "interference": "last_interference"}
    )
    return final.sort_values(["Nc", "variant"]).reset_index(drop=True)


def fig_extension(df: pd.DataFrame) -> Figure:
    """Validation accuracy and interference per round at the hardest Nc, one line per variant (dense/sparse x
    mean/TIES; band: std over seeds)."""
    import seaborn as sns

    part = extension_rows(select(df, SOURCE, ("round", *PANELS)))
    if "classes_per_client" in part and part["classes_per_client"].notna().any():
        part = part[part["classes_per_client"] == part["classes_per_client"].min()]
    if part["interference"].isna().all():
        raise MissingResults(f"{SOURCE}.csv (no interference)")
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
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), frameon=False, columnspacing=1.0,
               handlelength=1.5)  # fmt: skip
    return fig
