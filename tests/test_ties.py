"""merge=ties (TIES-merging, Yadav et al. 2023) in the round, against the paper's three steps written here in numpy
(float64) from each client's trained weights: trim each update to its top-density entries by magnitude over the whole
update, elect each entry's sign by the sum of the trimmed updates, then the disjoint mean of the agreeing entries
(n_k-weighted). Several rounds, with and without masks, composed with FedAvgM (server momentum on the merged update);
with density 1 and one client per round it is FedAvg bit for bit. Clients train as users run them (SGD momentum 0.9,
weight decay 5e-5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from smallrun import CPU, fresh_model, small_config

from helpers.algorithms.merging import MERGE_RULES, MERGE_TUNING, weighted_mean
from helpers.algorithms.registry import make_algorithm
from helpers.config.experiments import make_config, parameters
from helpers.data.datasets import load_data
from helpers.federated import rounds
from helpers.federated.clients import client_shards
from helpers.ops.cli import main
from helpers.sparse.masks import Masks
from helpers.training.runs import load_checkpoint

# ----------------------------------------------------------------------------- the paper's three steps, by hand


def paper_ties(tau: np.ndarray, sizes: np.ndarray, density: float) -> np.ndarray:
    """TIES on the rows of `tau` (client x entry, every trainable tensor flattened together), n_k-weighted mean.

    Trim: client k keeps its k_k = round(density * moved_k) largest magnitudes (moved: entries its update changed;
    a frozen entry is zero), ties at the k_k-th kept. Elect: sign(sum_k trimmed_k). Disjoint mean: over the clients
    whose trimmed entry has the elected sign, weighted by n_k; an entry none keeps does not move."""
    trimmed = np.zeros_like(tau)
    for k, row in enumerate(tau):
        moved = np.abs(row[row != 0])
        keep = max(1, round(density * moved.size))
        threshold = np.sort(moved)[::-1][keep - 1]
        trimmed[k] = np.where(np.abs(row) >= threshold, row, 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    agree = (trimmed != 0) & (np.sign(trimmed) == sign)
    weight = agree * sizes[:, None]
    total = weight.sum(axis=0)
    return np.where(total > 0, (weight * trimmed).sum(axis=0) / np.where(total > 0, total, 1), 0.0)


def fedavgm_step(w: np.ndarray, update: np.ndarray, velocity: np.ndarray | None, lr: float, beta: float):
    """Hsu et al.'s server momentum on the round's update (Flower's FedAvgM): v <- beta v + update, w <- w + lr v."""
    velocity = update if velocity is None else beta * velocity + update
    return w + lr * velocity, velocity


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().double().cpu().numpy().ravel() for t in tensors])


class Recorder:
    """The sequential engine, recording each client's trained weights (w_k) and shard size as they are yielded."""

    def __init__(self, shards):
        self.shards, self.clients = shards, []

    def __call__(self, *args, **kwargs):
        for r in rounds.train_in_turn(*args, **kwargs):
            self.clients.append((r.client, flat(r.weights), len(self.shards[r.client])))
            yield r


# ----------------------------------------------------------------------------- the round against the reference


MASKS = ["none", "global", "per_client"]


@pytest.mark.parametrize("masking", MASKS)
def test_ties_rounds_follow_the_papers_three_steps_with_fedavgm(masking):
    """Four rounds of FedAvgM on TIES-merged updates (unequal Dirichlet shards, 4 of 8 clients a round), the weights
    after every round against the numpy reference; masks: none, one global, one per client."""
    config = small_config(num_clients=8, participation=0.5, local_steps=3, sharding="dirichlet", dirichlet_alpha=0.3,
                          algorithm="fedavgm", server_lr=0.8, server_momentum=0.7, merge="ties",
                          merge_density=0.3)  # fmt: skip
    assert config["momentum"] == 0.9 and config["weight_decay"] > 0  # the clients users run
    data = load_data(config, CPU)
    shards = client_shards(config, data)
    assert len({len(s) for s in shards}) > 2  # unequal n_k: the weighting is tested
    model = fresh_model(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names and not n.startswith("head.")}
    draw = lambda: {n: torch.rand(s, generator=gen) < 0.4 for n, s in shapes.items()}  # noqa: E731
    masks = {"none": None, "global": Masks(shared=draw()),
             "per_client": Masks.per_client([draw() for _ in shards])}[masking]  # fmt: skip
    algorithm, velocity = make_algorithm(config), None
    for rnd in range(4):
        w = flat(p for n, p in model.named_parameters() if n in names)
        engine = Recorder(shards)
        rounds.fedavg_round(model, data, shards, rnd, config, masks=masks, train_clients=engine, algorithm=algorithm)
        clients, trained, sizes = zip(*engine.clients)
        tau = np.stack(trained) - w
        trains = np.stack([flat(_full_mask(model, names, masks and masks.of_client(k))) > 0 for k in clients])
        assert not tau[~trains].any()  # a frozen entry is zero in its client's update, and never counts
        want, velocity = fedavgm_step(w, paper_ties(tau, np.array(sizes, float), 0.3), velocity, 0.8, 0.7)
        # the engine's rule under masks (docs/remedies.md): entries no client of the round trains stay, velocity or not
        want = np.where(trains.any(axis=0), want, w)
        got = flat(p for n, p in model.named_parameters() if n in names)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f"round {rnd + 1}")
        assert np.abs(got - w).max() > 1e-4  # the round moved the model


def _full_mask(model, names: list[str], masks) -> list[torch.Tensor]:
    """The client's mask per trainable tensor, all ones where it has none (the head, or no masks at all)."""
    params, masks = dict(model.named_parameters()), masks or {}
    return [masks[n] if n in masks else torch.ones_like(params[n], dtype=torch.bool) for n in names]


def test_ties_merge_by_hand_on_a_small_case():
    """Three clients, one tensor of 4 entries, density 2/3 of each client's moved entries, equal shards: the paper's
    worked steps (trim, elect, disjoint mean); the entry no client keeps stays."""
    w = [torch.zeros(4)]
    updates = [torch.tensor([3.0, -1.0, 0.5, 0.0]), torch.tensor([-2.0, -4.0, 0.1, 0.0]),
               torch.tensor([1.0, 2.0, -0.2, 0.0])]  # fmt: skip
    # trimmed (2 of 3 moved entries each): [3, -1, 0, 0], [-2, -4, 0, 0], [1, 2, 0, 0]; elected: [+, -, 0, 0]
    avg = MERGE_RULES["ties"](w, [[u] for u in updates], [1 / 3] * 3, 2 / 3)
    assert avg[0].tolist() == pytest.approx([2.0, -2.5, 0.0, 0.0])


def test_mean_rule_is_the_streamed_weighted_average_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    weights = [[w + torch.randn(w.shape, generator=gen) for w in start] for _ in range(3)]
    shares = [0.2, 0.5, 0.3]
    model = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in start])
    server = rounds.RoundSum(model)
    for w_k, share in zip(weights, shares):
        server.add([t.clone() for t in w_k], share, loss=0.0, upload=0)
    assert all(torch.equal(a, b) for a, b in zip(server.avg, weighted_mean(start, weights, shares, 1.0)))


# ----------------------------------------------------------------------------- degenerate case: FedAvg bit for bit


def run_frame(run) -> pd.DataFrame:
    return run.metrics().drop(columns="elapsed_s")


@pytest.mark.parametrize("algorithm", [{}, {"server_lr": 0.5}, {"algorithm": "fedavgm", "server_momentum": 0.9}])
def test_ties_at_density_1_with_one_client_per_round_is_fedavg_bit_for_bit(tmp_path, algorithm):
    common = dict(num_clients=6, participation=0.1, local_steps=2, rounds=3, **algorithm)
    plain = rounds.run_fedavg(small_config(**common), run_root=tmp_path, progress=False)
    ties = rounds.run_fedavg(small_config(**common, merge="ties", merge_density=1.0), run_root=tmp_path,
                             progress=False)  # fmt: skip
    assert plain.id != ties.id and all(len(c.split()) == 1 for c in plain.metrics()["clients"])
    pd.testing.assert_frame_equal(run_frame(plain), run_frame(ties), check_exact=True)
    got = load_checkpoint(ties)["model"]
    for name, tensor in load_checkpoint(plain)["model"].items():
        assert torch.equal(got[name], tensor), name


def test_ties_at_density_1_with_one_masked_client_is_fedavg_bit_for_bit():
    config = small_config(num_clients=6, participation=0.1, local_steps=2)
    data = load_data(config, CPU)
    shards = client_shards(config, data)
    gen = torch.Generator().manual_seed(0)
    models = [fresh_model(config) for _ in range(2)]
    mask = Masks(shared={n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in models[0].named_parameters()})
    for rnd in range(2):
        for model, merge in zip(models, ({}, {"merge": "ties", "merge_density": 1.0})):
            rounds.fedavg_round(model, data, shards, rnd, {**config, **merge}, masks=mask)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- parameters


def test_merge_parameters_leave_old_configs_and_run_ids_alone():
    plain = make_config("sparse_fedavg", "smoke")
    assert not {"merge", "merge_density", "interference_probe"} & set(plain)  # run ids of the study unchanged
    ties = make_config("sparse_fedavg", "smoke", merge="ties")
    assert ties["merge"] == "ties" and ties["merge_density"] == 0.2  # the authors' topk20
    assert MERGE_TUNING[0] == "merge_density" and len(MERGE_TUNING[1]) >= 3 and 0.2 in MERGE_TUNING[1]
    assert set(parameters()["merge"].choices) == set(MERGE_RULES)


@pytest.mark.parametrize(
    "sets,message",
    [
        (["merge_density=0.5"], "error: merge_density=0.5 is invalid with merge='mean'"),
        (["merge=ties", "merge_density=0"], "error: merge_density=0.0 is invalid: must be a number in (0, 1]"),
        (["merge=ties", "merge_density=1.5"], "error: merge_density=1.5 is invalid: must be a number in (0, 1]"),
        (["merge=median"], "error: merge='median' is invalid: must be one of mean, ties"),
        (["interference_probe=-1"], "error: interference_probe=-1 is invalid: must be an integer >= 0"),
    ],
)
def test_bad_merge_settings_stop_the_cli_in_one_line(capsys, sets, message):
    assert main(["run", "sparse_fedavg", *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_the_memory_estimate_counts_the_weights_ties_keeps():
    from helpers.core.models import build_model
    from helpers.ops.memory import estimate_phases

    plain, ties = (make_config("fedavg", "smoke", pretrained=False, **merge) for merge in ({}, {"merge": "ties"}))
    params = sum(p.numel() for p in build_model(plain["model"], pretrained=False, img_size=32).parameters())
    for a, b in zip(estimate_phases(plain), estimate_phases(ties)):
        kept = 10 * 4 * params if "round" in a.name else 0  # m = 10 fp32 copies, in the rounds only
        assert b.state - a.state == kept, a.name
