"""The interference diagnostic (`interference`): each round's mean over its clients of the share of their probe on
which their trained model and the new global model disagree, against a hand computation; off by default, outside
the run id, and a run with it on trains exactly as one without."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from smallrun import CPU, fresh_model, small_config

from helpers.data.datasets import eval_batch, load_data
from helpers.federated import rounds
from helpers.federated.clients import client_shards
from helpers.federated.interference import probe_positions
from helpers.reporting.results import tidy_results
from helpers.training.runs import load_checkpoint, run_id


@torch.no_grad()
def argmax(model: torch.nn.Module, images: torch.Tensor, img_size: int) -> torch.Tensor:
    model.eval()
    out = model(eval_batch(images, img_size=img_size)).argmax(1)
    model.train()
    return out


@pytest.mark.parametrize("merge", [{}, {"merge": "ties", "merge_density": 0.2}])
def test_interference_matches_a_hand_computation(merge):
    """The probe larger than every shard is the whole shard, so the hand computation needs no probe draw: per client,
    argmax of its trained weights against argmax of the round's new global weights on its shard, then the mean."""
    config = small_config(num_clients=6, participation=0.5, local_steps=3, lr=0.2, interference_probe=1000, **merge)
    data = load_data(config, CPU)
    shards = client_shards(config, data)
    model, copy = fresh_model(config), fresh_model(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    seen, trained = [], {}

    def engine(*args, **kwargs):
        for r in rounds.train_in_turn(*args, **kwargs):
            trained[r.client] = [w.detach().clone() for w in r.weights]
            yield r

    for rnd in range(3):
        trained.clear()
        row = rounds.fedavg_round(model, data, shards, rnd, config, train_clients=engine)
        shares = []
        for k, weights in trained.items():
            copy.load_state_dict({**model.state_dict(), **dict(zip(names, weights, strict=True))})
            images = data.train_x[shards[k]]
            own, new = argmax(copy, images, config["img_size"]), argmax(model, images, config["img_size"])
            shares.append((own != new).double().mean().item())
        assert row["interference"] == pytest.approx(sum(shares) / len(shares), abs=1e-12)
        seen.append(row["interference"])
    assert any(0 < s < 1 for s in seen)  # the measure is not stuck at an end


def test_the_probe_is_a_fixed_seeded_part_of_the_clients_own_shard():
    config = small_config(interference_probe=8)
    first = [probe_positions(config, 90, k) for k in range(3)]
    assert all(len(p) == 8 and len(set(p.tolist())) == 8 and int(p.max()) < 90 for p in first)
    assert all(torch.equal(p, probe_positions(config, 90, k)) for k, p in enumerate(first))  # the same every round
    assert not torch.equal(first[0], first[1])  # each client its own
    assert len(probe_positions(config, 5, 0)) == 5  # a shard smaller than the probe: all of it


def test_interference_is_off_by_default_outside_the_run_id_and_changes_no_result(tmp_path):
    common = dict(num_clients=6, participation=0.5, local_steps=2, rounds=2)
    off = small_config(**common)
    on = small_config(**common, interference_probe=16)
    assert "interference_probe" not in off and run_id(on) == run_id(off)
    plain = rounds.run_fedavg(off, run_root=tmp_path / "off", progress=False)
    probed = rounds.run_fedavg(on, run_root=tmp_path / "on", progress=False)
    a, b = plain.metrics().drop(columns="elapsed_s"), probed.metrics().drop(columns="elapsed_s")
    assert "interference" not in a and b["interference"].between(0, 1).all()
    pd.testing.assert_frame_equal(a, b.drop(columns="interference"), check_exact=True)
    got = load_checkpoint(probed)["model"]
    assert all(torch.equal(got[n], t) for n, t in load_checkpoint(plain)["model"].items())
    tidy = tidy_results([probed])  # the parameter (probe size) and the metric (the round's mean) side by side
    assert (tidy["interference_probe"] == 16).all() and tidy["interference"].equals(b["interference"])


def test_the_cost_estimate_counts_two_forwards_of_every_probe():
    from helpers.config.experiments import make_config
    from helpers.ops.cost import run_work

    off = make_config("sparse_fedavg", "full")
    on = make_config("sparse_fedavg", "full", interference_probe=64)
    extra = run_work("sparse_fedavg", on).forward - run_work("sparse_fedavg", off).forward
    assert extra == off["rounds"] * 2 * 10 * 64  # m = 10 clients a round, their model's and the new global's
