"""A real Flower federation on localhost (§12): a SuperLink whose ServerApp runs under FLME_NO_TRAIN_DATA=1, so it
cannot read the training split, and one SuperNode per client that holds its own data; the runs start with `flwr run`.

Sparse FedAvg (non-IID, 2 calibration rounds) gives the sequential engine's masks, weights and metrics; a node killed
mid-round is dropped from its rounds (node_failure=drop) and the run finishes with the other client. Slow (each
message starts a ClientApp process that imports torch): about 5 minutes on two cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from test_node_faults import dropped_ids, reference_round  # noqa: E402

from helpers import flower  # noqa: E402
from helpers.calibration import load_masks  # noqa: E402
from helpers.config import make_config  # noqa: E402
from helpers.data import NO_TRAIN_DATA_ENV  # noqa: E402
from helpers.resumable import build_seeded_model  # noqa: E402
from helpers.runs import load_checkpoint, open_run  # noqa: E402
from helpers.sparse_runs import run_sparse_fedavg  # noqa: E402

# K=2 non-IID: each client holds 50 of the 100 classes (Nc * K >= 100, every class has a client)
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", server_lr=0.7)
NONIID = dict(num_clients=2, participation=1.0, sharding="noniid", classes_per_client=50)
SPARSE = dict(sparsity=0.9, calibration_rounds=2, calibration_samples=16, step0="ridge")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink (its ServerApp without training data) and SuperNodes on localhost, each in its own session."""

    def __init__(self, root: Path, num_nodes: int):
        self.root, self.port, self.nodes = root, free_port(), {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                    "FLWR_HOME": str(root / "flwr-home")}  # fmt: skip
        self.env.pop(NO_TRAIN_DATA_ENV, None)  # the nodes hold their data; only the server runs without
        (root / "flwr-home").mkdir(parents=True)
        connection = f'[superlink]\ndefault = "fed"\n[superlink.fed]\naddress = "127.0.0.1:{self.port}"\n'
        (root / "flwr-home" / "config.toml").write_text(connection + "insecure = true\n")
        command = ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                   "--port", str(self.port), "--database", str(root / "link.db")]  # fmt: skip
        self.link = self.start(command, "link", {NO_TRAIN_DATA_ENV: "1"})
        deadline = time.monotonic() + 120
        while not self.listening():  # flwr run fails at once if the SuperLink is not up yet
            assert time.monotonic() < deadline and self.link.poll() is None, (root / "link.log").read_text()[-2000:]
            time.sleep(0.2)
        for k in range(num_nodes):
            self.start_node(k, num_nodes)

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self, command: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 (the process keeps writing it)
        env = {**self.env, **(env or {})}
        return subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def start_node(self, k: int, num_nodes: int) -> None:
        command = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port",
                   str(free_port()), "--node-config", f"partition-id={k} num-partitions={num_nodes}"]  # fmt: skip
        self.nodes[k] = self.start(command, f"node{k}")

    def kill_node(self, k: int) -> None:
        os.killpg(self.nodes[k].pid, signal.SIGKILL)  # the SuperNode and the ClientApp it runs, mid-message
        self.nodes[k].wait()

    def run(self, config: dict, run_root: Path) -> subprocess.Popen:
        """`flwr run` of `config` on this federation, started (the caller waits)."""
        command = flower.flwr_run_command(config, run_root, superlink="fed")
        log = open(self.root / "runs.log", "a")  # noqa: SIM115
        return subprocess.Popen(command, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return (self.root / "runs.log").read_text()

    def close(self) -> None:
        for proc in [self.link, *self.nodes.values()]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("federation"), num_nodes=2)
    yield fed
    fed.close()


def assert_same_weights_and_metrics(flw, seq) -> None:
    wf, ws = load_checkpoint(flw)["model"], load_checkpoint(seq)["model"]
    assert wf.keys() == ws.keys() and max((wf[n] - ws[n]).abs().max().item() for n in ws) <= 1e-6
    got, want = flw.metrics(), seq.metrics()
    assert len(got) == seq.config["rounds"]
    assert got.drop(columns="elapsed_s").equals(want.drop(columns="elapsed_s"))


def test_sparse_fedavg_on_a_federation_whose_server_holds_no_training_data(federation, tmp_path):
    config = make_config("sparse_fedavg", "smoke", rounds=2, **SMALL, **NONIID, **SPARSE)
    seq = run_sparse_fedavg(config, run_root=tmp_path / "sequential", progress=False)
    assert federation.run(config, tmp_path / "flower").wait(timeout=600) == 0, federation.log()[-3000:]
    flw = open_run("sparse_fedavg", flower.flower_config(config), tmp_path / "flower")
    assert flw.done, federation.log()[-3000:]
    assert_same_weights_and_metrics(flw, seq)
    got, want = load_masks(flw).shared, load_masks(seq).shared
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    s, f = seq.summary(), flw.summary()
    assert all(f[k] == s[k] for k in ("step0_val_acc", "calibration_scored", "calibration_upload_bytes", "test_acc"))


def test_a_node_killed_mid_round_is_dropped_and_the_run_finishes(federation, tmp_path):
    """Chosen behaviour (node_failure=drop): the SuperLink answers for the dead node (NODE_UNAVAILABLE), its client
    is left out of that round and the later ones (the `dropped` column), no partial or bad update reaches the
    global model, and the run finishes: its weights are FedAvg by hand over the clients that replied each round."""
    config = make_config("fedavg", "smoke", rounds=4, node_failure="drop", **SMALL, **NONIID)
    root = tmp_path / "flower"
    server = federation.run(config, root)
    metrics = open_run("fedavg", flower.flower_config(config), root).dir / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # round 1 is done
        assert time.monotonic() < deadline and server.poll() is None, federation.log()[-3000:]
        time.sleep(0.2)
    federation.kill_node(1)
    assert server.wait(timeout=600) == 0, federation.log()[-3000:]
    run = open_run("fedavg", flower.flower_config(config), root)
    assert run.done, federation.log()[-3000:]
    dropped = dropped_ids(run)
    assert dropped[0] == [] and dropped[-1] == [1]
    assert dropped == [[]] * dropped.index([1]) + [[1]] * (len(dropped) - dropped.index([1]))  # gone for good
    weights = {n: p.detach() for n, p in build_seeded_model(config, torch.device("cpu")).named_parameters()}
    for rnd, gone in enumerate(dropped):
        weights = reference_round(config, weights, rnd, [0] if gone else [0, 1])
    got = load_checkpoint(run)["model"]
    assert max((got[n] - weights[n]).abs().max().item() for n in weights) <= 1e-6
    federation.start_node(1, 2)  # the federation as it was
