"""From results/ to the report: load every tidy CSV, summarise over seeds, make report figures and LaTeX tables.

Results schema (every CSV under ``results/<profile>/``, written by ``helpers.runs.write_results``): one row per
(run, epoch | round), tidy, so any column can be a grouping key.

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
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from helpers.runs import _repo_results, with_integer_columns

REPO = Path(__file__).resolve().parent.parent
FIGURES_ROOT_ENV = "FLME_FIGURES_ROOT"
TABLES_ROOT_ENV = "FLME_TABLES_ROOT"
STEP_COLUMNS = ("epoch", "round")
PALETTE = "colorblind"
LABELS = {  # axis labels with units
    "epoch": "epoch",
    "round": "communication round",
    "train_loss": "train loss (cross-entropy, nats)",
    "val_loss": "validation loss (cross-entropy, nats)",
    "test_loss": "test loss (cross-entropy, nats)",
    "val_acc": "validation accuracy (fraction)",
    "test_acc": "test accuracy (fraction)",
    "drift_norm": "client update norm (L2)",
    "drift_cos": "mean pairwise cosine of client updates",
    "upload_mb": "uploaded by clients, cumulative (MB)",
    "local_steps": "local steps J",
    "sparsity": "sparsity (fraction frozen)",
    "calibration_rounds": "calibration rounds R",
}


class MissingResults(LookupError):
    """The results a figure or table needs are not there (yet)."""


# ----------------------------------------------------------------------------- loading and summaries


def load_results(profile: str, root: str | Path | None = None) -> pd.DataFrame:
    """Every CSV under <root>/<profile>/ in one frame with a `source` column (file stem); empty if none."""
    folder = Path(root if root is not None else _repo_results()) / profile
    frames = []
    for path in sorted(folder.glob("*.csv")):
        try:
            frame = pd.read_csv(path, dtype={"clients": str})
        except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError):
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


def step_of(df: pd.DataFrame) -> pd.Series:
    """Each row's step: its round if it has one, else its epoch (0 if neither)."""
    step = pd.Series(0.0, index=df.index)
    for column in STEP_COLUMNS:
        if column in df:
            step = df[column].where(df[column].notna(), step)
    return step


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, run): the run's last step (rows keep their order in `df`)."""
    if df.empty:
        return df
    keys = [k for k in ("source", "run_id") if k in df]
    df = df.reset_index(drop=True)
    last = df.assign(_step=step_of(df)).groupby(keys, sort=False)["_step"].idxmax()
    return df.loc[sorted(last)]  # row order kept: tables list configurations in the order given


def summarize(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and n over runs (seeds) of each run's final `metrics`, one row per combination of `keys`."""
    last = final_rows(df)
    parts = {}
    for metric in metrics:
        grouped = last.groupby(keys, sort=False, dropna=False)[metric]
        parts[metric] = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    return pd.concat(parts, axis=1)


def with_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Add `method` (helpers.editing.method_label: dense, head only, sparse s=.. R=.., the two controls) and
    `setting` (IID or Nc=k) columns where they apply."""
    from helpers.editing import method_labels

    df = df.copy()
    df["method"] = method_labels(df)
    if "sharding" in df:
        nc = df["classes_per_client"] if "classes_per_client" in df else pd.Series(np.nan, index=df.index)
        df["setting"] = [
            "IID" if s == "iid" else f"Nc={int(n)}" if pd.notna(n) else str(s) for s, n in zip(df["sharding"], nc)
        ]
    return df


def _setting_order(values) -> list[str]:
    """Non-IID settings by increasing Nc, IID last (from most to least heterogeneous)."""

    def key(v: str) -> float:
        return math.inf if v == "IID" else float(re.sub(r"\D", "", v) or 0)

    return sorted(pd.unique(pd.Series(list(values)).dropna()), key=key)


# ----------------------------------------------------------------------------- output folders


def figures_dir(profile: str, root: str | Path | None = None) -> Path:
    """<root>/<profile>/, created; root is `root`, else $FLME_FIGURES_ROOT, else figures/ beside helpers/."""
    base = root if root is not None else os.environ.get(FIGURES_ROOT_ENV) or REPO / "figures"
    folder = Path(base) / profile
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tables_dir(profile: str, root: str | Path | None = None) -> Path:
    """<root>/<profile>/, created; root is `root`, else $FLME_TABLES_ROOT, else report/generated/."""
    base = root if root is not None else os.environ.get(TABLES_ROOT_ENV) or REPO / "report" / "generated"
    folder = Path(base) / profile
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig: Figure, name: str, profile: str, root: str | Path | None = None) -> list[Path]:
    """Write `fig` as <name>.png (150 dpi) and <name>.pdf under figures/<profile>/."""
    folder = figures_dir(profile, root)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        metadata = None if path.suffix == ".png" else {"CreationDate": None}  # reproducible PDFs
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
    return paths


def write_profile_macro(profile: str, root: str | Path | None = None) -> Path:
    """report/generated/profile.tex: `\\profile`, the profile whose figures and tables main.tex shows."""
    base = Path(root if root is not None else os.environ.get(TABLES_ROOT_ENV) or REPO / "report" / "generated")
    base.mkdir(parents=True, exist_ok=True)
    path = base / "profile.tex"
    path.write_text(f"% generated by notebooks/07_report_figures.ipynb\n\\newcommand{{\\profile}}{{{profile}}}\n")
    return path


# ----------------------------------------------------------------------------- LaTeX tables


def latex_escape(text: object) -> str:
    """`text` with LaTeX special characters escaped."""
    out = str(text)
    for char, repl in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
    ):
        out = out.replace(char, repl)
    return out


def _cell(mean: float, std: float, n: int, digits: int, bold: bool) -> str:
    if pd.isna(mean):
        return "--"
    text = f"{mean:.{digits}f}" + (rf" \pm {std:.{digits}f}" if n > 1 and pd.notna(std) else "")
    return f"$\\mathbf{{{text}}}$" if bold else f"${text}$"


def _higher_is_better(metric: str) -> bool:
    return not metric.endswith(("loss", "_s", "bytes", "norm"))


def latex_table(
    df: pd.DataFrame,
    index: str | list[str],
    metric: str | list[str],
    columns: str | None = None,
    *,
    digits: int = 3,
    caption: str = "",
    label: str = "",
    higher_is_better: bool | None = None,
) -> str:
    """Booktabs table of final `metric` (mean $\\pm$ std over seeds) per `index` (x `columns`); best in bold.

    With `columns`, one metric is pivoted (best over all cells); without, one column per metric (best per column).
    """
    index = [index] if isinstance(index, str) else list(index)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if columns is not None and len(metrics) != 1:
        raise ValueError("a pivoted table (columns=...) shows exactly one metric")
    stats = summarize(df, index + ([columns] if columns else []), metrics)
    if columns:
        m = metrics[0]
        rows_in_order = list(pd.unique(stats.index.droplevel(columns)))
        cols_in_order = list(pd.unique(stats.index.get_level_values(columns)))
        grid = {
            s: stats[(m, s)].unstack(columns).reindex(index=rows_in_order, columns=cols_in_order)
            for s in ("mean", "std", "n")
        }
        col_keys = list(grid["mean"].columns)
        short = SHORT_NAMES.get(columns, columns)
        headers = [latex_escape(f"{short} = {_fmt_key(c)}" if short else _fmt_key(c)) for c in col_keys]
        cells = {c: (grid["mean"][c], grid["std"][c], grid["n"][c]) for c in col_keys}
        best_pool = {c: grid["mean"].to_numpy(dtype=float) for c in col_keys}
        row_keys = list(grid["mean"].index)
        hib = {c: _higher_is_better(m) if higher_is_better is None else higher_is_better for c in col_keys}
    else:
        headers = [latex_escape(m.replace("_", " ")) for m in metrics]
        cells = {m: (stats[(m, "mean")], stats[(m, "std")], stats[(m, "n")]) for m in metrics}
        best_pool = {m: stats[(m, "mean")].to_numpy(dtype=float) for m in metrics}
        row_keys = list(stats.index)
        hib = {m: _higher_is_better(m) if higher_is_better is None else higher_is_better for m in metrics}
    best = {
        k: (np.nanmax if hib[k] else np.nanmin)(v) if np.isfinite(v).any() else np.nan for k, v in best_pool.items()
    }
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{" + "l" * len(index) + "r" * len(cells) + "}",
        r"\toprule",
        " & ".join([latex_escape(i.replace("_", " ")) for i in index] + headers) + r" \\",
        r"\midrule",
    ]
    for pos, key in enumerate(row_keys):
        key_cells = key if isinstance(key, tuple) else (key,)
        row = [latex_escape(_fmt_key(k)) for k in key_cells]
        for name, (mean, std, n) in cells.items():
            mu, sd, count = mean.iloc[pos], std.iloc[pos], n.iloc[pos]
            row.append(
                _cell(mu, sd, 0 if pd.isna(count) else int(count), digits, pd.notna(mu) and np.isclose(mu, best[name]))
            )
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + caption + r" Mean $\pm$ std over seeds (no $\pm$: one run); best in bold.}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _fmt_key(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def placeholder_table(caption: str, label: str, missing: str) -> str:
    """A table that says which results are missing, so the report still compiles."""
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            r"\begin{tabular}{l}",
            r"\toprule",
            r"\textbf{not run yet}: " + latex_escape(missing) + r" \\",
            r"\bottomrule",
            r"\end{tabular}",
            r"\caption{" + caption + "}",
            r"\label{" + label + "}",
            r"\end{table}",
            "",
        ]
    )


# name -> (source, index, metric, columns, caption, filter)
TABLES: dict[str, tuple] = {
    "centralized_final": (
        "centralized_*",
        ["stage", "scheduler"],
        ["val_acc", "test_acc", "test_loss"],
        None,
        "Centralized fine-tuning: final metrics per stage and learning-rate scheduler.",
        None,
    ),
    "hparam_search": (
        "centralized_grid",
        ["lr", "momentum"],
        "val_acc",
        "weight_decay",
        "Hyperparameter search (validation accuracy, chosen on the validation split).",
        None,
    ),
    "fedavg_grid": (
        "fedavg_noniid",
        "setting",
        "test_acc",
        "local_steps",
        "FedAvg final test accuracy per client heterogeneity (Nc classes per client) and local steps J.",
        None,
    ),
    "sparse_editing": (
        "editing_centralized",
        "sparsity",
        "test_acc",
        "calibration_rounds",
        "Sparse fine-tuning: final test accuracy per sparsity and calibration rounds R.",
        "sparse",
    ),
    "centralized_editing": (
        "editing_centralized",
        "method",
        ["val_acc", "test_acc"],
        None,
        "Centralized fine-tuning with the controls: dense with a new head (01), the linear probe (head only), "
        "dense with the step-0 head frozen, the step-0 model (no backbone training), and every sparse run.",
        None,
    ),
    "federated_editing": (
        "editing_federated",
        "method",
        "test_acc",
        "setting",
        "Federated fine-tuning per client heterogeneity: dense FedAvg (new head, 02/03), the controls (dense with "
        "the step-0 head frozen; the step-0 model) and sparse runs (sparsity s, calibration rounds R).",
        None,
    ),
    "mask_rules": (
        "mask_strategies",
        "mask_rule",
        "test_acc",
        "setting",
        "Mask rules at one sparsity, with the controls: final test accuracy per rule and client heterogeneity.",
        None,
    ),
}
SHORT_NAMES = {
    "local_steps": "J",
    "calibration_rounds": "R",
    "weight_decay": "wd",
    "method": "",
    "classes_per_client": "Nc",
}
STAGES = {
    "centralized_probe": "linear probe",
    "centralized_schedulers": "scheduler comparison",
    "centralized_final": "final runs",
}


def table_data(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows (with labels) that table `name` summarises; raises MissingResults."""
    source, index, metric, columns, _, only = TABLES[name]
    if name == "centralized_final":
        part = df[df["source"].isin(list(STAGES))] if "source" in df else df.iloc[:0]
        if part.empty or "test_acc" not in part:
            raise MissingResults("centralized_probe/schedulers/final.csv")
        return part.assign(stage=part["source"].map(STAGES), scheduler=part.get("scheduler", "--"))
    part = with_labels(select(df, source))
    if only == "sparse":  # sparse runs proper: the dense control (sparsity 0) and step-0 rows left out
        from helpers.editing import sparse_rows

        part = part[sparse_rows(part)]
    if name == "mask_rules":
        from helpers.editing import rules_with_controls

        part = rules_with_controls(part)
    needed = [
        *([index] if isinstance(index, str) else index),
        *([columns] if columns else []),
        *([metric] if isinstance(metric, str) else metric),
    ]
    lacking = [c for c in needed if c not in part or part[c].isna().all()]
    if part.empty or lacking:
        raise MissingResults(f"{source}.csv" + (f" (no {', '.join(lacking)})" if lacking else ""))
    return part


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows sorted by `keys`, sharding settings from Nc=1 up to IID (tables keep this order)."""
    order = {
        k: _setting_order(df[k]) if k == "setting" else list(STAGES.values()) for k in keys if k in ("setting", "stage")
    }
    ranked = df.assign(**{f"_{k}": df[k].map(v.index) for k, v in order.items()})
    by = [f"_{k}" if k in order else k for k in keys]
    return ranked.sort_values(by, kind="stable").drop(columns=[f"_{k}" for k in order])


def deviations_table(profile: str) -> str:
    """Where our runs differ from the TaLoS reference implementation, with the values the code uses."""
    from helpers.config import make_config

    central, fed = make_config("sparse_centralized", profile), make_config("sparse_fedavg", profile)
    k, per_client = fed["num_clients"], fed["calibration_samples"]
    rows = [
        ("optimiser", "AdamW-type (AdaptW), label smoothing optional",
         f"SGD with momentum {central['momentum']:g}, weight decay {central['weight_decay']:g} (SparseSGDM)"),
        ("gradient clipping", "global norm clipped to 1.0", "none"),
        ("masked entries", "Linear, attention, Conv2d and LayerNorm tensors; class and position embeddings "
         "trained densely", "every backbone tensor, class token and position embedding included "
         "(the parameter embeddings=dense selects the reference's choice)"),
        ("calibration samples", "its held-out split, up to 5,000 images per round",
         f"{central['calibration_samples']:,} train-split images per round centrally; {per_client:,} per client "
         f"({k * per_client:,} over K={k}) in FL"),
        ("density", "one threshold, every entry tied with it kept: can exceed the target",
         "exact: ties at the threshold broken by index"),
    ]  # fmt: skip
    body = [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    return "\n".join([
        r"\begin{table}[t]", r"\centering", r"\small",
        r"\begin{tabular}{p{0.16\linewidth}p{0.36\linewidth}p{0.38\linewidth}}", r"\toprule",
        r"aspect & TaLoS reference & this project \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
        r"\caption{Deviations from the TaLoS reference implementation (values: profile \texttt{" + profile + "}).}",
        r"\label{tab:deviations}", r"\end{table}", "",
    ])  # fmt: skip


def make_table(df: pd.DataFrame, name: str) -> str:
    """LaTeX for table `name` (see TABLES), or a 'not run yet' placeholder if its results are missing."""
    _, index, metric, columns, caption, _ = TABLES[name]
    label = f"tab:{name}"
    try:
        data = table_data(df, name)
    except MissingResults as exc:
        return placeholder_table(caption, label, f"results/<profile>/{exc.args[0]}")
    if isinstance(index, list):  # leave out index columns that are all empty (e.g. momentum in one-value grids)
        index = [i for i in index if data[i].notna().any()] or index[:1]
    keys = [*index, *([columns] if columns else [])] if isinstance(index, list) else [index, columns]
    return latex_table(_sorted(data, [k for k in keys if k]), index, metric, columns, caption=caption, label=label)


def write_tables(df: pd.DataFrame, profile: str, root: str | Path | None = None) -> list[Path]:
    """Write every table in TABLES to report/generated/<profile>/<name>.tex (and the profile macro)."""
    check_one_profile(df)
    folder = tables_dir(profile, root)
    paths = []
    for name in TABLES:
        path = folder / f"{name}.tex"
        path.write_text(make_table(df, name))
        paths.append(path)
    paths.append(folder / "deviations.tex")
    paths[-1].write_text(deviations_table(profile))
    paths.append(write_profile_macro(profile, folder.parent))
    return paths


# ----------------------------------------------------------------------------- figures


def placeholder_figure(title: str, missing: str) -> Figure:
    """A figure that says 'not run yet' and which results file it needs."""
    fig = Figure(figsize=(6, 2.4), layout="constrained")
    ax = fig.subplots()
    ax.text(0.5, 0.55, "not run yet", ha="center", va="center", fontsize=16, transform=ax.transAxes)
    ax.text(
        0.5, 0.3, f"needs results/<profile>/{missing}", ha="center", va="center", fontsize=9, transform=ax.transAxes
    )
    ax.set_title(title)
    ax.set_axis_off()
    return fig


def _panels(n: int, width: float = 3.6, height: float = 3.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * n + 1.4, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])


def _lines(
    df: pd.DataFrame,
    x: str,
    metrics: list[str],
    hue: str | None,
    title: str,
    legend: str | None = None,
    reference: dict[str, float] | None = None,
) -> Figure:
    """plots.plot_curves in the report's style: settings in their natural order, units on the axes."""
    from helpers.plots import plot_curves

    order = _setting_order(df[hue]) if hue == "setting" else (list(pd.unique(df[hue].dropna())) if hue else None)
    return plot_curves(df, x, metrics, hue=hue, title=title, reference=reference, hue_order=order, labels=LABELS,
                       legend_title=legend, reference_label="centralized", panel_size=(3.6, 3.0))  # fmt: skip


def _label_columns(df: pd.DataFrame, mapping: dict[str, str]) -> pd.Series:
    """A legend label per row naming the configuration, e.g. 'scheduler=cosine, lr=0.01'."""
    cols = [c for c in mapping if c in df and df[c].nunique(dropna=True) > 0]
    return df[cols].apply(
        lambda r: ", ".join(f"{mapping[c]}={_fmt_key(v)}" for c, v in r.items() if pd.notna(v)), axis=1
    )


def fig_centralized_curves(df: pd.DataFrame) -> Figure:
    """Test loss and accuracy per epoch of the final centralized runs (band: seeds)."""
    part = select(df, "centralized_final", ("epoch", "test_acc"))
    part["config"] = _label_columns(part, {"scheduler": "scheduler", "lr": "lr", "weight_decay": "wd"})
    return _lines(
        part, "epoch", ["test_loss", "test_acc"], "config", "centralized fine-tuning (final runs)", "configuration"
    )


def fig_schedulers(df: pd.DataFrame) -> Figure:
    """Validation loss and accuracy per epoch for each learning-rate scheduler."""
    part = select(df, "centralized_schedulers", ("epoch", "scheduler", "val_acc"))
    return _lines(part, "epoch", ["val_loss", "val_acc"], "scheduler", "learning-rate schedulers", "scheduler")


def fig_hparam_search(df: pd.DataFrame) -> Figure:
    """Final validation accuracy over the lr x weight-decay grid (mean over momentum values)."""
    from helpers.plots import plot_heatmap

    part = final_rows(select(df, "centralized_grid", ("lr", "weight_decay", "val_acc")))
    fig = plot_heatmap(
        part.sort_values(["lr", "weight_decay"]),
        "lr",
        "weight_decay",
        "val_acc",
        title="hyperparameter search (final validation accuracy)",
    )
    fig.axes[0].set_ylabel("learning rate")
    fig.axes[0].set_xlabel("weight decay")
    return fig


def _centralized_reference(df: pd.DataFrame) -> dict[str, float]:
    try:
        last = final_rows(select(df, "centralized_final"))
    except MissingResults:
        return {}
    metrics = ("val_acc", "val_loss", "test_acc")
    return {m: float(last[m].mean()) for m in metrics if m in last and last[m].notna().any()}


def fig_fedavg_iid(df: pd.DataFrame) -> Figure:
    """FedAvg IID validation loss/accuracy per round, centralized final result dashed."""
    part = select(df, "fedavg_iid", ("round", "val_acc"))
    part["config"] = _label_columns(part, {"local_steps": "J", "participation": "C", "num_clients": "K"})
    return _lines(
        part,
        "round",
        ["val_loss", "val_acc"],
        "config",
        "FedAvg, IID shards (dashed: centralized)",
        "configuration",
        reference=_centralized_reference(df),
    )


def fig_fedavg_heatmap(df: pd.DataFrame) -> Figure:
    """Final test accuracy over (Nc, J), IID as the last row."""
    from helpers.plots import plot_heatmap

    part = final_rows(with_labels(select(df, "fedavg_noniid", ("local_steps", "test_acc"))))
    order = _setting_order(part["setting"])
    part = part.assign(_o=part["setting"].map(order.index)).sort_values(["_o", "local_steps"])
    fig = plot_heatmap(part, "setting", "local_steps", "test_acc", title="FedAvg final test accuracy")
    fig.axes[0].set_ylabel("classes per client (Nc)")
    fig.axes[0].set_xlabel(LABELS["local_steps"])
    return fig


def fig_fedavg_curves(df: pd.DataFrame) -> Figure:
    """Validation accuracy per round, one panel per J, one line per Nc."""
    import seaborn as sns

    part = with_labels(select(df, "fedavg_noniid", ("round", "local_steps", "val_acc"))).dropna(subset=["val_acc"])
    steps = sorted(part["local_steps"].unique())
    fig, axes = _panels(len(steps), width=3.2)
    order = _setting_order(part["setting"])
    for i, (ax, j) in enumerate(zip(axes, steps)):
        sns.lineplot(
            data=part[part["local_steps"] == j],
            x="round",
            y="val_acc",
            hue="setting",
            hue_order=order,
            errorbar="sd",
            marker="o",
            markersize=3,
            palette=PALETTE,
            ax=ax,
            legend=i == len(steps) - 1,
        )
        ax.set_title(f"J = {int(j)}")
        ax.set_xlabel(LABELS["round"])
        ax.set_ylabel(LABELS["val_acc"])
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), title="sharding", frameon=False)
    fig.suptitle("FedAvg under heterogeneity (same step budget per J)")
    return fig


def fig_drift(df: pd.DataFrame) -> Figure:
    """Client drift (mean over rounds of update norm and pairwise cosine) against Nc, one line per J."""
    import seaborn as sns

    part = with_labels(select(df, "fedavg_noniid", ("drift_norm", "local_steps")))
    per_run = part.groupby(["run_id", "setting", "local_steps"], as_index=False)[["drift_norm", "drift_cos"]].mean()
    order = _setting_order(per_run["setting"])
    fig, axes = _panels(2)
    for i, (ax, metric) in enumerate(zip(axes, ["drift_norm", "drift_cos"])):
        sns.pointplot(
            data=per_run,
            x="setting",
            y=metric,
            hue="local_steps",
            order=order,
            errorbar="sd",
            palette=PALETTE,
            ax=ax,
            legend=i == 1,
            markersize=4,
        )
        ax.set_xlabel("sharding (classes per client)")
        ax.set_ylabel(LABELS[metric] + " (mean over rounds)")
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), title=LABELS["local_steps"], frameon=False)
    fig.suptitle("client drift against heterogeneity")
    return fig


def fig_sparse_grid(df: pd.DataFrame) -> Figure:
    """Sparse fine-tuning: final test accuracy over sparsity x calibration rounds, dense as reference."""
    from helpers.editing import DENSE_LABEL, DENSE_STEP0_LABEL, STEP0_LABEL, sparse_rows
    from helpers.plots import plot_heatmap

    part = final_rows(with_labels(select(df, "editing_centralized", ("test_acc",))))
    sparse = part[sparse_rows(part)]
    if sparse.empty or sparse["calibration_rounds"].isna().all():
        raise MissingResults("editing_centralized.csv (no sparse runs)")
    fig = plot_heatmap(
        sparse.sort_values(["sparsity", "calibration_rounds"]), "sparsity", "calibration_rounds", "test_acc",
        title="sparse fine-tuning: final test accuracy",
    )  # fmt: skip
    references = [(label, part.loc[part["method"] == label, "test_acc"]) for label in
                  (DENSE_LABEL, DENSE_STEP0_LABEL, STEP0_LABEL)]  # fmt: skip
    shown = ", ".join(f"{label}: {acc.mean():.3f}" for label, acc in references if not acc.empty)
    if shown:
        fig.axes[0].set_title(f"sparse fine-tuning: final test accuracy\n({shown})", fontsize=9)
    fig.axes[0].set_ylabel(LABELS["sparsity"])
    fig.axes[0].set_xlabel(LABELS["calibration_rounds"])
    return fig


def _bars(part: pd.DataFrame, x: str, hue: str, title: str, xlabel: str, legend: str, order=None) -> Figure:
    import seaborn as sns

    fig, axes = _panels(1, width=5.0, height=3.2)
    sns.barplot(data=part, x=x, y="test_acc", hue=hue, order=order, errorbar="sd", palette=PALETTE, ax=axes[0])
    axes[0].set_xlabel(xlabel)
    axes[0].set_ylabel(LABELS["test_acc"])
    axes[0].tick_params(axis="x", labelrotation=25)  # method and rule names are long
    if axes[0].get_legend() is not None:
        sns.move_legend(axes[0], "upper left", bbox_to_anchor=(1.02, 1), title=legend, frameon=False)
    fig.suptitle(title)
    return fig


def fig_dense_vs_sparse(df: pd.DataFrame) -> Figure:
    """Final test accuracy of dense and sparse federated fine-tuning per sharding."""
    part = final_rows(with_labels(select(df, "editing_federated", ("sharding", "test_acc"))))
    return _bars(
        part,
        "setting",
        "method",
        "dense vs sparse federated fine-tuning",
        "sharding (classes per client)",
        "method",
        order=_setting_order(part["setting"]),
    )


def fig_mask_rules(df: pd.DataFrame) -> Figure:
    """Final test accuracy per mask rule and the controls, one bar per sharding."""
    from helpers.editing import rules_with_controls

    part = rules_with_controls(final_rows(with_labels(select(df, "mask_strategies", ("mask_rule", "test_acc")))))
    hue = "setting" if "setting" in part else None
    return _bars(part, "mask_rule", hue, "mask rules and controls", "mask rule or control", "sharding",
                 order=list(pd.unique(part["mask_rule"])))  # fmt: skip


def fig_communication(df: pd.DataFrame) -> Figure:
    """Validation accuracy against cumulative bytes uploaded, one line per federated configuration."""
    import seaborn as sns

    if "upload_bytes" not in df or df["upload_bytes"].isna().all():
        raise MissingResults("fedavg_*.csv or editing_federated.csv (no upload_bytes)")
    part = with_labels(df.dropna(subset=["upload_bytes", "round"]))
    part = part.sort_values(["source", "run_id", "round"])
    part["upload_mb"] = part.groupby(["source", "run_id"])["upload_bytes"].cumsum() / 1e6
    part["config"] = (
        part["method"]
        + ", "
        + part.get("setting", "")
        + part["local_steps"].map(lambda j: f", J={int(j)}" if pd.notna(j) else "")
    )
    part = part.dropna(subset=["val_acc"])
    fig, axes = _panels(1, width=5.5, height=3.4)
    sns.lineplot(
        data=part,
        x="upload_mb",
        y="val_acc",
        hue="config",
        errorbar="sd",
        marker="o",
        markersize=3,
        palette=PALETTE,
        ax=axes[0],
    )
    axes[0].set_xscale("log")
    axes[0].set_xlabel(LABELS["upload_mb"] + ", log scale")
    axes[0].set_ylabel(LABELS["val_acc"])
    if axes[0].get_legend() is not None:
        sns.move_legend(
            axes[0], "upper left", bbox_to_anchor=(1.02, 1), title="configuration", frameon=False, fontsize=7
        )
    fig.suptitle("communication cost against accuracy")
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
    "dense_vs_sparse": fig_dense_vs_sparse,
    "mask_rules": fig_mask_rules,
    "communication": fig_communication,
}


def make_figure(df: pd.DataFrame, name: str, strict: bool = False) -> Figure:
    """Figure `name` (see FIGURES) or a 'not run yet' placeholder; with strict=False other errors become one too."""
    import seaborn as sns

    check_one_profile(df)
    try:
        with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
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


# ----------------------------------------------------------------------------- interactive explorer


def explore_figure(df: pd.DataFrame, source: str, metric: str, group: str | None) -> Figure:
    """`metric` per epoch/round of one results file, one line (mean +- std over the rest) per `group` value."""
    part = df[df["source"] == source].dropna(axis=1, how="all")
    step = next((s for s in ("round", "epoch") if s in part), None)
    if part.empty or step is None or metric not in part:
        return placeholder_figure(f"{source}: {metric}", f"{source}.csv with column {metric}")
    group = group if group in part else None
    if group:
        part = part.assign(**{group: part[group].astype(str)})
    with_values = part.dropna(subset=[metric])
    return _lines(with_values, step, [metric], group, f"{source}: {metric}", group)


def explorer(df: pd.DataFrame):
    """An ipywidgets panel: pick a results file, a metric and a grouping column; the plot follows."""
    import ipywidgets as widgets
    from IPython.display import display

    sources = sorted(df["source"].unique()) if "source" in df and not df.empty else []
    if not sources:
        return widgets.HTML("<b>not run yet</b>: no results files for this profile")
    metrics = [
        m
        for m in (
            "val_acc",
            "val_loss",
            "test_acc",
            "test_loss",
            "train_loss",
            "drift_norm",
            "drift_cos",
            "upload_bytes",
            "elapsed_s",
        )
        if m in df
    ]
    config = [
        c
        for c in df.columns
        if c not in (*metrics, *STEP_COLUMNS, "source", "run_id", "clients", "current_lr", "client_lr")
    ]
    source = widgets.Dropdown(options=sources, description="results")
    metric = widgets.Dropdown(options=metrics, description="metric")
    group = widgets.Dropdown(options=["(none)", "run_id", *config], value="run_id", description="group by")
    out = widgets.Output()

    def update(*_):
        out.clear_output(wait=True)
        with out:
            display(explore_figure(df, source.value, metric.value, None if group.value == "(none)" else group.value))

    for w in (source, metric, group):
        w.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([source, metric, group]), out])
