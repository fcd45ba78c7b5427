"""Server-side remedies (FedAvgM, FedAdam, FedYogi, FedAdagrad) against the update rules as Flower's strategies and
Reddi et al. (2021) Algorithm 2 state them and against Flower's own strategies run on the same updates, FedAvg's
bit-exact degenerate case, frozen entries under every algorithm, and exact resume with the server state."""

from __future__ import annotations

import functools
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from smallrun import CPU, small_config

from helpers.algorithms.registry import ALGORITHMS, make_algorithm
from helpers.core.models import set_trainable
from helpers.data.datasets import load_data
from helpers.federated import clients as fed_clients
from helpers.federated import rounds
from helpers.sparse.masks import Masks
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import Run, load_checkpoint

SERVER = {"server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 0.05}
SETTINGS = {
    "fedavgm": {"server_momentum": 0.7},
    "fedadam": SERVER,
    "fedyogi": SERVER,
    "fedadagrad": {"server_beta1": 0.8, "server_tau": 0.05},
}


def reference(name: str, w: np.ndarray, averages: list[np.ndarray], lr: float, **p) -> np.ndarray:
    """The server's weights after the rounds' averages, in float64, as the papers / Flower write the rules."""
    m = np.zeros_like(w)
    v = np.full_like(w, p.get("server_tau", 0.0) ** 2)  # Reddi et al.: v_{-1} >= tau^2 (taken equal)
    momentum = None
    for avg in averages:
        if name == "fedavgm":  # Flower's FedAvgM: pseudo-gradient w - avg, w <- w - lr * momentum
            pseudo = w - avg
            momentum = pseudo if momentum is None else p["server_momentum"] * momentum + pseudo
            w = w - lr * momentum
            continue
        delta = avg - w  # Reddi et al. Algorithm 2
        m = p["server_beta1"] * m + (1 - p["server_beta1"]) * delta
        if name == "fedadam":
            v = p["server_beta2"] * v + (1 - p["server_beta2"]) * delta**2
        elif name == "fedyogi":
            v = v - (1 - p["server_beta2"]) * delta**2 * np.sign(v - delta**2)
        else:  # fedadagrad
            v = v + delta**2
        w = w + lr * m / (np.sqrt(v) + p["server_tau"])
    return w


@pytest.mark.parametrize("name", list(SETTINGS))
def test_server_steps_follow_the_papers_rules(name):
    config = small_config(algorithm=name, server_lr=0.3, **SETTINGS[name])
    algorithm = make_algorithm(config)
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]
    # rounds with big, small and zero moves, so Yogi's sign takes both values
    averages = [[w + s * torch.randn(w.shape, generator=gen) for w in w0] for s in (1.0, 0.01, 0.5, 0.0)]
    w = [t.clone() for t in w0]
    for avg in averages:
        algorithm.server_step(w, [a.clone() for a in avg])
    for i, got in enumerate(w):
        want = reference(name, w0[i].double().numpy(), [a[i].double().numpy() for a in averages], 0.3,
                         **SETTINGS[name])  # fmt: skip
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def run_frame(run) -> pd.DataFrame:
    return run.metrics().drop(columns="elapsed_s")


def final_weights(run) -> dict:
    return load_checkpoint(run)["model"]


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_fedavgm_without_momentum_is_fedavg_bit_for_bit(tmp_path, server_lr):
    common = dict(num_clients=6, participation=0.5, local_steps=2, rounds=3, server_lr=server_lr)
    plain = rounds.run_fedavg(small_config(**common), run_root=tmp_path, progress=False)
    zero = rounds.run_fedavg(small_config(**common, algorithm="fedavgm", server_momentum=0.0), run_root=tmp_path,
                             progress=False)  # fmt: skip
    assert plain.id != zero.id
    pd.testing.assert_frame_equal(run_frame(plain), run_frame(zero), check_exact=True)
    for name, tensor in final_weights(plain).items():
        assert torch.equal(final_weights(zero)[name], tensor), name


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_entries_no_client_of_the_round_trains_never_move(name):
    """Local masks and 2 of 4 clients per round: the round's union of masks changes, and server state built in one
    round must not move entries that no client of a later round trains."""
    config = small_config(algorithm=name, num_clients=4, participation=0.5, local_steps=2, lr=0.2,
                          **SETTINGS.get(name, {}))  # fmt: skip
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    model = build_seeded_model(config, CPU)
    set_trainable(model, "full")
    gen = torch.Generator().manual_seed(0)
    names = [n for n, p in model.named_parameters() if not n.startswith("head.")]
    per_client = [{n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters() if n in names}
                  for _ in shards]  # fmt: skip
    algorithm, moved = make_algorithm(config), 0
    for rnd in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        row = rounds.fedavg_round(model, data, shards, rnd, config, masks=Masks.per_client(per_client),
                                  algorithm=algorithm)  # fmt: skip
        trained = [per_client[int(k)] for k in row["clients"].split()]
        for n in names:
            frozen = ~functools.reduce(torch.logical_or, [m[n] for m in trained])
            got = dict(model.named_parameters())[n].detach()
            assert torch.equal(got[frozen], before[n][frozen]), f"round {rnd + 1}: untrained entries of {n} moved"
            moved += int((got[~frozen] != before[n][~frozen]).sum())
    assert moved > 0


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_killed_run_resumes_to_identical_metrics_with_server_state(tmp_path, monkeypatch, name):
    config = small_config(algorithm=name, num_clients=6, participation=0.5, local_steps=2, rounds=5, server_lr=0.1,
                          **SETTINGS[name])  # fmt: skip
    clean = rounds.run_fedavg(config, run_root=tmp_path / "clean", progress=False)
    calls = {"n": 0}
    original = rounds.RoundSum.apply

    def dies_in_round_4(self, params, step):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return original(self, params, step)

    monkeypatch.setattr(rounds.RoundSum, "apply", dies_in_round_4)
    with pytest.raises(Killed):
        rounds.run_fedavg(config, run_root=tmp_path / "killed", progress=False)
    monkeypatch.undo()
    (killed_dir,) = (tmp_path / "killed").glob("fedavg/*")
    assert load_checkpoint(Run("fedavg", config, killed_dir.name, killed_dir))["round"] == 3
    resumed = rounds.run_fedavg(config, run_root=tmp_path / "killed", progress=False)
    pd.testing.assert_frame_equal(run_frame(resumed), run_frame(clean), check_exact=True)
    state = load_checkpoint(resumed)
    assert set(state["algorithm"]) == ({"velocity"} if name == "fedavgm" else {"m", "v"})
    for key, tensor in final_weights(clean).items():
        assert torch.equal(state["model"][key], tensor), key


class ReplyingNodes:
    """A Flower Grid whose node k answers every train message with the weights it got plus its own update
    d[round][k] (num-examples n_k), so every implementation sees the same pseudo-gradients avg - w."""

    def __init__(self, updates: list[list[dict]], sizes: list[int]):
        self.updates, self.sizes, self.round = updates, sizes, 0

    def get_node_ids(self) -> list[int]:
        return list(range(len(self.sizes)))

    def send_and_receive(self, messages, *, timeout=None) -> list:
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does
            k, got = m.metadata.dst_node_id, m.content["arrays"]
            arrays = ArrayRecord({n: Array(got[n].numpy() + d) for n, d in self.updates[self.round][k].items()})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": self.sizes[k]})})
            replies.append(Message(content, reply_to=m))
        self.round += bool(messages)  # evaluation is off: one exchange per round
        return replies


def flower_strategy(name: str, lr: float, p: dict):
    """Flower's own strategy with our parameters (fraction_train 1: every node, as in our rounds)."""
    from flwr.serverapp import strategy

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    if name == "fedavgm":
        return strategy.FedAvgM(**common, server_learning_rate=lr, server_momentum=p["server_momentum"])
    cls = {"fedadam": strategy.FedAdam, "fedyogi": strategy.FedYogi, "fedadagrad": strategy.FedAdagrad}[name]
    betas = {"beta_1": p["server_beta1"], "beta_2": p["server_beta2"]} if name != "fedadagrad" else {}
    return cls(**common, eta=lr, tau=p["server_tau"], **betas)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_server_steps_match_flowers_own_strategies(name, monkeypatch):
    """Flower's FedAvgM/FedAdam/FedYogi/FedAdagrad (flwr.serverapp.strategy, run by Strategy.start on a grid whose
    nodes return fixed updates) against helpers' server steps on the same updates, after aligning only what
    helpers.algorithms.fedopt documents as different:
    - Flower's v starts at 0 (ours at tau^2, Reddi et al.: v_{-1} >= tau^2): ours is started at 0 here;
    - Flower's FedAdam corrects the bias, eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) in round t (1-based;
      Algorithm 2 has none): our server_lr is set to eta_t in round t;
    - Flower's FedAdagrad fixes beta1 = 0: ours runs with server_beta1 = 0.
    FedAvgM needs nothing (Flower's pseudo-gradient is w - avg and it subtracts: the same rule)."""
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # messages made outside a Flower process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    p = {**SETTINGS[name], **({"server_beta1": 0.0} if name == "fedadagrad" else {})}
    lr, sizes = 0.3, [10, 30, 60]
    gen = np.random.default_rng(0)
    w0 = {"weight": gen.standard_normal((5, 4)), "bias": gen.standard_normal(7)}
    # rounds with big, small and zero moves, so Yogi's sign takes both values and v grows and shrinks
    updates = [[{n: s * gen.standard_normal(w.shape) for n, w in w0.items()} for _ in sizes]
               for s in (1.0, 0.01, 0.5, 0.0, 0.2, 0.05)]  # fmt: skip
    flower = flower_strategy(name, lr, p)
    result = flower.start(ReplyingNodes(updates, sizes), ArrayRecord({n: Array(w) for n, w in w0.items()}),
                          num_rounds=len(updates))  # fmt: skip

    algorithm = make_algorithm(small_config(algorithm=name, server_lr=lr, **p))
    w = [torch.from_numpy(t.copy()) for t in w0.values()]
    if name != "fedavgm":  # Flower's initial v and m: 0
        algorithm.load_state_dict({"m": [torch.zeros_like(t) for t in w], "v": [torch.zeros_like(t) for t in w]})
    total = sum(sizes)
    for t, round_updates in enumerate(updates, start=1):
        avg = [sum(n / total * (x + torch.from_numpy(u[key])) for n, u in zip(sizes, round_updates, strict=True))
               for x, key in zip(w, w0, strict=True)]  # fmt: skip
        if name == "fedadam":  # Flower's bias correction
            algorithm.server_lr = lr * np.sqrt(1 - p["server_beta2"] ** (t + 1)) / (1 - p["server_beta1"] ** (t + 1))
        algorithm.server_step(w, avg)
    for key, got in zip(w0, w, strict=True):
        np.testing.assert_allclose(got.numpy(), result.arrays[key].numpy(), rtol=1e-9, atol=1e-12, err_msg=key)
    assert not np.allclose(result.arrays["bias"].numpy(), w0["bias"])
