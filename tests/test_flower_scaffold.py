"""SCAFFOLD on Flower: c on the ServerApp, each client's c_i on its node (its state-dir, versioned like the sequential
engine's files). A node fault, then a rerun, ends at the sequential engine's run; a node keeps only the versions a
resume reads, and none once the run is done."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from faults import fault_mod  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from test_flower import SMALL, assert_same_run, run_flower_without_train_data  # noqa: E402

from helpers.algorithms.fedavg import aligned_masks  # noqa: E402
from helpers.algorithms.registry import make_algorithm  # noqa: E402
from helpers.config.experiments import make_config  # noqa: E402
from helpers.core.torchfiles import load_torch  # noqa: E402
from helpers.editing.sparse_runs import run_sparse_fedavg  # noqa: E402
from helpers.federated.clients import sample_clients  # noqa: E402
from helpers.federated.rounds import train_in_turn
from helpers.flower import app as flower
from helpers.flower import node as flower_node
from helpers.flower import server as flower_ops  # noqa: E402
from helpers.sparse.masks import Masks  # noqa: E402
from helpers.training.runs import checkpoint_files, load_checkpoint, run_id  # noqa: E402

# Non-IID with K=10 (10 classes each) so that C=0.3 samples clients again and their c_i are read back.
NONIID_LOCAL = dict(num_clients=10, participation=0.3, sharding="noniid", classes_per_client=10, sparsity=0.9,
                    calibration_rounds=1, calibration_samples=16, mask_scope="local", step0="ridge")  # fmt: skip
SCAFFOLD = dict(algorithm="scaffold", rounds=4, checkpoint_every=1)


def node_versions(root, config) -> dict[int, list[int]]:
    """Client -> the rounds-done of the c_i versions its node holds for this run."""
    found: dict[int, list[int]] = {}
    for path in (root / run_id(config)).glob("client_*/*.pt"):
        client, done = map(int, path.stem.split("_"))
        found.setdefault(client, []).append(done)
    return {k: sorted(v) for k, v in found.items()}


def needed_versions(config, rounds: int, failed: tuple[int, int]) -> dict[int, list[int]]:
    """What each client's node should hold after `rounds` rounds and a fault of client failed[1] in round failed[0]
    (0-based; the others of that round trained), checkpoints every round: every version it wrote from the newest
    one at most `keep` rounds old, keep = rounds done at the older of the two checkpoints before its last write."""
    sampled = [sample_clients(config["seed"], t, config["num_clients"], config["participation"]) for t in range(rounds)]
    want = {}
    for k in range(config["num_clients"]):
        trained = [t for t in range(rounds) if k in sampled[t] and (t, k) != failed]
        if trained:
            keep = trained[-1] - 1 if trained[-1] >= 2 else 0  # checkpoints after rounds 1..t: the older is t-1
            oldest = max((t + 1 for t in trained if t + 1 <= keep), default=0)
            want[k] = [t + 1 for t in trained if t + 1 >= oldest]
    return want


def test_scaffold_on_flower_resumes_after_a_node_fault_to_the_sequential_run(tmp_path, monkeypatch):
    """Sparse, non-IID, per-client masks: round 4's first client fails on its node after rounds 1-3 (checkpointed);
    its round-mates already wrote c_i version 4, which the rerun must ignore. The rerun ends at the sequential run:
    metrics, weights, masks and the server's c; the nodes then hold no c_i."""
    config = make_config("sparse_fedavg", "smoke", **{**SMALL, **NONIID_LOCAL, **SCAFFOLD})
    state = tmp_path / "node-state"
    monkeypatch.setenv("FLME_NODE_STATE", str(state))
    victim = sample_clients(config["seed"], 3, config["num_clients"], config["participation"])[0]
    with pytest.raises(RuntimeError, match=rf"^round 4, client {victim}: RuntimeError: fault injected"):
        run_flower_without_train_data(
            config, tmp_path / "flower", monkeypatch, client_mods=[fault_mod({(4, victim): "raise"})]
        )
    (run_dir,) = (tmp_path / "flower" / "sparse_fedavg").iterdir()
    saved = load_torch(checkpoint_files(run_dir)[0])
    assert saved["round"] == 3 and saved["algorithm"]["done"] == 3
    held, want = node_versions(state, flower.flower_config(config)), needed_versions(config, 4, (3, victim))
    assert held == want
    assert any(4 in v for v in held.values())  # stale versions of the failed round, on the nodes
    assert any(len(v) > 1 for v in held.values())  # a client trained twice: its c_i was read back
    assert not list(run_dir.glob("control_variates/*.pt"))  # c_i live on the nodes, never in the server's run

    resumed = run_flower_without_train_data(config, tmp_path / "flower", monkeypatch)
    assert resumed.dir == run_dir and resumed.metrics()["elapsed_s"].iloc[0] == saved["metrics"][0]["elapsed_s"]
    seq = run_sparse_fedavg(config, run_root=tmp_path / "sequential", progress=False)
    assert_same_run(resumed, seq)
    got, ref = load_checkpoint(resumed)["algorithm"]["c"], load_checkpoint(seq)["algorithm"]["c"]
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)) and any(bool(c.any()) for c in ref)
    assert list(state.iterdir()) == []  # the done run's close message: no c_i left on any node


@pytest.mark.parametrize("sparse", [True, False])
def test_a_node_trains_like_the_sequential_client_and_prunes_then_drops_its_c_i(sparse, tmp_path):
    """The node's half in-process (no Ray), dense and sparse (a global mask on the matrices, the other tensors
    dense): client 1 in rounds 1, 2, 4 and 5 gets c at its trainable entries and returns Delta c_i; its weights and
    Delta c_i equal train_in_turn's from the same server state, its files follow the keep round the server sends,
    and `close` removes them."""
    config = flower.flower_config({**SMALL, "num_clients": 4, "algorithm": "scaffold"})
    data, model, shards = flower_node.node_inputs(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters() if p.ndim == 2}
    masks = Masks(shared=mask) if sparse else None
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n: w for n, w in weights.items() if n not in names}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "state-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})  # fmt: skip
    setup = RecordDict({"task": ConfigRecord({"op": "setup", "run": run_id(config), "client": 1}),
                        "frozen": ArrayRecord(frozen), **({"masks": ArrayRecord(mask)} if sparse else {})})  # fmt: skip
    flower_node.node_query(setup, context, config)
    server, reference = make_algorithm(config), make_algorithm(config)  # reference: the sequential client's
    folder = tmp_path / run_id(config) / "client_1"
    for rnd, keep in [(0, 0), (1, 0), (3, 2), (4, 4)]:
        start = [weights[n] + 0.01 * rnd for n in names]  # any global weights
        server.c = reference.c = [torch.randn(w.shape, generator=gen) for w in start]  # any server c
        server.checkpoints = reference.checkpoints = [keep, rnd]
        sent = flower_ops.algorithm_content(server, start, names, masks)(1)
        task = ConfigRecord({"run": run_id(config), "round": rnd, "client": 1})
        reply = flower_node.node_train(RecordDict({"weights": ArrayRecord(dict(zip(names, start, strict=True))),
                                                  "task": task, **sent}), context, config)  # fmt: skip
        trained = reply["weights"].to_torch_state_dict()
        delta = flower_ops.client_extra(reply, names, aligned_masks(names, masks and mask), start, required=True)
        (ref,) = train_in_turn(model, data, shards, rnd, [1], config, masks=masks, start=start, scaler=None,
                               algorithm=reference)  # fmt: skip
        assert all(torch.equal(trained[n], w) for n, w in zip(names, ref.weights, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(delta, ref.extra, strict=True))
        held = sorted(int(p.stem.split("_")[1]) for p in folder.glob("*.pt"))
        assert held == sorted(reference.store.index()[1])  # the node keeps what the sequential store keeps
    assert held == [4, 5]  # round 5 with keep 4: the versions before 4 went
    aligned = aligned_masks(names, mask if sparse else None)
    packed = sent["algorithm"].to_torch_state_dict()  # c travels at the trainable entries only
    assert [packed[n].numel() for n in names] == [int(m.sum()) if m is not None else w.numel()
                                                   for m, w in zip(aligned, start, strict=True)]  # fmt: skip
    close = ConfigRecord({"op": "close", "run": run_id(config), "client": 1})
    flower_node.node_query(RecordDict({"task": close}), context, config)
    assert not folder.exists() and not folder.parent.exists()
