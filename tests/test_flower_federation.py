"""A real, secure Flower federation on localhost (§12): a SuperLink with TLS and SuperNode authentication whose
ServerApp runs under FLME_NO_TRAIN_DATA=1, so it cannot read the training split, and one registered SuperNode per
client that holds its own data; the runs start with `flwr run`, trusting the federation's private CA.

Sparse FedAvg (non-IID, 2 calibration rounds) gives the sequential engine's masks, weights and metrics while an
unregistered node is refused; nodes that trust another CA or skip TLS cannot connect; a node killed mid-round is
dropped from its rounds (node_failure=drop) and the run finishes with the other client. Slow (each message starts a
ClientApp process that imports torch): about 6 minutes on two cores.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from test_node_faults import dropped_ids, reference_round  # noqa: E402

from helpers.config.experiments import make_config  # noqa: E402
from helpers.editing.calibration import load_masks  # noqa: E402
from helpers.editing.sparse_runs import run_sparse_fedavg  # noqa: E402
from helpers.flower import app as flower  # noqa: E402
from helpers.flower.credentials import make_credentials  # noqa: E402
from helpers.flower.federation import supernode_command  # noqa: E402
from helpers.flower.local import LocalFederation, free_port  # noqa: E402
from helpers.training.resumable import build_seeded_model  # noqa: E402
from helpers.training.runs import load_checkpoint, metrics_file, open_run  # noqa: E402

# K=2 non-IID: each client holds 50 of the 100 classes (Nc * K >= 100, every class has a client)
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", server_lr=0.7)
NONIID = dict(num_clients=2, participation=1.0, sharding="noniid", classes_per_client=50)
SPARSE = dict(sparsity=0.9, calibration_rounds=2, calibration_samples=16, step0="ridge")


def run_rows(folder: Path) -> list[str]:
    """The lines of a run's metrics file so far (none before its first)."""
    path = metrics_file(folder)
    return path.read_text().splitlines() if path is not None else []


class Federation(LocalFederation):
    """helpers.flower.local's secure federation, and SuperNodes that must not get in."""

    def start_intruder(self, name: str, command: list[str]) -> subprocess.Popen:
        """A SuperNode that must not get in: it gives up after one retry (stopped in close() if it does not)."""
        proc = self.start([*command, "--port", str(free_port()), "--max-retries", "1"], name)
        self.others.append(proc)
        return proc


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("federation"), num_nodes=2)
    try:  # every process is stopped, even when starting fails halfway
        fed.start_all(num_nodes=2)
        yield fed
    finally:
        fed.close()


def assert_same_weights_and_metrics(flw, seq) -> None:
    wf, ws = load_checkpoint(flw)["model"], load_checkpoint(seq)["model"]
    assert wf.keys() == ws.keys() and max((wf[n] - ws[n]).abs().max().item() for n in ws) <= 1e-6
    got, want = flw.metrics(), seq.metrics()
    assert len(got) == seq.config["rounds"]
    assert got.drop(columns="elapsed_s").equals(want.drop(columns="elapsed_s"))


def test_sparse_fedavg_on_a_secure_federation_whose_server_holds_no_training_data(federation, tmp_path):
    """TLS, registered nodes, the server without training data: the sequential engine's masks, weights and metrics.
    A third node with a valid key pair that was never registered (claiming partition 1: had it joined, the server
    would stop on two nodes with one partition-id) is refused while the run starts, and the run ends without it."""
    config = make_config("sparse_fedavg", "smoke", rounds=2, **SMALL, **NONIID, **SPARSE)
    seq = run_sparse_fedavg(config, run_root=tmp_path / "sequential", progress=False)
    intruder = federation.start_intruder("unregistered", supernode_command(federation.creds, 2, 2, federation.address))
    server = federation.run(config, tmp_path / "flower")
    assert intruder.wait(timeout=120) != 0, federation.log("unregistered")[-2000:]
    assert "Failed to activate SuperNode" in federation.log("unregistered")
    assert "No SuperNode found with the given public key" in federation.log("link")
    assert server.wait(timeout=600) == 0, federation.log()[-3000:]
    flw = open_run("sparse_fedavg", flower.flower_config(config), tmp_path / "flower")
    assert flw.done, federation.log()[-3000:]
    assert_same_weights_and_metrics(flw, seq)
    got, want = load_masks(flw).shared, load_masks(seq).shared
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    s, f = seq.summary(), flw.summary()
    assert all(f[k] == s[k] for k in ("step0_val_acc", "calibration_scored", "calibration_upload_bytes", "test_acc"))


def test_a_node_that_trusts_another_ca_or_skips_tls_cannot_connect(federation, tmp_path):
    """Node 0's registered key, but the wrong trust: the TLS handshake fails (another CA) or the SuperLink, which
    speaks only TLS, drops the connection (no TLS); either node gives up and exits without joining."""
    other = tmp_path / "other"
    make_credentials(other, ["localhost", "127.0.0.1"], nodes=1)
    wrong_ca = supernode_command(other, 0, 2, federation.address)
    wrong_ca[wrong_ca.index("--auth-supernode-private-key") + 1] = str(federation.creds / "nodes" / "node-0.key")
    procs = {"other-ca": federation.start_intruder("other-ca", wrong_ca),
             "no-tls": federation.start_intruder("no-tls", supernode_command(other, 0, 2, federation.address,
                                                                              insecure=True))}  # fmt: skip
    for name, proc in procs.items():
        assert proc.wait(timeout=120) != 0, federation.log(name)[-2000:]
        assert "could not establish a connection to the SuperLink" in federation.log(name)
    assert "CERTIFICATE_VERIFY_FAILED" in federation.log("other-ca")


def test_a_node_killed_mid_round_is_dropped_and_the_run_finishes(federation, tmp_path):
    """Chosen behaviour (node_failure=drop): the SuperLink answers for the dead node (NODE_UNAVAILABLE), its client
    is left out of that round and the later ones (the `dropped` column), no partial or bad update reaches the
    global model, and the run finishes: its weights are FedAvg by hand over the clients that replied each round."""
    config = make_config("fedavg", "smoke", rounds=4, node_failure="drop", **SMALL, **NONIID)
    root = tmp_path / "flower"
    server = federation.run(config, root)
    folder = open_run("fedavg", flower.flower_config(config), root).dir
    deadline = time.monotonic() + 300
    while len(run_rows(folder)) < 2:  # round 1 is done
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
