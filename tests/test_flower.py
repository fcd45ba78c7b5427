"""Flower (§12): the same clients, weights and metrics as the sequential engine, dense and sparse, IID and
non-IID; bad input refused before Flower starts; a failing client named with its round; resume after it; the CLI.

Each simulation starts and stops Ray (15-40 s on two cores): the tests share as few of them as they can.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from faults import FAULT_REASON, fault_mod  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from helpers.config.experiments import make_config  # noqa: E402
from helpers.core.torchfiles import load_torch  # noqa: E402
from helpers.data.datasets import NO_TRAIN_DATA_ENV  # noqa: E402
from helpers.editing.calibration import load_masks  # noqa: E402
from helpers.editing.sparse_runs import run_sparse_fedavg  # noqa: E402
from helpers.federated.clients import client_update, sample_clients  # noqa: E402
from helpers.federated.rounds import run_fedavg
from helpers.flower import app as flower
from helpers.flower import node as flower_node  # noqa: E402
from helpers.flower.app import run_flower  # noqa: E402
from helpers.flower.server import reply_content  # noqa: E402
from helpers.ops.cli import main  # noqa: E402
from helpers.training.loop import NonFiniteLossError  # noqa: E402
from helpers.training.runs import Run, checkpoint_files, load_checkpoint, metrics_file, open_run, run_id  # noqa: E402

SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", rounds=3, server_lr=0.7)
IID = dict(num_clients=10, participation=0.3, sharding="iid")
# Nc=2 needs K >= 50 (num_clients * classes_per_client >= 100: every class needs a client); C=0.06 keeps m=3.
NONIID = dict(num_clients=50, participation=0.06, sharding="noniid", classes_per_client=2)
SPARSE = dict(sparsity=0.9, calibration_rounds=2, calibration_samples=16, mask_scope="global")
CASES = {
    "iid-dense": ("fedavg", IID),
    "noniid-dense": ("fedavg", NONIID),
    "iid-sparse": ("sparse_fedavg", {**IID, **SPARSE}),
    "noniid-sparse": ("sparse_fedavg", {**NONIID, **SPARSE}),
    # per-client masks from each node's scores, the other sensitivity rule, step 0 from the nodes' ridge statistics
    "noniid-sparse-local-ridge": (
        "sparse_fedavg",
        {**NONIID, **SPARSE, "mask_scope": "local", "mask_rule": "most_sensitive", "step0": "ridge"},
    ),
}
SEQUENTIAL = {"fedavg": run_fedavg, "sparse_fedavg": run_sparse_fedavg}
TIMES = ("elapsed_s", "step0_s", "calibration_s")  # wall time: the only values allowed to differ


def case_config(case: str) -> dict:
    experiment, overrides = CASES[case]
    return make_config(experiment, "smoke", **{**SMALL, **overrides})


def max_weight_diff(a: Run, b: Run) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[n] - wb[n]).abs().max().item() for n in wb)


def layout(root: Path, run: Run) -> set[str]:
    """Every file of the root's run folders, the run's own id and the writing sessions' lease tokens replaced (a
    step-0 head run keeps its id). The feature cache is left out: a process keeps features in memory and writes them
    once."""
    files = [p for folder in ("fedavg", "sparse_fedavg") for p in (root / folder).rglob("*") if p.is_file()]
    return {re.sub(r"-[0-9a-f]{16}\b", "-TOKEN", str(p.relative_to(root)).replace(run.id, "RUN")) for p in files}


def summary(run: Run) -> dict:
    return {k: v for k, v in run.summary().items() if k not in (*TIMES, "run_id")}


def assert_same_run(flw: Run, seq: Run) -> None:
    """Same clients every round, final weights within 1e-6, metrics equal but for wall time."""
    config = seq.config
    want_clients = [
        " ".join(map(str, sample_clients(config["seed"], r, config["num_clients"], config["participation"])))
        for r in range(config["rounds"])
    ]
    got, want = flw.metrics(), seq.metrics()
    assert list(got["clients"]) == list(want["clients"]) == want_clients
    diff = max_weight_diff(flw, seq)
    print(f"max abs weight difference, Flower vs sequential: {diff}")
    assert diff <= 1e-6
    pd.testing.assert_frame_equal(got.drop(columns="elapsed_s"), want.drop(columns="elapsed_s"), check_exact=True)
    assert summary(flw) == summary(seq)
    if seq.experiment == "sparse_fedavg":  # the same masks, bit for bit (every client's, for local masks)
        got_masks, want_masks = load_masks(flw), load_masks(seq)
        for k in range(config["num_clients"]):
            own, ref = got_masks.of_client(k), want_masks.of_client(k)
            assert own.keys() == ref.keys() and all(torch.equal(own[n], ref[n]) for n in ref)


def run_flower_without_train_data(config: dict, run_root: Path, monkeypatch, **options) -> Run:
    """run_flower with the server under FLME_NO_TRAIN_DATA=1 (the nodes hold their data: load_data(holder=True))."""
    with monkeypatch.context() as patch:
        patch.setenv(NO_TRAIN_DATA_ENV, "1")
        return run_flower(config, run_root=run_root, progress=False, **options)


@pytest.mark.parametrize("case", CASES)
def test_flower_equals_the_sequential_engine(case, tmp_path, monkeypatch):
    """The server holds no training data: step 0, calibration and shard sizes come from the nodes."""
    config = case_config(case)
    seq = SEQUENTIAL[flower.experiment_of(config)](config, run_root=tmp_path / "sequential", progress=False)
    flw = run_flower_without_train_data(config, tmp_path / "flower", monkeypatch)
    assert (flw.config["engine"], seq.config["engine"]) == ("flower", "sequential") and flw.id != seq.id
    assert {**flw.config, "engine": "sequential"} == seq.config
    assert_same_run(flw, seq)
    # Same run folder layout; sparse runs share one step-0 head run (engine="sequential"), found in both roots.
    assert layout(tmp_path / "flower", flw) == layout(tmp_path / "sequential", seq)
    assert flw.summary().get("step0_run") == seq.summary().get("step0_run")


REMEDIES = {
    "fedprox": {"algorithm": "fedprox", "prox_mu": 0.1},  # a client side, on the nodes
    "fedadam": {"algorithm": "fedadam", "server_lr": 0.05},  # server state, on the ServerApp
}


@pytest.mark.parametrize("remedy", REMEDIES)
def test_flower_runs_the_remedies_like_the_sequential_engine(remedy, tmp_path, monkeypatch):
    config = make_config("fedavg", "smoke", **{**SMALL, **IID, **REMEDIES[remedy]})
    seq = run_fedavg(config, run_root=tmp_path / "sequential", progress=False)
    flw = run_flower_without_train_data(config, tmp_path / "flower", monkeypatch)
    assert {**flw.config, "engine": "sequential"} == seq.config and seq.config["algorithm"] == remedy
    assert_same_run(flw, seq)
    state = load_checkpoint(flw).get("algorithm"), load_checkpoint(seq).get("algorithm")  # c, FedAdam's m and v
    torch.testing.assert_close(*state, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"participation": 1.5},
        {"num_clients": 501},  # the train split holds 500 samples
        {"sharding": "noniid", "classes_per_client": 5, "num_clients": 10},
        {"local_steps": 0},
    ],
)
def test_bad_input_fails_like_the_engine_before_flower_starts(overrides, tmp_path, monkeypatch):
    def no_start(*args, **kwargs):
        raise AssertionError("Flower started (or data was loaded) before validation")

    monkeypatch.setattr(flower, "simulate", no_start)
    monkeypatch.setattr(flower, "open_run", no_start)
    with pytest.raises(ValueError) as seq:
        run_fedavg(run_root=tmp_path, progress=False, **{**SMALL, **overrides})
    with pytest.raises(ValueError) as flw:
        run_flower({**SMALL, **overrides}, run_root=tmp_path, progress=False)
    assert str(flw.value) == str(seq.value) and re.match(r"^\w+=", str(flw.value))
    assert not any(tmp_path.iterdir())  # no run folder


def test_head_only_runs_are_refused_by_name(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^train_mode='head' is invalid with engine='flower'"):
        run_flower({**SMALL, **IID, "train_mode": "head"}, run_root=tmp_path)
    assert main(["flower", "--set", "train_mode=head", "--run-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: train_mode='head' is invalid with engine='flower'")
    assert not any(tmp_path.iterdir())


def test_a_failing_client_is_named_and_the_cli_rerun_resumes(tmp_path, monkeypatch, capsys):
    config = case_config("iid-dense")
    victim = sample_clients(config["seed"], 1, config["num_clients"], config["participation"])[1]
    mods = [fault_mod({(2, victim): "raise"})]  # on the client's node (a Ray worker process)
    with pytest.raises(RuntimeError, match=rf"^round 2, client {victim}: {re.escape(FAULT_REASON)}"):
        run_flower(config, run_root=tmp_path / "flower", progress=False, client_mods=mods)
    (run_dir,) = (tmp_path / "flower" / "fedavg").iterdir()
    saved = load_torch(checkpoint_files(run_dir)[0])
    assert saved["round"] == 1 and len(pd.read_csv(metrics_file(run_dir))) == 1  # round 1 is kept
    assert not (run_dir / "done.json").exists()

    sets = [a for k, v in {**SMALL, **IID}.items() for a in ("--set", f"{k}={v}")]
    assert main(["flower", "--profile", "smoke", *sets, "--run-root", str(tmp_path / "flower")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["run_dir"] == str(run_dir) and printed["round"] == 3
    assert json.loads((run_dir / "config.json").read_text())["engine"] == "flower"
    resumed = Run("fedavg", json.loads((run_dir / "config.json").read_text()), run_dir.name, run_dir)
    # It resumed (round 1's row and time come from the checkpoint) and ends where the sequential engine does.
    assert resumed.metrics()["elapsed_s"].iloc[0] == saved["metrics"][0]["elapsed_s"]
    assert_same_run(resumed, run_fedavg(config, run_root=tmp_path / "sequential", progress=False))
    monkeypatch.setattr(flower, "simulate", lambda *args: pytest.fail("a finished run started Flower again"))
    assert run_flower(config, run_root=tmp_path / "flower", progress=False).dir == run_dir


def test_non_finite_loss_on_a_node_stays_a_non_finite_loss_error():
    """The node's half in-process (no Ray): client_update's error names round and client; the server's half
    turns the error reply back into NonFiniteLossError, and any other error into "round r, client k: ..."."""
    config = flower.flower_config({**SMALL, **IID, "lr": 1e30})
    _, model, _ = flower_node.node_inputs(config)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 4}, state=RecordDict(), run_config={})
    hello = RecordDict({"hello": ConfigRecord({"run": run_id(config)})})
    assert flower_node.node_query(hello, context, config)["node"]["partition"] == 4
    setup = ConfigRecord({"op": "setup", "run": run_id(config), "client": 4})
    flower_node.node_query(RecordDict({"task": setup, "frozen": ArrayRecord()}), context, config)
    task = ConfigRecord({"run": run_id(config), "round": 1, "client": 4})
    with pytest.raises(NonFiniteLossError, match=r"^round 2, client 4: ") as exc:
        flower_node.node_train(RecordDict({"weights": ArrayRecord(weights), "task": task}), context, config)

    def failed(reason: str) -> SimpleNamespace:
        return SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(reason=reason))

    with pytest.raises(NonFiniteLossError, match=r"^round 2, client 4: "):
        reply_content(failed(f"\x1b[31mNonFiniteLossError: {exc.value}\x1b[0m"), "round 2, client 4")
    with pytest.raises(RuntimeError, match=r"^round 2, client 4: ValueError: bad$"):
        reply_content(failed("\x1b[31mValueError: bad\x1b[0m"), "round 2, client 4")
    with pytest.raises(RuntimeError, match=r"^round 2, client 4: no reply"):
        reply_content(None, "round 2, client 4")


def test_grad_scaler_state_travels_to_and_from_the_node():
    """fp16 (T4) runs carry a GradScaler: the node starts from the round's state the server sends and returns its
    final state, as train_in_turn does; weights and state equal client_update's with that scaler (in-process).
    amp=fp16 runs the same path on the CPU (autocast and GradScaler on "cpu")."""
    config = flower.flower_config({**SMALL, **IID, "local_steps": 6, "lr": 0.1, "amp": "fp16"})
    data, model, shards = flower_node.node_inputs(config)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # overflows until the scale has halved a few times
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    setup = ConfigRecord({"op": "setup", "run": run_id(config), "client": 2})
    flower_node.node_query(RecordDict({"task": setup, "frozen": ArrayRecord()}), context, config)
    task = ConfigRecord({"run": run_id(config), "round": 0, "client": 2})
    content = RecordDict({"weights": ArrayRecord(weights), "task": task, "scaler": ConfigRecord(start.state_dict())})
    reply = flower_node.node_train(content, context, config)
    got = reply["weights"].to_torch_state_dict()

    model.load_state_dict(weights)  # the same client on the same weights and scaler, in this process
    reference = torch.amp.GradScaler("cpu")
    reference.load_state_dict(start.state_dict())
    loss = client_update(model, data, shards[2], 0, 2, config, scaler=reference)
    assert reference.get_scale() < 2.0**126  # steps did overflow: the state that comes back has moved
    assert dict(reply["scaler"]) == reference.state_dict() and reply["result"]["loss"] == loss
    assert all(torch.equal(got[n], p) for n, p in model.named_parameters())


def test_deployed_config_is_the_cli_config():
    """`flwr run` nodes build their config from the run config (pyproject.toml + --run-config) as the CLI does."""
    run_config = {
        "experiment": "sparse_fedavg",
        "profile": "smoke",
        "set": "num_clients=10 sparsity=0.95",
        "run-root": "",
    }
    want = make_config("sparse_fedavg", "smoke", num_clients=10, sparsity=0.95, engine="flower")
    assert flower.deployed_config(run_config) == want
    with pytest.raises(ValueError, match=r"^experiment='centralized' is invalid on Flower"):
        flower.deployed_config({**run_config, "experiment": "centralized"})
    with pytest.raises(ValueError, match=r"^unknown parameter 'sparsity' for experiment 'fedavg'"):
        flower.deployed_config({**run_config, "experiment": "fedavg"})
    assert isinstance(flower.server_app, flower.ServerApp) and isinstance(flower.client_app, flower.ClientApp)


def run_config_of(command: list[str]) -> dict:
    """The --run-config of a `flwr run` command as Flower reads it (TOML values)."""
    import tomllib

    return tomllib.loads(command[command.index("--run-config") + 1].replace('" ', '"\n'))


@pytest.mark.parametrize("case", ["iid-sparse", "noniid-dense"])
def test_flwr_run_command_carries_the_whole_config(case, tmp_path, capsys):
    """What `flwr run` nodes rebuild from the printed command's run config is the config itself (its run id)."""
    config = {**case_config(case), "lr": 0.1 + 0.2, "data_root": str(tmp_path / "d")}  # a float repr must round-trip
    command = flower.flwr_run_command(config, tmp_path / "runs")
    assert command[:4] == ["flwr", "run", str(flower.APP_DIR), "local"] and "--stream" in command
    assert (flower.APP_DIR / "pyproject.toml").is_file()
    federation = command[command.index("--federation-config") + 1]
    assert federation == f"num-supernodes={config['num_clients']} client-resources-num-cpus=1"
    run_config = run_config_of(command)
    assert run_config["run-root"] == str((tmp_path / "runs").resolve())
    assert flower.deployed_config(run_config) == flower.flower_config(config)
    assert "--federation-config" not in flower.flwr_run_command(config, tmp_path, superlink="remote")
    with pytest.raises(ValueError, match=r"^data_root='/a b' cannot travel"):
        flower.flwr_run_command({**config, "data_root": "/a b"}, tmp_path)
    experiment, overrides = CASES[case]
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    args = ["flower", experiment, "--profile", "smoke", *sets, "--run-root", str(tmp_path), "--print-flwr-run"]
    assert main(args) == 0 and not any(tmp_path.iterdir())  # printed, nothing run
    want = flower.flwr_run_command(make_config(experiment, "smoke", **overrides), tmp_path)
    assert capsys.readouterr().out.strip() == shlex.join(want)


def stop_local_superlink(port: int) -> None:
    """Flower starts its local SuperLink detached, in its own session: stop that session."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in args) and str(port).encode() in args:
            os.killpg(int(proc.name), signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Flower's detached SuperLink through /proc")
def test_flwr_run_on_the_local_simulation_equals_the_sequential_engine(tmp_path):
    """The same apps through Flower's current CLI (`flwr run`, its managed local SuperLink in simulation mode):
    the command flwr_run_command prints gives the sequential engine's run (one torch thread everywhere)."""
    config = case_config("iid-sparse")
    http, control = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # flwr, flower-superlink
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "OMP_NUM_THREADS": "1",
    }
    try:
        done = subprocess.run(flower.flwr_run_command(config, tmp_path / "flower"), env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=400)  # fmt: skip
    finally:
        stop_local_superlink(http)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    flw = open_run("sparse_fedavg", flower.flower_config(config), tmp_path / "flower")
    assert flw.done, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(flw, run_sparse_fedavg(config, run_root=tmp_path / "sequential", progress=False))
