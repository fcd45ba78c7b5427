"""helpers.reporting.report: loading, summaries, LaTeX tables from tiny hand-made CSVs, figures, and the LaTeX build."""

from __future__ import annotations

import re
import shutil
import subprocess
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.reporting import report

REPO = Path(__file__).resolve().parent.parent
PROFILE = "smoke"
SHARDINGS = ["iid", "noniid"]


def _runs(experiment: str, step: str, steps: int, grid: list[dict], fed: bool = False) -> pd.DataFrame:
    """Tidy rows (schema of helpers.reporting.report) for every config in `grid`, made up numbers, no training."""
    rows = []
    for i, config in enumerate(grid):
        for t in range(1, steps + 1):
            acc = 0.1 + 0.05 * t + 0.01 * i
            row = {
                "run_id": f"{experiment[:3]}{i:03d}",
                "experiment": experiment,
                "profile": PROFILE,
                **config,
                step: t,
                "train_loss": 4.0 - 0.3 * t,
                "val_loss": 4.1 - 0.3 * t,
                "val_acc": acc,
                "test_loss": 4.2 - 0.3 * t if t == steps else np.nan,
                "test_acc": acc if t == steps else np.nan,
                "elapsed_s": 0.5 * t,
            }
            if fed:
                row.update(upload_bytes=4000 * (1 + i), drift_norm=1.0 + 0.1 * i, drift_cos=0.5 - 0.05 * i)
            rows.append(row)
    return pd.DataFrame(rows)


TUNED = {"fedavg": "server_lr", "fedprox": "prox_mu", "scaffold": "server_lr", "fedadam": "server_lr"}


def write_fixture(root: Path) -> Path:
    """A results root with one small CSV per results file the report uses."""
    folder = root / PROFILE
    folder.mkdir(parents=True)
    seeds = [0, 1]
    base = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-5, "scheduler": "cosine"}
    files = {
        "centralized_probe": _runs("centralized", "epoch", 2, [{**base, "train_mode": "head", "seed": 0}]),
        "centralized_grid": _runs(
            "centralized",
            "epoch",
            2,
            [{**base, "lr": lr, "weight_decay": wd, "seed": 0} for lr, wd in product([0.01, 0.03], [0.0, 5e-5])],
        ),
        "centralized_schedulers": _runs(
            "centralized", "epoch", 3, [{**base, "scheduler": s, "seed": 0} for s in ["cosine", "step", "constant"]]
        ),
        "centralized_final": _runs("centralized", "epoch", 3, [{**base, "seed": s} for s in seeds]),
        "fedavg_iid": _runs(
            "fedavg", "round", 3, [{"sharding": "iid", "local_steps": 4, "seed": s} for s in seeds], fed=True
        ),
        "fedavg_noniid": _runs(
            "fedavg",
            "round",
            3,
            [
                {"sharding": sh, "classes_per_client": nc, "local_steps": j, "seed": 0}
                for sh, nc in [("noniid", 1), ("noniid", 5), ("iid", 5)]
                for j in [4, 8]
            ],
            fed=True,
        ),
        "editing_centralized": pd.concat([
            _runs("sparse_centralized", "epoch", 2, [
                {"sparsity": s, "calibration_rounds": r, "mask_rule": "least_sensitive", "seed": 0}
                for s, r in [*product([0.9, 0.99], [1, 4]), (0.0, 1)]  # sparsity 0: the dense control
            ]),
            _runs("centralized", "epoch", 2, [{"train_mode": "full", "seed": 0}]),
            _runs("step0", "epoch", 1, [{"seed": 0}]),  # the step-0 control
        ]),
        "editing_federated": pd.concat([
            _runs("sparse_fedavg", "round", 3, [
                {"sharding": sh, "classes_per_client": 1, "sparsity": sp, "calibration_rounds": 2, "seed": 0}
                for sh, sp in product(["iid", "noniid"], [0.9, 0.0, np.nan])
            ], fed=True),
            _runs("step0", "round", 1, [{"sharding": sh, "classes_per_client": 1, "seed": 0} for sh in SHARDINGS]),
        ]),
        "mask_strategies": pd.concat([
            _runs("sparse_fedavg", "round", 2, [
                {"mask_rule": rule, "sparsity": sp, "calibration_rounds": 1, "sharding": sh, "classes_per_client": 2,
                 "seed": 0}
                for rule, sp in [("least_sensitive", 0.9), ("most_sensitive", 0.9), ("random", 0.9),
                                 ("least_sensitive", 0.0)]
                for sh in ["iid", "noniid"]
            ], fed=True),
            _runs("step0", "round", 1, [{"sharding": sh, "classes_per_client": 2, "seed": 0} for sh in SHARDINGS]),
        ]),
        "remedies": _runs("sparse_fedavg", "round", 3, [
            {"algorithm": a, "sparsity": sp, "calibration_rounds": 2, "sharding": "noniid", "classes_per_client": nc,
             "local_steps": 8, "seed": 0}
            for a in ["fedavg", "fedprox", "scaffold", "fedadam"] for sp in [0.0, 0.9] for nc in [1, 5]
        ], fed=True).assign(tuned_param=lambda d: d["algorithm"].map(TUNED), tuned_value=0.1),
        "remedies_tuning": _runs("sparse_fedavg", "round", 2, [
            {"algorithm": a, "sparsity": 0.0, "sharding": "noniid", "classes_per_client": 1, "local_steps": 8,
             "seed": 0, TUNED[a]: v} for a in ["fedavg", "fedprox", "scaffold", "fedadam"] for v in [0.01, 0.1, 1.0]
        ], fed=True).assign(tuned_param=lambda d: d["algorithm"].map(TUNED), tuned_value=0.1, diverged=False),
        "extension": _extension_runs(),
    }  # fmt: skip
    for name, frame in files.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
    return root


def _extension_runs() -> pd.DataFrame:
    """FedAvg's mean and TIES (at the density its tuning chose) dense and sparse at Nc 1 and 5, interference per
    round."""
    cell = {"sharding": "noniid", "local_steps": 8, "calibration_rounds": 2, "seed": 0}
    grid = [{**cell, "classes_per_client": nc, "sparsity": sp, **merge} for nc in (1, 5)
            for merge in [{}, {"merge": "ties", "merge_density": 0.2}] for sp in (0.0, 0.9)]  # fmt: skip
    frame = _runs("sparse_fedavg", "round", 3, grid, fed=True)
    index = frame["run_id"].str[-3:].astype(int)
    return frame.assign(interference=0.6 - 0.05 * frame["round"] - 0.03 * index)


@pytest.fixture()
def results_root(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "results")


def test_load_results_adds_source_and_refuses_mixed_profiles(results_root: Path):
    df = report.load_results(PROFILE, results_root)
    assert {"source", "run_id", "experiment"} <= set(df.columns)
    assert "fedavg_noniid" in set(df["source"])
    assert report.check_one_profile(df) == PROFILE
    with pytest.raises(ValueError, match="mix profiles"):
        report.check_one_profile(pd.concat([df, df.assign(profile="full")]))
    assert report.load_results(PROFILE, results_root / "nowhere").empty


def test_summarize_gives_mean_std_n_over_seeds(results_root: Path):
    df = report.load_results(PROFILE, results_root)
    stats = report.summarize(df[df["source"] == "centralized_final"], ["scheduler"], ["test_acc"])
    assert stats.loc["cosine", ("test_acc", "n")] == 2
    assert stats.loc["cosine", ("test_acc", "mean")] == pytest.approx((0.25 + 0.26) / 2)


def test_latex_tables_follow_the_csvs(results_root: Path, tmp_path: Path):
    df = report.load_results(PROFILE, results_root)
    paths = report.write_tables(df, PROFILE, tmp_path / "gen")
    texts = {p.stem: p.read_text() for p in paths}
    assert r"\toprule" in texts["fedavg_grid"] and r"\mathbf" in texts["fedavg_grid"]
    assert r"\pm" in texts["centralized_final"]
    assert all("not run yet" not in t for t in texts.values())
    assert r"\newcommand{\profile}{smoke}" in (tmp_path / "gen" / "profile.tex").read_text()
    for name in ("centralized_editing", "federated_editing", "mask_rules"):  # controls next to the sparse rows
        assert "dense, step-0 head" in texts[name] and "step-0 model" in texts[name], name
        assert ("sparse s=" in texts[name]) == (name == "federated_editing"), name  # centralized: Figure sparse_grid
    assert "s=0.9 R=2" in texts["federated_editing"]  # sparse configurations are not averaged together
    assert "step-0" not in texts["sparse_editing"] and "0.99" in texts["sparse_editing"]
    rows = [line for line in texts["extension"].splitlines() if line.startswith("$N_c")]  # per Nc: 4 variants
    assert len(rows) == 8 and "mean interference" in texts["extension"]
    assert rows[0].startswith("$N_c = 1$ & dense, FedAvg mean")
    assert rows[-1].startswith("$N_c = 5$ & sparse, TIES d=0.2")

    path = results_root / PROFILE / "mask_strategies.csv"
    frame = pd.read_csv(path)
    frame.loc[frame["test_acc"].notna(), "test_acc"] = 0.123456
    frame.to_csv(path, index=False)
    changed = report.write_tables(report.load_results(PROFILE, results_root), PROFILE, tmp_path / "gen2")
    new = {p.stem: p.read_text() for p in changed}
    assert new["mask_rules"] != texts["mask_rules"] and "0.123" in new["mask_rules"]
    assert new["fedavg_grid"] == texts["fedavg_grid"]


def test_missing_results_give_placeholders(tmp_path: Path):
    empty = report.load_results(PROFILE, tmp_path / "none")
    tables = report.write_tables(empty, PROFILE, tmp_path / "gen")
    assert all("not run yet" in p.read_text() for p in tables if p.stem not in ("profile", "deviations"))
    for name in report.FIGURES:
        fig = report.make_figure(empty, name, strict=True)
        assert any("not run yet" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_every_figure_builds_from_the_fixture(results_root: Path, tmp_path: Path):
    df = report.load_results(PROFILE, results_root)
    figures = report.write_figures(df, PROFILE, tmp_path / "fig", strict=True)
    for name, fig in figures.items():
        assert not any("not run yet" in t.get_text() for ax in fig.axes for t in ax.texts), name
        assert (tmp_path / "fig" / PROFILE / f"{name}.pdf").stat().st_size > 0
        assert (tmp_path / "fig" / PROFILE / f"{name}.png").stat().st_size > 0


def _latexmk(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk not installed: the LaTeX build is not checked")
def test_fresh_checkout_builds_with_placeholders(tmp_path: Path):
    """No notebook has run: every figure and table is a placeholder box, and the report must still compile."""
    copy = tmp_path / "report"
    shutil.copytree(REPO / "report", copy, ignore=shutil.ignore_patterns("generated", "*.pdf", "*.aux"))
    done = _latexmk(copy)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "not generated" in subprocess.run(["pdftotext", "main.pdf", "-"], cwd=copy, capture_output=True,
                                             text=True).stdout  # fmt: skip


def test_integer_parameters_stay_integers_in_tables_csvs_and_axes(results_root: Path, tmp_path: Path):
    """All files load into one frame where most rows lack J or R (NaN): they must still read 4, not 4.0."""
    df = report.load_results(PROFILE, results_root)
    for column in ("local_steps", "calibration_rounds", "classes_per_client", "round", "epoch", "seed"):
        assert str(df[column].dtype) == "Int64", column
    text = df[["local_steps", "calibration_rounds", "classes_per_client", "round"]].to_csv(index=False)
    assert ".0" not in text and "4" in text
    for name, axis_values in {"fedavg_heatmap": {"4", "8"}, "sparse_grid": {"1", "4"}}.items():
        fig = report.make_figure(df, name, strict=True)
        ticks = {t.get_text() for ax in fig.axes[:1] for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]}
        assert axis_values <= ticks and not any(t.endswith(".0") for t in ticks), (name, ticks)


def test_explorer_redraws_its_image_when_a_choice_changes(results_root: Path):
    df = report.load_results(PROFILE, results_root)
    panel = report.explorer(df)
    metric, image = panel.children[0].children[1], panel.children[1]
    first = image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG: no Output widget for a batch client to wait on
    metric.value = next(m for m in metric.options if m != metric.value)
    assert image.value[:8] == first[:8] and image.value != first


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk not installed: the LaTeX build is not checked")
def test_a_failed_pdf_build_shows_the_latex_error_not_the_chatter(tmp_path: Path):
    from helpers.reporting.pdf import LatexError, build_pdf

    (tmp_path / "main.tex").write_text(
        "\\documentclass{article}\n\\begin{document}\n\\undefinedmacro\n\\end{document}\n"
    )
    with pytest.raises(LatexError, match=r"(?s)! Undefined control sequence.*l\.3 \\undefinedmacro") as failed:
        build_pdf("demo", tmp_path)
    assert str(tmp_path / "main-demo.log") in str(failed.value) and len(str(failed.value).splitlines()) < 12
    assert "Latexmk" in (tmp_path / "main-demo.latexmk.log").read_text()  # the chatter is kept, not shown


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk not installed: the LaTeX build is not checked")
def test_make_report_says_what_it_wrote_and_ends_with_the_pdf(results_root: Path, tmp_path: Path, capfd, monkeypatch):
    from helpers.reporting import pdf

    shutil.copytree(REPO / "report", tmp_path / "report", ignore=shutil.ignore_patterns("generated", "main-*"))
    monkeypatch.setattr(pdf, "REPORT_DIR", tmp_path / "report")
    monkeypatch.setenv("FLME_FIGURES_ROOT", str(tmp_path / "figures"))
    monkeypatch.setenv("FLME_TABLES_ROOT", str(tmp_path / "report" / "generated"))
    assert report.main(["--profile", PROFILE, "--results-root", str(results_root), "--pdf"]) == 0
    out = capfd.readouterr()
    first, last = out.out.strip().splitlines()
    assert first.startswith(f"profile={PROFILE}: 12 results files") and "13 figures in" in first, first
    assert re.fullmatch(rf"report: .*main-{PROFILE}\.pdf \(\d pages\)", last), last
    assert "Latexmk" not in out.out + out.err and "Output written" not in out.out + out.err
    assert "helpers.report --profile $(PROFILE) --pdf" in (REPO / "Makefile").read_text()  # what `make report` runs


def test_the_summary_counts_runs_as_status_does_and_step_0_heads_apart(tmp_path: Path):
    """A run in two files counts once and a step-0 head is not a planned run (status and the pipeline say the same)."""
    df = pd.DataFrame({"source": ["a", "b", "b", "c"], "run_id": ["r1", "r1", "r2", "step0-x"],
                       "experiment": ["fedavg", "fedavg", "sparse_fedavg", "step0"]})  # fmt: skip
    (tmp_path / "t").mkdir()
    line = report.inputs_summary(df, "smoke", [tmp_path / "t" / "x.tex", tmp_path / "f"])
    assert "3 results files (2 runs and 1 step-0 head they share)" in line, line
    assert "(1 run)" in report.inputs_summary(df[df["source"] == "a"], "smoke", [tmp_path / "t" / "x.tex", tmp_path])
