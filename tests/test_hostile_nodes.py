"""Issue 34: a registered node that lies. The server computes what it can know (n_k, evaluation parts, scores'
shapes, ridge statistics' counts) and checks every reply against it; a huge finite update fails its client under
node_failure; a round whose global weights are not finite is never kept. Honest heterogeneous runs stay identical.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord  # noqa: E402
from test_node_faults import IID, SMALL, SPARSE, flower_run, run_weights, task_identity  # noqa: E402, F401

from helpers.algorithms.fedavg import FedAvg  # noqa: E402
from helpers.config.experiments import make_config  # noqa: E402
from helpers.core.torchfiles import load_torch  # noqa: E402
from helpers.data.datasets import class_counts, expected_shard_sizes, load_data  # noqa: E402
from helpers.federated.clients import client_shards, sample_clients  # noqa: E402
from helpers.federated.evaluation import eval_part_sizes, eval_parts  # noqa: E402
from helpers.federated.rounds import run_fedavg  # noqa: E402
from helpers.flower.replies import ridge_problem, scaler_problem, update_outliers  # noqa: E402
from helpers.training.loop import NonFiniteLossError  # noqa: E402
from helpers.training.runs import checkpoint_files  # noqa: E402

NONIID = dict(num_clients=100, participation=0.04, sharding="noniid", classes_per_client=1)  # 4 clients a round


# ----------------------------------------------------------------------------- what the server knows


@pytest.mark.parametrize(
    "shards",
    [
        dict(sharding="iid", num_clients=7, seed=3),
        dict(sharding="noniid", classes_per_client=1, num_clients=100),
        dict(sharding="noniid", classes_per_client=5, num_clients=100),
        dict(sharding="noniid", classes_per_client=3, num_clients=40, seed=2),
        dict(sharding="dirichlet", dirichlet_alpha=0.1, num_clients=20),
    ],
)
@pytest.mark.parametrize("train_size", [6000, 6173])  # equal class counts, and unequal ones (73 classes hold one more)
def test_the_server_computes_every_n_k_and_part_size_without_the_data(shards, train_size):
    """The sharders' sizes depend on the class counts and the seed only: the server's n_k from public counts equal
    the shards drawn from the real labels, and so do the evaluation parts."""
    config = make_config("fedavg", "smoke", synthetic_train_size=train_size, device="cpu", **shards)
    data = load_data(config, torch.device("cpu"))
    assert expected_shard_sizes(config) == [len(s) for s in client_shards(config, data)]
    assert np.array_equal(class_counts(config)["train"], np.bincount(data.train_y.numpy(), minlength=100))
    for split in ("val", "test"):
        n = len(getattr(data, f"{split}_y"))
        assert eval_part_sizes(config, split) == [len(p) for p in eval_parts(n, config["num_clients"])]


def test_cifar100_counts_are_the_published_ones():
    config = {**make_config("fedavg", "smoke", sharding="noniid", classes_per_client=1), "dataset": "cifar100"}
    counts = class_counts(config)  # 500 train and 100 test images per class; 10% of the train file to val
    assert (counts["train"] == 450).all() and (counts["val"] == 50).all() and (counts["test"] == 100).all()
    assert expected_shard_sizes(config) == [450] * 100


# ----------------------------------------------------------------------------- pure checks


def test_an_outlier_is_judged_against_the_others_never_against_itself():
    assert update_outliers({1: 1.0, 2: 50.0}, 10) == {2: update_outliers({1: 1.0, 2: 50.0}, 10)[2]}  # two clients
    assert set(update_outliers({1: 1.0, 2: 1.2, 3: 0.9, 4: 11.0}, 10)) == {4}
    assert update_outliers({1: 1.0, 2: 9.0}, 10) == {} and update_outliers({1: 1.0}, 10) == {}
    assert update_outliers({1: 1.0, 2: 50.0}, 0) == {}  # off


def test_an_honest_gradscaler_state_passes_and_a_forged_one_fails():
    """A real GradScaler over J steps with overflowing gradients at random steps stays in the range J steps allow;
    a scale shrunk to silence every client, a reset growth interval or a tracker out of range does not."""
    rng = np.random.default_rng(0)
    for interval, steps in [(2, 8), (3, 4), (2000, 8)]:
        w = torch.nn.Parameter(torch.ones(3))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=interval)
        opt = torch.optim.SGD([w], lr=0.1)
        start = scaler.state_dict()
        for _ in range(steps):
            opt.zero_grad()
            scale = math.inf if rng.random() < 0.3 else 1.0
            scaler.scale((w * scale).sum()).backward()
            scaler.step(opt)
            scaler.update()
        assert scaler_problem(start, scaler.state_dict(), steps) is None
        forged = {**scaler.state_dict(), "scale": start["scale"] * 1e-12}
        assert "outside" in scaler_problem(start, forged, steps)
        assert "changes" in scaler_problem(start, {**scaler.state_dict(), "growth_interval": 1}, steps)
        assert "tracker" in scaler_problem(start, {**scaler.state_dict(), "_growth_tracker": interval}, steps)


def test_ridge_statistics_must_count_the_shard():
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    xb = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], 1)
    xtx, xty = xb.T @ xb, xb.T @ torch.nn.functional.one_hot(y, 3).double()
    assert ridge_problem(xtx, xty, 5, 3, 12) is None
    assert "counts" in ridge_problem(xtx * 100, xty * 100, 5, 3, 12)  # a node claiming 100 times its shard
    skew = xtx.clone()
    skew[0, 1] += 1
    assert "symmetric" in ridge_problem(skew, xty, 5, 3, 12)
    assert "shapes" in ridge_problem(xtx[:4, :4], xty, 5, 3, 12)


# ----------------------------------------------------------------------------- lying nodes, end to end


def tampering(op: str, damage, client: int | None = None, rnd: int | None = None):
    """A Grid tamper: `damage(content, task)` on the replies to `op` (of `client` in 0-based round `rnd`, if given)."""

    def tamper(message, reply):
        task = message.content["task"] if "task" in message.content else None
        if task is not None and task["op"] == op and not reply.has_error():
            if client in (None, int(task["client"])) and rnd in (None, int(task.get("round", -1))):
                damage(reply.content, task)
        return [reply]

    return tamper


def inflate_size(content, task):
    content["result"]["size"] = int(content["result"]["size"]) * 100


def negative_score(content, task):
    scores = content["scores"].to_torch_state_dict()
    first = next(iter(scores))
    content["scores"] = ArrayRecord({**scores, first: -scores[first] - 1})


def inflate_samples(content, task):
    content["result"]["samples"] = int(content["result"]["samples"]) * 100


def inflate_ridge(content, task):
    stats = content["stats"].to_torch_state_dict()
    content["stats"] = ArrayRecord({k: v * 100 for k, v in stats.items()})  # 100 times its shard's weight


@pytest.mark.parametrize(
    ("experiment", "op", "damage", "extra", "message"),
    [
        ("fedavg", "size", inflate_size, {}, r"^size on client \d+: invalid reply: shard size \d+, expected \d+"),
        ("sparse_fedavg", "score", negative_score, {}, r"^score on client \d+: invalid reply: \S+ has negative scores"),
        ("sparse_fedavg", "score", inflate_samples, {}, r"^score on client \d+: invalid reply: \d+ samples scored"),
        ("sparse_fedavg", "ridge", inflate_ridge, {"step0": "ridge"}, r"^ridge on client \d+: invalid reply: the bias"),
        ("fedavg", "evaluate", inflate_samples, {"evaluation": "clients"}, r"^evaluate on client \d+: .*\(part of"),
    ],
)
def test_a_node_lying_about_what_the_server_knows_stops_the_run_by_name(
    experiment, op, damage, extra, message, tmp_path
):
    config = make_config(experiment, "smoke", **SMALL, **IID, **(SPARSE if experiment != "fedavg" else {}), **extra)
    with pytest.raises(RuntimeError, match=message):
        flower_run(config, tmp_path, tamper=tampering(op, damage))


def huge_update(content, task):
    weights = content["weights"].to_torch_state_dict()
    content["weights"] = ArrayRecord({n: w + 1e3 for n, w in weights.items()})  # finite, far from the others


def refuse(content, task):
    raise RuntimeError("refused")


def test_a_huge_finite_update_stops_the_run_and_no_checkpoint_holds_it(tmp_path):
    config = make_config("fedavg", "smoke", **SMALL, **IID)
    victim = sample_clients(config["seed"], 1, config["num_clients"], config["participation"])[1]
    with pytest.raises(
        RuntimeError, match=rf"^round 2, client {victim}: invalid reply: update norm .* update_bound=10"
    ):
        flower_run(config, tmp_path, tamper=tampering("train", huge_update, victim, 1))
    (folder,) = (tmp_path / "fedavg").iterdir()
    saved = load_torch(checkpoint_files(folder)[0])
    assert saved["round"] == 1 and all(bool(torch.isfinite(w).all()) for w in saved["model"].values())


def test_with_drop_a_huge_update_is_left_out_like_a_failed_node(tmp_path):
    """node_failure=drop: the run with a huge update equals, bit for bit, the run in which that node failed."""
    config = make_config("fedavg", "smoke", **SMALL, **IID, node_failure="drop")
    victim = sample_clients(config["seed"], 0, config["num_clients"], config["participation"])[0]
    poisoned = flower_run(config, tmp_path / "poisoned", tamper=tampering("train", huge_update, victim))
    failed = flower_run(config, tmp_path / "failed", tamper=failed_node(victim))
    want, got = run_weights(failed), run_weights(poisoned)
    assert poisoned.metrics()["dropped"].astype(str).tolist()[0] == str(victim)
    assert all(torch.equal(got[n], want[n]) for n in want)


def failed_node(client: int):
    def tamper(message, reply):
        task = message.content["task"] if "task" in message.content else None
        if task is not None and task["op"] == "train" and int(task["client"]) == client:
            from flwr.app import Error, Message  # noqa: PLC0415
            from flwr.common.constant import ErrorCode  # noqa: PLC0415

            return [Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="gone"), reply_to=message)]
        return [reply]

    return tamper


def test_honest_non_iid_clients_pass_the_bound_and_equal_the_sequential_engine(tmp_path):
    """Nc = 1 (each client sees one class: the most different updates an honest run makes) at the default bound:
    nobody is dropped and the Flower run is the sequential engine's."""
    config = make_config("fedavg", "smoke", **SMALL, **NONIID, node_failure="drop")
    flower = flower_run(config, tmp_path / "flower")
    sequential = run_fedavg(make_config("fedavg", "smoke", **SMALL, **NONIID), run_root=tmp_path / "sequential")
    assert flower.metrics()["dropped"].isna().all()
    want, got = run_weights(sequential), run_weights(flower)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_round_whose_global_weights_are_not_finite_is_never_kept(tmp_path, monkeypatch):
    """A server step that overflows (any engine) in round 2: the run stops as diverged, its checkpoint is round 1's."""
    step, calls = FedAvg.server_step, []

    def overflowing(self, w, avg):
        step(self, w, avg)
        calls.append(1)
        if len(calls) == 2:
            w[0].fill_(math.inf)

    monkeypatch.setattr(FedAvg, "server_step", overflowing)
    with pytest.raises(NonFiniteLossError, match="round 2: the server step gave non-finite global weights"):
        run_fedavg(make_config("fedavg", "smoke", **SMALL, **IID), run_root=tmp_path)
    (folder,) = (tmp_path / "fedavg").iterdir()
    saved = load_torch(checkpoint_files(folder)[0])
    assert saved["round"] == 1 and all(bool(torch.isfinite(w).all()) for w in saved["model"].values())
