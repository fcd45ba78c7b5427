"""Figures for notebooks and the report. Every function returns a matplotlib Figure and never calls show().

Figures are built with `matplotlib.figure.Figure` rather than pyplot: no global state, nothing leaks when
many are made in a loop, it works headless (MPLBACKEND=Agg), and a notebook still shows a returned Figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers.reporting.results import tidy_results

# The report's article class (10pt, a4paper, 2.2 cm margins) has \textwidth = 472.31595 pt (72.27 pt per inch):
# report figures are drawn at these printed widths and included unscaled, so a 7 pt font prints at 7 pt.
TEXT_WIDTH_IN = 472.31595 / 72.27
HALF_WIDTH_IN = (TEXT_WIDTH_IN - 0.15) / 2  # two figures side by side with a \hfill gap
PANEL_HEIGHT_IN = 2.0  # one row of report panels with its legend
MIN_FONT_PT = 7
PAPER_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "figure.titlesize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text (searchable, sharp at any zoom)
}
# Paul Tol's "bright" scheme, then black and grey: distinct for colour-blind readers (seaborn's "colorblind" has two
# near-identical oranges). Print in grey loses hue: line_styles adds a marker and a dash pattern per line.
PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#000000", "#BBBBBB")
REFERENCE_COLOUR = "#444444"  # dashed reference lines: a dark grey, unlike every colour of PALETTE
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("", (4, 1.5), (1, 1), (4, 1, 1, 1), (2, 2), (6, 2), (3, 1, 1, 1, 1, 1), (1, 2))


@contextmanager
def paper_style():
    """Seaborn's whitegrid with the report's font sizes (>= MIN_FONT_PT at printed size)."""
    import matplotlib as mpl
    import seaborn as sns

    with sns.axes_style("whitegrid"), mpl.rc_context(PAPER_RC):
        yield


def integer_ticks(ax, axis: str = "x") -> None:
    """Ticks only at integers on `axis` of `ax` (epochs, rounds, J): never 4.0 or 2.5."""
    from matplotlib.ticker import MaxNLocator

    # min_n_ticks=1: with the default (2) a range holding one integer (a one-round run) gets fractional ticks
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(nbins="auto", integer=True, min_n_ticks=1))


def _labels(labels) -> np.ndarray:
    """Class ids as a numpy array (a torch tensor is moved to the CPU first, without importing torch)."""
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).astype(np.int64, copy=False)


def palette_for(levels: list) -> dict:
    """Each level its colour of PALETTE, in order (cycling past its length)."""
    return {level: PALETTE[i % len(PALETTE)] for i, level in enumerate(levels)}


def line_styles(hue: str, levels: list) -> dict:
    """seaborn lineplot keywords giving each `hue` level its own colour, marker, dash pattern and line width.

    Widths fall along `levels`, the order seaborn draws them in: a line hidden under a later one that coincides with
    it still shows around it (stack_markers does the same for the markers); dashes and markers tell lines apart in
    print.
    """
    return {
        "hue": hue, "hue_order": levels, "palette": palette_for(levels),
        "style": hue, "style_order": levels, "size": hue, "size_order": levels,
        "markers": {lv: MARKERS[i % len(MARKERS)] for i, lv in enumerate(levels)},
        "dashes": {lv: DASHES[i % len(DASHES)] for i, lv in enumerate(levels)},
        "sizes": dict(zip(levels, _falling(len(levels), 2.6, 1.0))),
    }  # fmt: skip


def stack_markers(ax, levels: list) -> None:
    """Marker sizes falling along `levels` (known by their colour) on the lines of panel `ax` and its legend: markers
    of lines that coincide sit inside one another, every one visible."""
    from matplotlib.colors import to_hex

    sizes = dict(zip((to_hex(c) for c in palette_for(levels).values()), _falling(len(levels), 6.0, 3.0)))
    legend = ax.get_legend()
    for artist in [*ax.lines, *(legend.legend_handles if legend else [])]:
        size = sizes.get(to_hex(artist.get_color())) if hasattr(artist, "get_marker") else None
        if size is not None and artist.get_marker() not in (None, "None", ""):
            artist.set_markersize(size)


def _falling(n: int, first: float, last: float) -> list[float]:
    return [float(v) for v in np.linspace(first, last, n)] if n > 1 else [(first + last) / 2]


def log_ticks(ax, least: int = 3) -> None:
    """At least `least` labelled ticks on the log x axis of `ax`, as plain numbers (10, 30, 100 or 4, 6, 9).

    Matplotlib labels only powers of ten: a panel spanning less than a decade would show one label, or none.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.xaxis.set_major_locator(FixedLocator(readable_log_ticks(*sorted(ax.get_xlim()), least)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.xaxis.set_minor_formatter(NullFormatter())  # matplotlib labels minor ticks of short ranges: they would overlap


def readable_log_ticks(lo: float, hi: float, least: int = 3) -> list[float]:
    """`least` or a few more round values in [lo, hi] (multiples of one step of 1, 2 or 5 x 10^e), spread over the log
    scale so that their labels never crowd."""
    if hi / lo >= 10:  # whole decades: 1, 10, 100; or 1, 3, 10, 30; or 1, 2, 5, 10
        decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
        for steps in ((1,), (1, 3), (1, 2, 5)):
            ticks = [m * 10.0**e for e in decades for m in steps if lo <= m * 10.0**e <= hi]
            if len(ticks) >= least:
                return ticks
    top = int(np.ceil(np.log10(hi)))
    for exponent in range(top, top - 12, -1):  # multiples of the largest round step (5, 2, 1 x 10^e) that give enough
        for m in (5, 2, 1):
            step = m * 10.0**exponent
            multiples = [round(k * step, 12) for k in range(int(np.ceil(lo / step)), int(np.floor(hi / step)) + 1)]
            ticks = []
            for t in multiples:  # on a log axis the large ones crowd: keep ticks at least 15% of the axis apart
                if not ticks or np.log(t / ticks[-1]) >= 0.15 * np.log(hi / lo):
                    ticks.append(t)
            if least <= len(ticks) <= 8:
                return ticks
    return [float(v) for v in lo * (hi / lo) ** np.linspace(0.1, 0.9, least)]


def _plain_number(value: float, _pos=None) -> str:
    """4.5 -> '4.5', 20 -> '20', 20000 -> '20k' (short enough for a panel a quarter of the text wide)."""
    return f"{value / 1e3:g}k" if value >= 1e4 else f"{value:g}"


def plot_shard_stats(labels, shards, num_classes: int | None = None, title: str | None = None) -> Figure:
    """Client x class count heatmap (clients on y) beside each client's shard size (bars on the same y)."""
    y = _labels(labels)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    counts = np.stack([np.bincount(y[np.asarray(s)], minlength=num_classes) for s in shards])
    sizes = counts.sum(axis=1)
    k = len(shards)

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_map, ax_size = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [4, 1]})
    # extent puts cell centres on integer client/class ids, so the shared y axis lines up with the bars.
    im = ax_map.imshow(
        counts,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        origin="upper",
        extent=(-0.5, num_classes - 0.5, k - 0.5, -0.5),
    )
    ax_map.set_xlabel("class")
    ax_map.set_ylabel("client")
    ax_map.set_title("samples per client and class")
    fig.colorbar(im, ax=ax_map, label="samples", pad=0.01)

    # Touching bars when there are many clients: gaps narrower than a pixel render as stripes.
    ax_size.barh(np.arange(k), sizes, height=1.0 if k > 40 else 0.8, color="tab:blue", linewidth=0)
    ax_size.set_xlabel("shard size (samples)")
    ax_size.set_title(f"sizes {sizes.min()}-{sizes.max()}")
    ax_size.set_ylim(k - 0.5, -0.5)
    if title:
        fig.suptitle(title)
    return fig


def plot_class_histogram(labels, num_classes: int = 100, title: str = "training samples per class") -> Figure:
    """Bar chart of samples per class (checks the split is stratified and balanced)."""
    counts = np.bincount(_labels(labels), minlength=num_classes)
    fig = Figure(figsize=(10, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(num_classes), counts, width=1.0, color="tab:blue", linewidth=0)
    ax.set_xlabel("class")
    ax.set_ylabel("samples")
    ax.set_title(f"{title} (min {counts.min()}, max {counts.max()})")
    return fig


def plot_image_grid(images, labels, rows: int = 4, cols: int = 8, class_names=None) -> Figure:
    """The first rows*cols uint8 images (N, 3, H, W) with their labels."""
    n = min(rows * cols, len(images))
    pictures = np.asarray(images[:n].cpu()).transpose(0, 2, 3, 1)
    names = [class_names[int(i)] if class_names else str(int(i)) for i in _labels(labels)[:n]]
    fig = Figure(figsize=(cols * 1.2, rows * 1.35), layout="constrained")
    for i, ax in enumerate(fig.subplots(rows, cols).flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pictures[i], interpolation="nearest")
            ax.set_title(names[i], fontsize=8)
    return fig


def plot_curves(
    df,
    x: str,
    metrics: list[str],
    hue: str | None = None,
    title: str | None = None,
    reference: dict[str, float] | None = None,
    *,
    hue_order: list | None = None,
    labels: dict[str, str] | None = None,
    legend_title: str | None = None,
    reference_label: str = "reference",
    panel_size: tuple[float, float] = (4.5, 3.4),
) -> Figure:
    """One panel per metric against `x`; mean +- std band over runs sharing a `hue` value (e.g. seeds).

    `reference` maps a metric to a dashed horizontal line (e.g. the centralized result); `labels` names axes.
    """
    import pandas as pd
    import seaborn as sns

    labels = labels or {}
    width, height = panel_size
    fig = Figure(figsize=(width * len(metrics) + (1.4 if hue else 0), height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)[0])
    palette = palette_for(hue_order or list(pd.unique(df[hue].dropna()))) if hue in df else None  # same in every panel
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        data = df.dropna(subset=[metric]) if metric in df else df.iloc[:0]
        if data.empty:
            ax.text(0.5, 0.5, f"{metric}: not run yet", ha="center", va="center", transform=ax.transAxes)
        else:
            sns.lineplot(data=data, x=x, y=metric, hue=hue, hue_order=hue_order, errorbar="sd", marker="o",
                         markersize=3, ax=ax, palette=palette if hue else None,
                         legend=bool(hue) and i == len(metrics) - 1)  # fmt: skip
        if reference and metric in reference:
            ax.axhline(reference[metric], ls="--", color=REFERENCE_COLOUR, label=reference_label)
        if x in df and pd.api.types.is_integer_dtype(df[x]):  # epochs, rounds: no fractional ticks
            integer_ticks(ax)
        ax.set_xlabel(labels.get(x, x))
        default = metric.replace("_", " ") + (" (fraction)" if metric.endswith("acc") else "")
        ax.set_ylabel(labels.get(metric, default))
    if hue and axes[-1].get_legend() is not None:  # one legend, outside the panels
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), title=legend_title or hue, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def _rounds_frame(df_or_runs):
    """A tidy DataFrame from a DataFrame, one Run or a list of Runs (metrics joined with config columns)."""
    if isinstance(df_or_runs, pd.DataFrame):
        return df_or_runs
    return tidy_results([df_or_runs] if hasattr(df_or_runs, "metrics") else list(df_or_runs))


def plot_rounds(
    df_or_runs,
    metrics: tuple[str, ...] = ("val_acc", "val_loss"),
    hue: str | None = None,
    reference: float | dict[str, float] | None = None,
    title: str | None = None,
) -> Figure:
    """FedAvg accuracy/loss against rounds; `reference` (e.g. centralized accuracy) is drawn dashed.

    A number as `reference` goes on the accuracy panels; a dict maps metric -> value.
    """
    if reference is not None and not isinstance(reference, dict):
        reference = {m: float(reference) for m in metrics if m.endswith("acc")}
    return plot_curves(_rounds_frame(df_or_runs), "round", list(metrics), hue=hue, title=title, reference=reference)


def plot_drift(df_or_runs, hue: str | None = None, title: str | None = "client drift") -> Figure:
    """Client drift per round: mean update norm and mean pairwise cosine between client updates."""
    return plot_curves(_rounds_frame(df_or_runs), "round", ["drift_norm", "drift_cos"], hue=hue, title=title)


def plot_heatmap(
    df,
    index: str,
    columns: str,
    value: str,
    fmt: str = ".3f",
    title: str | None = None,
    cmap: str = "viridis",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Annotated heatmap of `value` (mean over rows sharing a cell, e.g. seeds) over (`index`, `columns`).

    Rows and columns keep their order of first appearance in `df` (so e.g. an "IID" row can be put last);
    cells with no data stay blank. `figsize` (inches) defaults to a size that grows with the table.
    """
    import pandas as pd
    import seaborn as sns

    rows, cols = list(pd.unique(df[index])), list(pd.unique(df[columns]))
    table = df.groupby([index, columns], sort=False)[value].mean().unstack(columns)
    table = table.reindex(index=rows, columns=cols).astype(float)
    fig = Figure(figsize=figsize or (1.3 * len(cols) + 2.5, 0.55 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    if table.empty or table.isna().all().all():
        ax.text(0.5, 0.5, f"{value}: not run yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        sns.heatmap(
            table, annot=True, fmt=fmt, cmap=cmap, ax=ax, cbar_kws={"label": value.replace("_", " ")}, linewidths=0.5
        )
        ax.set_xlabel(columns)
        ax.set_ylabel(index)
        ax.tick_params(axis="y", rotation=0)
    if title:
        ax.set_title(title)
    return fig


def plot_facets(
    df, x: str, metric: str, col: str, hue: str | None = None, title: str | None = None, reference: float | None = None
) -> Figure:
    """One panel per value of `col` (e.g. J), `metric` against `x` with one line per `hue` (e.g. Nc).

    Shared y axis so panels compare; mean +- std band over runs sharing (col, hue) (seeds); `reference` is
    drawn dashed in every panel. Panel and hue order follow first appearance in `df`.
    """
    import pandas as pd
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    data = df.dropna(subset=[metric]) if metric in df else df.iloc[:0]
    panels = list(pd.unique(df[col])) if col in df else []
    fig = Figure(figsize=(4.2 * max(1, len(panels)) + 1.2, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0])
    hue_order = list(pd.unique(data[hue])) if hue and not data.empty else None
    palette = palette_for(hue_order) if hue_order else None
    parts = [data[data[col] == value] for value in panels] if panels else [data]
    with_data = [i for i, part in enumerate(parts) if not part.empty]
    for i, (ax, part) in enumerate(zip(axes, parts)):
        if part.empty:
            ax.text(0.5, 0.5, f"{metric}: not run yet", ha="center", va="center", transform=ax.transAxes)
        else:  # one legend, on the last panel with data; colours fixed per hue value across panels
            sns.lineplot(
                data=part,
                x=x,
                y=metric,
                hue=hue,
                hue_order=hue_order,
                errorbar="sd",
                marker="o",
                markersize=4,
                ax=ax,
                palette=palette,
                legend=bool(hue) and i == with_data[-1],
            )
        if reference is not None:
            ax.axhline(reference, ls="--", color=REFERENCE_COLOUR, label="reference")
        ax.set_title(f"{col} = {panels[i]}" if panels else metric)
        if x in df and pd.api.types.is_integer_dtype(df[x]):  # rounds, steps: no fractional ticks
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x)
        ax.set_ylabel(metric.replace("_", " ") + (" (fraction)" if metric.endswith("acc") else ""))
    if with_data and axes[with_data[-1]].get_legend() is not None:
        sns.move_legend(axes[with_data[-1]], "upper left", bbox_to_anchor=(1.02, 1), title=hue)
    if title:
        fig.suptitle(title)
    return fig


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
