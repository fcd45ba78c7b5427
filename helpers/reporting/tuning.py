"""The remedies' tuning in the report: which hyperparameter each method tuned, over which grid, the validation
accuracy of each value and the one chosen (results/<profile>/remedies_tuning.csv, written by notebook 05)."""

from __future__ import annotations

import pandas as pd

from helpers.reporting.labels import algorithm_order, algorithm_title, param_label, with_algorithm
from helpers.reporting.results import last_rows
from helpers.reporting.summaries import fmt_key
from helpers.reporting.tables import latex_escape

CAPTION = (
    "Remedies tuned alike: each method's own hyperparameter over its grid, dense, at the hardest heterogeneity, the "
    "same runs and budget per method; validation accuracy per value, the chosen one in bold."
)


def tuning_latex(df: pd.DataFrame) -> str:
    """The LaTeX table of the tuning (a 'not run yet' table when remedies_tuning.csv is missing)."""
    part = df[df["source"] == "remedies_tuning"] if "source" in df else df.iloc[:0]
    lines = [r"\begin{table}[!htb]", r"\centering", r"\footnotesize"]
    if part.empty or "tuned_param" not in part:
        body = [r"\begin{tabular}{l}", r"\toprule", r"\textbf{not run yet}: remedies\_tuning.csv \\", r"\bottomrule"]
    else:
        final = with_algorithm(last_rows(part[part["experiment"] != "step0"]))
        head = r"method & parameter & validation accuracy per value \\"
        body = [r"\begin{tabular}{lll}", r"\toprule", head, r"\midrule", *_rows(final), r"\bottomrule"]
    tail = [r"\end{tabular}", r"\caption{" + CAPTION + "}", r"\label{tab:remedies_tuning}", r"\end{table}", ""]
    return "\n".join([*lines, *body, *tail])


def _rows(final: pd.DataFrame) -> list[str]:
    rows = []
    for algorithm in algorithm_order(final["algorithm"]):
        mine = final[final["algorithm"] == algorithm]
        name, chosen = mine["tuned_param"].iloc[0], mine["tuned_value"].iloc[0]
        cells = []
        for _, run in mine.sort_values(name).iterrows():
            acc = "diverged" if bool(run.get("diverged", False)) else f"{run['val_acc']:.3f}"
            text = f"{fmt_key(run[name])}: {acc}"
            cells.append(rf"\textbf{{{text}}}" if run[name] == chosen else text)
        title, parameter = latex_escape(algorithm_title(algorithm)), latex_escape(param_label(name))
        rows.append(f"{title} & {parameter} & {'; '.join(cells)} \\\\")
    return rows
