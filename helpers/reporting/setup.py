"""The study's settings in the report: `results/<profile>/setup.csv` (written by helpers.ops.setup from the configs
and the notebooks' plans) as LaTeX macros (`\\cfgNumClients`, ...) that main.tex quotes instead of literals, and the
setup table (what was fixed a priori, what was tuned on which split over which grid). Torch-free, no ops import."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from helpers.core.params import PARAMS
from helpers.core.settings import default_results_root
from helpers.reporting.labels import value_label
from helpers.reporting.summaries import SETUP_NAME
from helpers.reporting.tables import latex_escape

MACRO_PREFIX = "cfg"
STAGE_TITLES = {
    "centralized": "Centralized (01)",
    "fedavg": "FedAvg (02, 03)",
    "editing": "Editing, centralized (04)",
    "federated editing": "Editing, federated (05, 06)",
    "remedies": "Remedies, extension (05)",
}


def read_setup(profile: str, results_root: str | Path | None = None) -> pd.DataFrame | None:
    """results/<profile>/setup.csv, or None where it was not written (notebook 07 and `make report` write it)."""
    path = Path(results_root if results_root is not None else default_results_root()) / profile / f"{SETUP_NAME}.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else None


def tex_value(value: str) -> str:
    """A setting's value as LaTeX: 5e-05 as $5\\times 10^{-5}$, schedules by their readable names, text escaped."""

    def number(match: re.Match) -> str:
        mantissa, exponent = match.group(1), int(match.group(2))
        lead = "" if mantissa == "1" else rf"{mantissa}\times "
        return rf"\ensuremath{{{lead}10^{{{exponent}}}}}"

    text = ", ".join(latex_escape(value_label(part)) for part in str(value).split(", "))
    return re.sub(r"\b(\d+(?:\.\d+)?)e([+-]?\d+)\b", number, text)


def setup_macros(setup: pd.DataFrame | None) -> str:
    """One macro per setting, \\cfg@<key>, that main.tex prints as \\cfg{<key>} (a key setup.csv lacks prints
    "??" in bold: main.tex defines \\cfg)."""
    lines = ["% generated from results/<profile>/setup.csv (helpers.ops.setup): the settings main.tex quotes"]
    for row in [] if setup is None else setup.itertuples(index=False):
        if not re.fullmatch(r"[A-Za-z]+", row.key):
            raise ValueError(f"setup.csv key={row.key!r} is invalid: a macro name holds letters only")
        lines.append(rf"\expandafter\def\csname {MACRO_PREFIX}@{row.key}\endcsname{{{tex_value(row.value)}}}")
    return "\n".join(lines) + "\n"


def setup_table(setup: pd.DataFrame | None) -> str:
    """The setup table: per stage, what was set a priori and what was tuned on validation (with its grid)."""
    caption = (r"Settings of the study, from the configs and the notebooks' plans "
               r"(\texttt{results/\profile/setup.csv}). Tuned: chosen on the validation split over the grid shown; "
               r"every other value was fixed a priori.")  # fmt: skip
    head = [r"\begin{table}[!htb]", r"\centering", r"\footnotesize",
            r"\begin{tabular}{@{}p{0.14\linewidth}p{0.5\linewidth}p{0.3\linewidth}@{}}", r"\toprule",
            r"stage & fixed a priori & tuned on validation (grid) \\", r"\midrule"]  # fmt: skip
    tail = [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\label{tab:setup}", r"\end{table}", ""]
    if setup is None:
        body = [r"\multicolumn{3}{c}{not generated: run notebook 07 or \texttt{make report}} \\"]
        return "\n".join(head + body + tail)
    body = []
    shown = setup[setup["how"] != "prose"]
    for stage, part in shown.groupby("stage", sort=False):
        cells = []
        for tuned in (False, True):
            rows = part[(part["how"] == "tuned") == tuned]
            cells.append(table_cell(rows))
        body.append(f"{STAGE_TITLES.get(stage, latex_escape(stage))} & {cells[0]} & {cells[1] or '--'} \\\\")
    return "\n".join(head + body + tail)


def table_cell(rows: pd.DataFrame) -> str:
    """Settings as one cell: 'K = 100; C = 0.1; FedAdam: beta1 = 0.9, tau = 0.1' (one owner's settings together)."""
    groups: dict[str, list[str]] = {}
    for row in rows.itertuples():
        owner, _, name = row.label.rpartition(": ")
        groups.setdefault(owner, []).append(f"{latex_escape(name)} = {tex_value(row.value)}")
    plain = groups.pop("", [])
    owners: dict[str, list[str]] = {}  # owners with the same settings share one entry: 'FedAdam, FedYogi: ...'
    for owner, settings in groups.items():
        owners.setdefault(", ".join(settings), []).append(latex_escape(owner))
    return "; ".join(plain + [f"{', '.join(names)}: {settings}" for settings, names in owners.items()])


def seed_counts(df: pd.DataFrame) -> dict[str, list[int]]:
    """{results file: the distinct numbers of seeds its configurations average} (a configuration: every config
    column but the seed)."""
    counts = {}
    if df.empty or "seed" not in df:
        return counts
    for source, part in df.groupby("source"):
        runs = part.drop_duplicates("run_id")
        keys = [c for c in runs.columns if (c in PARAMS or c == "experiment") and c != "seed" and runs[c].notna().any()]
        sizes = runs.groupby(keys, dropna=False)["seed"].nunique() if keys else pd.Series([runs["seed"].nunique()])
        counts[str(source)] = sorted({int(n) for n in sizes if n > 0})
    return counts


def seeds_text(counts: list[int]) -> str:
    """'1 seed', '3 seeds', '1--3 seeds'."""
    if not counts:
        return "no runs"
    low, high = counts[0], counts[-1]
    return f"{low} seed" if high == 1 else f"{low} seeds" if low == high else f"{low}--{high} seeds"


def seeds_macros(df: pd.DataFrame) -> str:
    """\\seeds{<results file>} for main.tex's captions: how many seeds each configuration of that file averages."""
    lines = ["% seeds per configuration of each results file (main.tex: \\seeds{<file>})"]
    for source, counts in seed_counts(df).items():
        lines.append(rf"\expandafter\def\csname seeds@{source}\endcsname{{{seeds_text(counts)}}}")
    return "\n".join(lines) + "\n"


def write_setup_tex(
    profile: str, folder: Path, results_root: str | Path | None = None, df: pd.DataFrame | None = None
) -> list[Path]:
    """report/generated/<profile>/settings.tex (settings' macros, and seeds per results file from `df`) and
    the setup table (setup.tex) from results/<profile>/setup.csv."""
    setup = read_setup(profile, results_root)
    macros, table = folder / "settings.tex", folder / "setup.tex"
    macros.write_text(setup_macros(setup) + seeds_macros(df if df is not None else pd.DataFrame()))
    table.write_text(setup_table(setup))
    return [macros, table]
