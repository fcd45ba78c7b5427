"""helpers.reporting.findings: one finding per question of the course spec with its numbers and seeds, a verdict that
respects the seeds' spread, a 'not run' sentence for absent results, LaTeX-safe macros."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from full_results import write_full_results

from helpers.reporting.findings import FINDINGS, findings, findings_latex, write_findings
from helpers.reporting.summaries import load_results

# the spec's questions (../shared/seeds/course-spec-model-editing.md) and the extension (issue 36): their findings
SPEC_QUESTIONS = {
    "Epochs": "how many epochs does the centralized baseline need",
    "Scheduler": "which learning-rate scheduler is best",
    "IidGap": "FedAvg on IID shards against the centralized baseline",
    "NonIid": "IID against non-IID per Nc and J, and why",
    "LocalSteps": "the effect of J",
    "EditingCentral": "sparsity and calibration rounds, centralized",
    "EditingFederated": "sparsity and calibration rounds, federated",
    "MaskRules": "the four alternative mask rules",
    "Remedies": "the remedies against client drift",
    "Ties": "TIES-merging against FedAvg's mean",
    "Interference": "interference, dense against sparse",
    "Scaling": "post-hoc task-vector scaling",
}
NUMBER = re.compile(r"\d\.\d{3}")


@pytest.fixture(scope="module")
def full_df(tmp_path_factory) -> pd.DataFrame:
    return load_results("full", write_full_results(tmp_path_factory.mktemp("full") / "results"))


def test_every_spec_question_has_a_finding_with_numbers_on_the_full_study(full_df: pd.DataFrame):
    found = {f.name: f for f in findings(full_df, "full")}
    assert set(found) == set(SPEC_QUESTIONS) == set(FINDINGS)
    for name, f in found.items():
        assert "not run" not in f.text, (name, f.text)
        assert NUMBER.search(f.text), (name, f.text)
        assert "seed" in f.text and f.short, (name, f.text)
        assert "Smoke" not in f.text  # only smoke builds say their numbers are smoke


def _scheduler_rows(values: dict[str, list[float]]) -> pd.DataFrame:
    """results rows of centralized_schedulers: one run per (scheduler, seed), its final validation accuracy."""
    rows = [{"source": "centralized_schedulers", "run_id": f"{name}-{seed}", "experiment": "centralized",
             "profile": "full", "epoch": 3, "scheduler": name, "seed": seed, "val_acc": v, "test_acc": v}
            for name, vs in values.items() for seed, v in enumerate(vs)]  # fmt: skip
    return pd.DataFrame(rows)


def _scheduler(values: dict[str, list[float]], profile: str = "full") -> str:
    return {f.name: f for f in findings(_scheduler_rows(values), profile)}["Scheduler"].text


def _shown(values: list[float]) -> str:
    """How a sentence must show these seeds' numbers (the test's own arithmetic)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_a_gap_within_the_seeds_spread_is_no_difference():
    cosine, step = [0.80, 0.83, 0.86], [0.82, 0.85, 0.88]  # means 0.83 and 0.85, stds 0.03: gap 0.02 < 0.06
    assert abs(statistics.mean(step) - statistics.mean(cosine)) < statistics.stdev(step) + statistics.stdev(cosine)
    text = _scheduler({"cosine": cosine, "step": step})
    assert "no difference is established" in text and "is best" not in text, text
    assert _shown(cosine) in text and _shown(step) in text, text
    assert "one seed" not in text and "1 seed" not in text and text.endswith("± is the std over 3 seeds."), text


def test_a_gap_beyond_the_seeds_spread_is_a_difference():
    cosine, step = [0.80, 0.81, 0.82], [0.90, 0.91, 0.92]  # gap 0.10 > 0.02
    assert abs(statistics.mean(step) - statistics.mean(cosine)) > statistics.stdev(step) + statistics.stdev(cosine)
    text = _scheduler({"cosine": cosine, "step": step})
    assert "The step schedule is best" in text and "no difference" not in text, text
    assert _shown(cosine) in text and _shown(step) in text


def test_one_seed_says_so_and_a_small_gap_is_no_difference():
    small = _scheduler({"cosine": [0.800], "step": [0.805]})
    assert "no difference is established" in small and "rests on 1 seed" in small
    large = _scheduler({"cosine": [0.80], "step": [0.90]})
    assert "The step schedule is best" in large and "rests on 1 seed" in large, large


def test_an_absent_results_file_is_said_not_run():
    found = {f.name: f for f in findings(_scheduler_rows({"cosine": [0.8]}), "full")}
    assert "not run" not in found["Scheduler"].text
    for name in set(FINDINGS) - {"Scheduler"}:
        assert "not run" in found[name].text and "results/full/" in found[name].text, found[name].text
        assert "not run" in found[name].short


def test_smoke_findings_say_their_numbers_are_smoke():
    text = _scheduler({"cosine": [0.8], "step": [0.9]}, profile="smoke")
    assert text.startswith("Smoke numbers: "), text
    note = re.search(r"\\newcommand\{\\findingNote\}\{(.*)\}", findings_latex([], "smoke"))
    assert note and "synthetic data" in note[1] and "mean nothing about DINO" in note[1]
    assert r"\newcommand{\findingNote}{}" in findings_latex([], "full")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed: LaTeX not checked")
def test_the_macros_file_compiles_and_prints_the_sentences(full_df: pd.DataFrame, tmp_path: Path):
    """Every macro compiles in a plain article (LaTeX-safe text) and prints its numbers; an unknown name says so."""
    path = write_findings(full_df, "full", tmp_path / "generated")
    tex = path.read_text()
    assert tex == findings_latex(findings(full_df, "full"), "full")
    names = re.findall(r"\\newcommand\{\\finding(\w+)\}", tex)
    assert {n for n in names if not n.endswith("Short")} == {*FINDINGS, "Note"}
    body = "\n\n".join(rf"\finding{{{n}}}" for n in names)
    (tmp_path / "main.tex").write_text(
        "\n".join([r"\documentclass{article}", r"\begin{document}", rf"\input{{{path}}}", body, r"\end{document}"])
    )
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "main.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    printed = " ".join(
        subprocess.run(["pdftotext", "main.pdf", "-"], cwd=tmp_path, capture_output=True, text=True).stdout.split()
    )
    assert "±" in printed and "least-sensitive" in printed and "not generated" not in printed
    assert "\\" not in printed and "$" not in printed, printed[:500]


def test_the_sparse_cell_is_chosen_on_validation_and_reported_on_test():
    """The best of the sparsity x R grid is picked on val_acc, never on the test accuracy it is then reported with."""
    cells = {(0.9, 1): (0.70, 0.60), (0.9, 2): (0.60, 0.80), (0.0, 1): (0.65, 0.65)}  # (val, test): test favours R=2
    rows = [{"source": "editing_centralized", "run_id": f"r{i}", "experiment": "sparse_centralized", "profile": "full",
             "epoch": 2, "sparsity": s, "calibration_rounds": r, "seed": 0, "val_acc": v, "test_acc": t}
            for i, ((s, r), (v, t)) in enumerate(cells.items())]  # fmt: skip
    found = {f.name: f for f in findings(pd.DataFrame(rows), "full")}["EditingCentral"]
    assert "the cell best on validation, sparse s=0.9 R=1 0.600 against" in found.text, found.text
    assert "s=0.9 R=1" in found.short and "R=2" not in found.short


def test_the_scheduler_finding_names_the_searched_lr_and_weight_decay():
    grid = [{"source": "centralized_grid", "run_id": f"g{i}", "experiment": "centralized", "profile": "full",
             "epoch": 3, "lr": lr, "weight_decay": wd, "seed": 0, "val_acc": v, "test_acc": v}
            for i, (lr, wd, v) in enumerate([(0.01, 0.0, 0.70), (0.03, 5e-5, 0.75), (0.003, 0.0, 0.72)])]  # fmt: skip
    rows = pd.concat([_scheduler_rows({"cosine": [0.8], "step": [0.7]}), pd.DataFrame(grid)])
    text = {f.name: f for f in findings(rows, "full")}["Scheduler"].text
    assert text.startswith("The search chose lr 0.03 and weight decay 5e-05 on validation."), text
