"""The calibration sample-count study of 04: how the mask depends on how many images are scored."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from helpers.data.datasets import Data
from helpers.editing.calibration import calibrate_centralized
from helpers.sparse.mask_stats import mask_jaccard


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
