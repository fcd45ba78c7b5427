"""From results/ to the report: one import for notebook 07 and `python -m helpers.report --profile X`.

The work lives in three modules: helpers.reporting.summaries (loading, summaries, labels; the results schema),
reporting.tables (LaTeX tables) and reporting.figures (figures at their printed size). `write_report_inputs`
writes everything report/main.tex includes for one profile; `make report` then builds the PDF with latexmk.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pandas as pd

from helpers.core.params import STEP_COLUMNS
from helpers.core.settings import PROFILES
from helpers.reporting import pdf as latex
from helpers.reporting.figures import (  # noqa: F401  (re-exported: the notebook and tests use helpers.reporting.report)
    FIGURES,
    LABELS,
    explore_figure,
    make_figure,
    placeholder_figure,
    save_figure,
    write_figures,
)
from helpers.reporting.findings import write_findings
from helpers.reporting.setup import write_setup_tex  # noqa: F401  (07 writes the setup's macros and table)
from helpers.reporting.summaries import (  # noqa: F401
    MissingResults,
    check_one_profile,
    figures_dir,
    load_results,
    select,
    setting_order,
    summarize,
    tables_dir,
    with_method_and_setting,
)
from helpers.reporting.tables import (  # noqa: F401
    TABLES,
    deviations_table,
    latex_escape,
    latex_table,
    make_table,
    placeholder_table,
    write_profile_macro,
    write_tables,
)
from helpers.reporting.tuning import tuning_latex


def write_report_inputs(
    profile: str,
    results_root: str | Path | None = None,
    figures_root: str | Path | None = None,
    tables_root: str | Path | None = None,
) -> list[Path]:
    """Every figure, table and finding of the report (and generated/profile.tex) from results/<profile>/; returns
    the paths."""
    df = load_results(profile, results_root)
    paths = write_tables(df, profile, tables_root)
    paths.append(tables_dir(profile, tables_root) / "remedies_tuning.tex")
    paths[-1].write_text(tuning_latex(df))
    paths += write_setup_tex(profile, tables_dir(profile, tables_root), results_root, df)
    paths.append(write_findings(df, profile, tables_root))
    write_figures(df, profile, figures_root)
    return [*paths, figures_dir(profile, figures_root)]


def explorer(df: pd.DataFrame):
    """An ipywidgets panel: pick a results file, a metric and a grouping column; the plot follows."""
    import ipywidgets as widgets

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
    # The plot is an Image widget set to PNG bytes, not an Output widget: papermill's client sometimes waits forever
    # for an Output widget's captured display to finish when no browser is attached (seen in ~1 of 5 batch runs).
    image = widgets.Image(format="png")

    def update(*_):
        fig = explore_figure(df, source.value, metric.value, None if group.value == "(none)" else group.value)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        image.value = buffer.getvalue()

    for w in (source, metric, group):
        w.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([source, metric, group]), image])


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.report --profile smoke [--pdf]`: the report's figures and tables from results/<profile>/,
    then with --pdf the PDF (exit 1 when LaTeX fails, with its errors; 2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m helpers.report", description=main.__doc__)
    parser.add_argument("--profile", choices=PROFILES, required=True, help="whose results/<profile>/ to show")
    parser.add_argument("--results-root", default=None, help="default: $FLME_RESULTS_ROOT, else results/")
    parser.add_argument("--pdf", action="store_true", help="then build report/main-<profile>.pdf with latexmk "
                        "(its output goes to report/main-<profile>.latexmk.log, shown only when it fails)")  # fmt: skip
    args = parser.parse_args(argv)
    df = load_results(args.profile, args.results_root)
    print(inputs_summary(df, args.profile, write_report_inputs(args.profile, args.results_root)), flush=True)
    if args.pdf:
        try:
            pdf = latex.build_pdf(args.profile)
        except latex.LatexError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        pages = latex.page_count(pdf)
        print(f"report: {shown(pdf)}" + (f" ({pages} pages)" if pages else ""))
    return 0


def inputs_summary(df: pd.DataFrame, profile: str, paths: list[Path]) -> str:
    """One line: which results the report's inputs come from and where they went."""
    tables = [p for p in paths if p.suffix == ".tex" and p.name not in ("profile.tex", "settings.tex", "findings.tex")]
    written = f"{len(tables)} tables in {shown(tables[0].parent)}/, {len(FIGURES)} figures in {shown(paths[-1])}/"
    if df.empty:
        return f"profile={profile}: no results found, every figure and table is a placeholder; {written}"
    files, heads = df["source"].nunique(), df["experiment"] == "step0"
    runs = df.loc[~heads, "run_id"].nunique()  # as status and the pipeline count: a run in two files counts once
    n_heads = df.loc[heads, "run_id"].nunique()
    shared = f" and {n_heads} step-0 head{'s' * (n_heads != 1)} they share" if n_heads else ""
    return f"profile={profile}: {files} results files ({runs} run{'s' * (runs != 1)}{shared}) -> {written}"


def shown(path: Path) -> str:
    """`path` relative to the working folder where it lies inside it (shorter to read), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
