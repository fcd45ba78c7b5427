"""What `make smoke` (helpers.ops.pipeline) tells a person: per notebook its time and what its runs did, a closing
summary ending with the next command, and no stray kernel ERROR line."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.core.settings import PROFILES, REPO
from helpers.ops import pipeline
from helpers.ops.pipeline import RunCount, closing_summary, duration, run_pipeline

NOTEBOOK_03 = """[start] fedavg 9848ded7b3e8 (K=100 C=0.1 J=4 noniid Nc=1, lr=0.1, seed 0): 9 rounds
[skip] fedavg 12227ed97c94 (K=100 C=0.1 J=4 iid, lr=0.1, seed 0): done
[resume] fedavg 2df7f8cc6b97 (K=100 C=0.1 J=4 noniid Nc=10, lr=0.1, seed 0): from round 3 of 9
[skip] fedavg 9848ded7b3e8 (K=100 C=0.1 J=4 noniid Nc=1, lr=0.1, seed 0): done
[held] sparse_fedavg 43deb5b883ce (K=100 C=0.1 J=8 noniid Nc=1, sparsity 0.9 least_sensitive R=1): trained by x
profile=smoke: a line that is no run
"""


def test_runs_are_counted_by_id_from_what_they_print():
    counts = RunCount.from_text(NOTEBOOK_03)
    assert counts.describe() == "4 runs: 1 new, 1 resumed, 1 skipped (done before), 1 held by another session"
    assert RunCount.from_text("").describe() == "no runs"
    rerun = RunCount.from_text("[skip] fedavg 9848ded7b3e8 (x): done\n")
    assert rerun.describe() == "1 run: 1 skipped (done before)"
    counts.add(rerun)  # skipped by a later notebook, trained by this pipeline: still new
    assert counts.describe() == "4 runs: 1 new, 1 resumed, 1 skipped (done before), 1 held by another session"
    head = "[start] fedavg 2ff9946f4a4c (K=100 C=0.1 J=4 noniid Nc=1, head only, lr=0.1, seed 0): 9 rounds\n"
    with_head = RunCount.from_text(head + "[start] sparse_fedavg 1b63f64e66d7 (K=100, sparsity 0.9): 4 rounds\n")
    assert with_head.describe() == "1 run: 1 new (and 1 step-0 head run: 1 new)"  # the plans count the sparse run
    later = RunCount.from_text(head.replace("[start]", "[skip]").replace("9 rounds", "done"))
    assert later.describe() == "no runs (and 1 step-0 head run: 1 skipped (done before))"
    with_head.add(later)  # trained earlier in this pipeline: still new
    assert with_head.describe() == "1 run: 1 new (and 1 step-0 head run: 1 new)"


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4 s"), (89, "89 s"), (192, "3 min 12 s"), (7500, "2 h 05 min")])
def test_durations_read_as_a_person_says_them(seconds: float, text: str):
    assert duration(seconds) == text


def test_the_closing_summary_says_where_and_what_next(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FLME_RESULTS_ROOT", str(tmp_path / "results"))
    (tmp_path / "results" / "full").mkdir(parents=True)
    (tmp_path / "results" / "full" / "fedavg_iid.csv").write_text("run_id\n")
    executed = tmp_path / "executed" / "02_fedavg_iid.ipynb"
    executed.parent.mkdir()
    executed.write_text("{}")
    text = closing_summary("full", [executed], RunCount.from_text(NOTEBOOK_03), 192, {}, None)
    lines = text.splitlines()
    assert lines[0] == "[pipeline] done in 3 min 12 s: 4 runs: 1 new, 1 resumed, 1 skipped (done before), 1 held by " \
        "another session"  # fmt: skip
    assert any(re.fullmatch(r"  results \(tidy CSV\) +.*results/full/ \(1 file\)", line) for line in lines), text
    assert lines[-1].startswith("next: make report PROFILE=full")
    assert closing_summary("smoke", [], RunCount(), 1, {}, True).splitlines()[-1].startswith("next: make report ")


def test_a_pipeline_prints_each_notebook_then_the_summary_and_no_kernel_warning(tmp_path: Path, capfd, monkeypatch):
    # 07 on empty results: seconds. The kernel logs its warnings and errors straight to this process's stderr.
    for name in ("RESULTS", "FIGURES", "TABLES"):
        monkeypatch.setenv(f"FLME_{name}_ROOT", str(tmp_path / name.lower()))
    run_pipeline("smoke", ["07"], tmp_path / "out")
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"[pipeline] profile=smoke: 1 notebook -> {tmp_path / 'out'}/"
    assert re.fullmatch(r"  07_report_figures +\d+ s  no runs", lines[1]), lines[1]
    assert lines[2].startswith("[pipeline] done in ") and lines[-1].startswith("next: make report ")
    assert "ERROR" not in err and "KeyboardInterrupt" not in err and "WARNING" not in err, err
    assert "without encryption" not in err  # kernels talk over local socket files (POSIX), not TCP
    assert os.name != "posix" or not list(Path.cwd().glob("kernel-*ipc*"))  # socket files live in Jupyter's runtime


def _signals_at_shutdown(manager_class) -> list[int]:
    """Start a real kernel with `manager_class`, shut it down, and return the signals sent to it meanwhile."""
    sent = []

    class Spy(manager_class):
        async def _async_signal_kernel(self, signum: int) -> None:
            sent.append(signum)
            await super()._async_signal_kernel(signum)

    async def start_and_stop():
        manager = Spy(kernel_name="python3")
        await manager.start_kernel()
        await manager.shutdown_kernel()

    asyncio.run(start_and_stop())
    return sent


def test_pipeline_kernels_are_not_interrupted_at_shutdown():
    """jupyter_client sends SIGINT before it asks a kernel to shut down; ipykernel then may log "ERROR |
    KeyboardInterrupt caught in kernel" (a stray line in make smoke's output). The pipeline's manager sends none."""
    from jupyter_client.manager import AsyncKernelManager

    assert signal.SIGINT in _signals_at_shutdown(AsyncKernelManager)  # what the check guards against
    assert signal.SIGINT not in _signals_at_shutdown(pipeline._quiet_shutdown_kernel_manager())


def test_a_rerun_says_its_runs_were_skipped(tmp_path: Path, capfd, monkeypatch):
    """The second pipeline over the same run root trains nothing and says so, per notebook and in the summary."""
    for name in ("RESULTS", "FIGURES", "TABLES"):
        monkeypatch.setenv(f"FLME_{name}_ROOT", str(tmp_path / name.lower()))
    tiny = {"ROUNDS": 1, "NUM_CLIENTS": 10, "RUN_ROOT": str(tmp_path / "runs")}
    said = []
    for _ in range(2):
        run_pipeline("smoke", ["02"], tmp_path / "out", tiny)
        said.append(capfd.readouterr().out.splitlines())
    first, again = said
    assert re.fullmatch(r"  02_fedavg_iid +\d+ s  1 run: 1 new", first[1]), first
    assert re.fullmatch(r"  02_fedavg_iid +\d+ s  1 run: 1 skipped \(done before\)", again[1]), again
    assert again[2].startswith("[pipeline] done in ") and again[2].endswith(": 1 run: 1 skipped (done before)")
    assert any(line.startswith("  run folders ") for line in again) and again[-1].startswith("next: make report")


def test_what_a_pipeline_writes_is_ignored_by_git_for_every_profile():
    """Executed notebooks, run folders, figures, report tables, PDFs and their logs of any profile (placeholders
    too) are never committed by mistake; smoke results neither; full results and the README's figure may be."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    executed = inspect.signature(run_pipeline).parameters["output_dir"].default
    generated = [f"{executed}/01_centralized.ipynb", "runs/fedavg/0123456789ab/done.json"]
    for profile in (*PROFILES, "another-profile"):
        generated += [
            f"figures/{profile}/remedies.png",
            f"report/generated/{profile}/remedies.tex",
            f"report/main-{profile}.pdf",
            f"report/main-{profile}.latexmk.log",
            f"report/main-{profile}.log",
        ]
    kept = ["results/full/fedavg_iid.csv", pipeline.README_IMAGE.relative_to(REPO).as_posix(), "report/main.tex"]
    for path, ignored in [
        *((p, True) for p in [*generated, "results/smoke/fedavg_iid.csv"]),
        *((p, False) for p in kept),
    ]:
        done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO)
        assert (done.returncode == 0) == ignored, f"{path} is {'not ' * ignored}ignored"


def test_a_run_in_a_notebook_kernel_draws_a_bar_not_lines(tmp_path: Path, capsys, monkeypatch):
    """In a notebook (Colab, Jupyter, papermill) a run's progress is tqdm.auto's bar, redrawn in place; off a
    terminal and outside a kernel it is one line per round (tests/test_notebook.py checks those lines)."""
    import types

    from smallrun import small_config

    from helpers.federated.rounds import run_fedavg
    from helpers.training import resumable

    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})  # what get_ipython() gives inside a kernel
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert resumable.interactive()
    run = run_fedavg(small_config(rounds=2, num_clients=10), run_root=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert f"fedavg {run.id}" in err and "\r" in err and "[round " not in err, err  # the bar, redrawn
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not resumable.interactive()  # a plain Python process writing to a pipe or a log
