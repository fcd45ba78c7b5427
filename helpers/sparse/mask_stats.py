"""Statistics and plots of masks (bool, True = trainable): density per tensor and layer, Jaccard overlap."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor, nn

from helpers.core.models import backbone_parameters
from helpers.sparse.masks import overall_density


def mask_density_table(masks: Mapping[str, Tensor], model: nn.Module | None = None) -> pd.DataFrame:
    """Per-tensor name, entries, trainable, density; with `model`, in model order and checked against it."""
    names = list(masks)
    if model is not None:
        params = backbone_parameters(model, masks, what="masks")
        for n, p in params.items():
            if masks[n].shape != p.shape:
                raise ValueError(f"masks: {n} has shape {tuple(masks[n].shape)}, parameter {tuple(p.shape)}")
        names = list(params)
    rows = []
    for n in names:
        entries, kept = masks[n].numel(), int(masks[n].count_nonzero())
        rows.append({"name": n, "entries": entries, "trainable": kept, "density": kept / max(entries, 1)})
    return pd.DataFrame(rows, columns=["name", "entries", "trainable", "density"])


def mask_jaccard(masks_a: Mapping[str, Tensor], masks_b: Mapping[str, Tensor]) -> float:
    """|A & B| / |A | B| of the two trainable sets (1.0 when both are empty)."""
    if set(masks_a) != set(masks_b):
        raise ValueError("masks_a and masks_b must cover the same parameter names")
    inter = union = 0
    for n, a in masks_a.items():
        a, b = a.bool(), masks_b[n].bool().to(a.device)
        if a.shape != b.shape:
            raise ValueError(f"masks_a and masks_b differ in shape at {n}")
        inter += int((a & b).sum())
        union += int((a | b).sum())
    return inter / union if union else 1.0


def layer_of(name: str) -> str:
    """'blocks.3.attn.qkv.weight' -> 'blocks.3'; 'patch_embed.proj.weight' -> 'patch_embed'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else parts[0]


def layer_density(masks: Mapping[str, Tensor]) -> pd.DataFrame:
    """Per layer (see layer_of, in mask order): entries, trainable, density."""
    table = mask_density_table(masks)
    table["layer"] = table["name"].map(layer_of)
    table = table.groupby("layer", sort=False)[["entries", "trainable"]].sum().reset_index()
    table["density"] = table["trainable"] / table["entries"].clip(lower=1)
    return table


def layer_density_table(masks_by_label: Mapping[str, Mapping[str, Tensor]]) -> pd.DataFrame:
    """Trainable fraction per layer (patch_embed, blocks.i, norm, ...) of each labelled mask."""
    return pd.concat([layer_density(m).assign(mask=label) for label, m in masks_by_label.items()], ignore_index=True)


def jaccard_matrix(masks_by_label: Mapping[str, Mapping[str, Tensor]]) -> pd.DataFrame:
    """Pairwise Jaccard overlap |A & B| / |A | B| of the trainable sets."""
    labels = list(masks_by_label)
    values = [[mask_jaccard(masks_by_label[a], masks_by_label[b]) for b in labels] for a in labels]
    return pd.DataFrame(values, index=labels, columns=labels)


def plot_mask_density(masks: Mapping[str, Tensor], by: str = "layer") -> Figure:
    """Bar chart of trainable fraction per layer (`by="layer"`) or per tensor (`by="tensor"`)."""
    if by not in ("layer", "tensor"):
        raise ValueError(f"by={by!r} is not supported; allowed: layer, tensor")
    table = layer_density(masks).rename(columns={"layer": "name"}) if by == "layer" else mask_density_table(masks)
    fig = Figure(figsize=(max(6.0, 0.25 * len(table) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(table)), table["density"], color="tab:blue")
    ax.axhline(overall_density(masks), color="tab:red", ls="--", lw=1, label="overall")
    ax.set_xticks(range(len(table)), table["name"], rotation=90, fontsize=7)
    ax.set_ylabel("trainable fraction")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    return fig


def plot_layer_density(masks_by_label: Mapping[str, Mapping[str, Tensor]], title: str | None = None) -> Figure:
    """Grouped bars: trainable fraction per layer, one colour per labelled mask."""
    import seaborn as sns

    table = layer_density_table(masks_by_label)
    fig = Figure(figsize=(max(6.0, 0.5 * table["layer"].nunique() + 3), 3.6), layout="constrained")
    ax = fig.add_subplot()
    sns.barplot(data=table, x="layer", y="density", hue="mask", ax=ax, palette="colorblind")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.set_ylabel("trainable fraction")
    ax.set_xlabel("")
    if title:
        ax.set_title(title)
    return fig


def plot_jaccard(matrix: pd.DataFrame, title: str | None = None) -> Figure:
    """Heatmap of a jaccard_matrix."""
    import seaborn as sns

    fig = Figure(figsize=(1.1 * len(matrix) + 2.5, 0.9 * len(matrix) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(matrix, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", square=True, ax=ax)
    ax.set_title(title or "Jaccard overlap of trainable entries")
    return fig
