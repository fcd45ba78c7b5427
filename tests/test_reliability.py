"""Faults: SIGKILL at chosen points, torn files, a full disk, bad inputs everywhere, determinism."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import helpers.data.datasets
import helpers.training.runs as runs
from helpers.config.experiments import EXPERIMENTS, experiment_parameters, parameters
from helpers.core.params import Param
from helpers.core.torchfiles import load_torch
from helpers.ops.cli import main
from helpers.ops.runners import RUNNERS, runner
from helpers.training.runs import checkpoint_files, load_checkpoint, metrics_file, open_run, save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _sets(**values: object) -> list[str]:
    """CLI `--set name=value` pairs."""
    return [arg for name, value in values.items() for arg in ("--set", f"{name}={value}")]


SIZES = _sets(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu")  # exact on CPU
FEDERATED = _sets(num_clients=10, participation=0.3, local_steps=2, rounds=4)
JOBS = {
    "centralized": ["run", "centralized", *SIZES, *_sets(epochs=4)],
    "fedavg": ["run", "fedavg", *SIZES, *FEDERATED],
    "sparse_fedavg": ["run", "sparse_fedavg", *SIZES, *FEDERATED, *_sets(sparsity=0.9, calibration_rounds=2)],
}
MODULE = {
    "centralized": "helpers.training.centralized",
    "fedavg": "helpers.federated.clients",
    "sparse_fedavg": "helpers.federated.clients",
}
# where each job's evaluation calls helpers.training.loop.evaluate from (federated runs: the evaluation seam)
EVAL_MODULE = {**MODULE, "fedavg": "helpers.federated.evaluation", "sparse_fedavg": "helpers.federated.evaluation"}

# Each fault kills the process (SIGKILL: no cleanup, no finally) at the n-th call of a function.
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
FAULTS = {
    "during training": ("{module}", "train_steps", 3, KILL),
    "during evaluation": ("{eval_module}", "evaluate", 2, KILL),
    # a checkpoint half written, then death (worse than a real crash: atomic_write never leaves a torn file)
    "during a checkpoint write": (
        "helpers.core.torchfiles",
        "atomic_write",
        None,
        "Path(args[0]).write_bytes(args[1][: len(args[1]) // 2]); " + KILL,
    ),
    # a torn metrics line, as a non-atomic append would leave, then death
    "during a CSV write": (
        "helpers.training.runs",
        "atomic_write",
        None,
        "open(args[0], 'ab').write(b'9,0.1,2.'); " + KILL,
    ),
}
DRIVER = """
import os, signal, sys
from pathlib import Path
import importlib
target = importlib.import_module({module!r})
original, calls = getattr(target, {func!r}), []
def patched(*args, **kwargs):
    if {match}:
        calls.append(1)
        if len(calls) == {n}:
            {action}
    return original(*args, **kwargs)
setattr(target, {func!r}, patched)
from helpers.ops.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args: list[str], root: Path, driver: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLME_PROFILE": "smoke"}
    code = ["-c", driver] if driver else ["-m", "helpers"]
    return subprocess.run(
        [sys.executable, *code, *args, "--run-root", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_state(root: Path) -> tuple[pd.DataFrame, dict]:
    folder = next(p for p in root.glob("*/*") if p.is_dir())
    assert (folder / "done.json").exists()
    metrics = pd.read_csv(metrics_file(folder), dtype={"clients": str}).drop(columns="elapsed_s")
    return metrics, load_torch(checkpoint_files(folder)[0])["model"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for job, args in JOBS.items():
        root = tmp_path_factory.mktemp(f"ref-{job}")
        assert run_cli(args, root).returncode == 0
        out[job] = final_state(root)
    return out


@pytest.mark.parametrize("job", sorted(JOBS))
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_killed_run_resumes_to_the_uninterrupted_result(job, fault, references, tmp_path):
    module, func, n, action = FAULTS[fault]
    module = module.format(module=MODULE[job], eval_module=EVAL_MODULE[job])
    if func == "atomic_write":
        prefix = "checkpoint-" if "checkpoint" in fault else "metrics-"
        match, n = f"Path(args[0]).name.startswith({prefix!r})", 3
    else:
        match = "True"
    driver = textwrap.dedent(DRIVER).format(module=module, func=func, match=match, n=n, action=action)
    killed = run_cli(JOBS[job], tmp_path, driver)
    assert killed.returncode == -9, f"the fault did not fire: {killed.stderr[-500:]}"
    assert run_cli(JOBS[job], tmp_path).returncode == 0
    metrics, weights = final_state(tmp_path)
    ref_metrics, ref_weights = references[job]
    pd.testing.assert_frame_equal(metrics, ref_metrics)  # no duplicated, missing or torn rows
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_same_command_twice_gives_identical_metrics(tmp_path, capsys):
    for root in ("a", "b"):
        assert main([*JOBS["fedavg"], "--run-root", str(tmp_path / root)]) == 0
    a, b = (final_state(tmp_path / r)[0] for r in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from helpers.config.experiments import make_config

    run = open_run("centralized", make_config("centralized", "smoke"), tmp_path)
    save_checkpoint(run, {"epoch": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(run, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(run)["epoch"] == 1
    assert sorted(p.name for p in run.dir.iterdir()) == ["checkpoint-local-1.pt", "config.json"]  # no stray temp files


def bad_values(spec: Param) -> list:
    """Values every parameter must refuse: wrong type, and out of range or not among the choices."""
    if spec.choices:
        return ["bogus", 3]
    if spec.kind is bool:
        return ["yes"]
    if spec.kind is str:
        return [42]
    values = ["abc"]
    if spec.low is not None:
        values.append(spec.low if spec.low_open else spec.low - 1)
    if spec.high is not None:
        values.append(spec.high if spec.high_open else spec.high + 1)
    if spec.kind is int:
        values.append(1.5)
    return values


CASES = [
    (exp, name, value)
    for exp in sorted(set(EXPERIMENTS) & set(RUNNERS))
    for name in experiment_parameters(exp)
    if name != "profile"
    for value in bad_values(parameters()[name])
]


@pytest.mark.parametrize("experiment,name,value", CASES)
def test_every_bad_parameter_fails_before_any_data_is_loaded(experiment, name, value, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the parameters were validated")

    monkeypatch.setattr(helpers.data.datasets, "_load_data", no_data)
    with pytest.raises(ValueError) as err:
        runner(experiment)(run_root=tmp_path, progress=False, **{name: value})
    assert f"{name}=" in str(err.value) and "must" in str(err.value)
    assert not any(tmp_path.iterdir()), "a run folder was created for an invalid config"


def test_papermill_parameter_errors_are_clear(tmp_path):
    import papermill

    with pytest.raises(
        papermill.PapermillExecutionError, match="EPOCHS=0 is invalid: must be an integer >= 1 \\(config key epochs\\)"
    ):
        papermill.execute_notebook(
            str(REPO / "notebooks" / "01_centralized.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"EPOCHS": 0},
            cwd=str(REPO / "notebooks"),
            progress_bar=False,
        )


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_papermill_lists_every_parameter_with_its_type(path, caplog):
    """`papermill --help-notebook` parses each parameter line: typed, none skipped, no 'Unable to parse' warning."""
    import json
    import logging

    import papermill

    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    assigned = [line.split(":")[0].split("=")[0].strip() for line in source.splitlines() if line and line[0].isalpha()]
    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = papermill.inspect_notebook(str(path))  # what `papermill --help-notebook` prints
    assert list(params) == assigned
    assert all(p["inferred_type_name"] not in ("None", "") for p in params.values()), list(params)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    namespace: dict = {}
    exec(source, namespace)  # annotations that need imports would fail here, in the notebook itself
    assert set(assigned) <= set(namespace)
