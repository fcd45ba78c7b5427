"""Client-side remedies: FedProx against gradient descent on the proximal objective, SCAFFOLD against its
Algorithm 1 written here, prox_mu=0 equal to FedAvg bit for bit, SCAFFOLD's compact control variates and exact
resume of a sparse SCAFFOLD run killed mid-round, seeded stragglers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from smallrun import CPU, SMALL, fresh_model, small_config

from helpers.algorithms import scaffold
from helpers.algorithms.registry import make_algorithm
from helpers.config.experiments import make_config
from helpers.core.torchfiles import load_torch
from helpers.data.datasets import augment_batch, augment_generator, load_data, step_batches
from helpers.editing.sparse_runs import run_sparse_fedavg
from helpers.federated import clients as fed_clients
from helpers.federated import rounds
from helpers.federated.stragglers import local_steps
from helpers.sparse.masks import Masks
from helpers.training.runs import checkpoint_files, load_checkpoint


def client_batches(config, shard, rnd, client):
    """The batches and augmentation generator the engine's client draws (a pure function of the keys)."""
    gen = augment_generator(config["seed"], "client", rnd, client)
    return step_batches(shard, config["batch_size"], config["local_steps"], gen), gen


def batch_loss(model, data, idx, gen, config):
    x = augment_batch(data.train_x[idx], gen, img_size=config["img_size"], mode=config["augment"])
    return F.cross_entropy(model(x), data.train_y[idx])


# ----------------------------------------------------------------------------- FedProx


def test_fedprox_clients_descend_the_proximal_objective():
    mu = 0.5
    config = small_config(algorithm="fedprox", prox_mu=mu, num_clients=1, participation=1.0, local_steps=3, lr=0.1)
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    model, ref = fresh_model(config), fresh_model(config)
    rounds.fedavg_round(model, data, shards, 0, config)  # one client, server_lr 1: the new weights are its own
    anchor = [p.detach().clone() for p in ref.parameters()]
    hyper = {k: config[k] for k in ("lr", "momentum", "weight_decay")}
    opt = torch.optim.SGD(ref.parameters(), **hyper)
    batches, gen = client_batches(config, shards[0], 0, 0)
    ref.train()
    for idx in batches:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor, strict=True))
        loss = batch_loss(ref, data, idx, gen, config) + mu / 2 * prox  # f_k(w) + mu/2 |w - w_global|^2
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = 0.0
    for (name, got), want, a in zip(model.named_parameters(), ref.parameters(), anchor, strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)
        moved += float((want - a).detach().abs().sum())
    assert moved > 0


def test_fedprox_without_mu_is_fedavg_bit_for_bit(tmp_path):
    common = dict(num_clients=6, participation=0.5, local_steps=2, rounds=3)
    plain = rounds.run_fedavg(small_config(**common), run_root=tmp_path, progress=False)
    prox = rounds.run_fedavg(small_config(**common, algorithm="fedprox", prox_mu=0.0), run_root=tmp_path,
                             progress=False)  # fmt: skip
    assert plain.id != prox.id
    frames = [r.metrics().drop(columns="elapsed_s") for r in (plain, prox)]
    pd.testing.assert_frame_equal(*frames, check_exact=True)
    want, got = load_checkpoint(plain)["model"], load_checkpoint(prox)["model"]
    assert all(torch.equal(got[n], t) for n, t in want.items())


# ----------------------------------------------------------------------------- SCAFFOLD


def scaffold_reference(config, data, shards, rounds):
    """Karimireddy et al. 2020, Algorithm 1 (equal shards) with the clients' heavy-ball SGD (momentum beta, weight
    decay lambda) and option II over its effective steps K_eff = (K - beta (1 - beta^K) / (1 - beta)) / (1 - beta)
    (the paper's K at beta = 0); K: the client's steps (a straggler's fewer). Returns (x, c)."""
    model = fresh_model(config)
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    c = [torch.zeros_like(p) for p in params]
    c_i = {k: [torch.zeros_like(p) for p in params] for k in range(len(shards))}
    lr, N, beta, lam = config["lr"], len(shards), config["momentum"], config["weight_decay"]
    for rnd in range(rounds):
        sampled = fed_clients.sample_clients(config["seed"], rnd, N, config["participation"])
        dys, dcs = [], []
        for k in sampled:
            with torch.no_grad():
                for p, w in zip(params, x, strict=True):
                    p.copy_(w)
            batches, gen = client_batches(config, shards[k], rnd, k)
            K = local_steps(config, rnd, k)
            m = [torch.zeros_like(p) for p in params]
            model.train()
            for step, idx in enumerate(batches[:K]):
                grads = torch.autograd.grad(batch_loss(model, data, idx, gen, config), params)
                if step == 0:
                    first = [g.clone() for g in grads]  # g_i(x): the gradient at the server model
                with torch.no_grad():
                    for p, g, ci, cc, mm in zip(params, grads, c_i[k], c, m, strict=True):
                        mm.copy_(beta * mm + g + lam * p + cc - ci)  # momentum over g_i(y_i) + lambda y_i - c_i + c
                        p -= lr * mm
            y = [p.detach().clone() for p in params]
            if config["scaffold_option"] == "I":
                new = first
            else:
                k_eff = (K - beta * (1 - beta**K) / (1 - beta)) / (1 - beta)
                new = [ci - cc + (w - yy) / (k_eff * lr) for ci, cc, w, yy in zip(c_i[k], c, x, y, strict=True)]
            dys.append([yy - w for yy, w in zip(y, x, strict=True)])
            dcs.append([n - ci for n, ci in zip(new, c_i[k], strict=True)])
            c_i[k] = new
        S = len(sampled)
        x = [w + config["server_lr"] * sum(d[i] for d in dys) / S for i, w in enumerate(x)]
        c = [cc + S / N * sum(d[i] for d in dcs) / S for i, cc in enumerate(c)]
    return x, c


PLAIN_SGD = dict(momentum=0.0, weight_decay=0.0)  # the paper's clients
DEFAULTS = dict(stragglers=0.5)  # the clients' default SGD (momentum 0.9, weight decay 5e-5), stragglers on


@pytest.mark.parametrize("option", ["II", "I"])
@pytest.mark.parametrize("clients", [PLAIN_SGD, DEFAULTS], ids=["plain_sgd", "defaults"])
def test_scaffold_follows_algorithm_1_for_several_rounds(option, clients):
    config = small_config(algorithm="scaffold", scaffold_option=option, num_clients=4, participation=0.5,
                          local_steps=3, server_lr=0.8, lr=0.1, **clients)  # fmt: skip
    if clients is DEFAULTS:
        assert config["momentum"] == 0.9 and config["weight_decay"] > 0
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    assert len({len(s) for s in shards}) == 1  # equal shards: the size-weighted mean is the paper's plain mean
    model, algorithm = fresh_model(config), make_algorithm(config)
    for rnd in range(4):
        rounds.fedavg_round(model, data, shards, rnd, config, algorithm=algorithm)
    x, c = scaffold_reference(config, data, shards, rounds=4)
    for (name, got), want in zip(model.named_parameters(), x, strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-4, msg=name)
    for got, want in zip(algorithm.c, c, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert max(float(t.abs().max()) for t in c) > 0


def test_control_variates_are_stored_at_trainable_entries_only(tmp_path):
    config = small_config(algorithm="scaffold", num_clients=4, participation=0.5, local_steps=2)
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    model = fresh_model(config)
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in model.named_parameters() if p.ndim == 2}
    algorithm = make_algorithm(config, tmp_path)
    for rnd in range(2):
        rounds.fedavg_round(model, data, shards, rnd, config, masks=Masks(shared=mask), algorithm=algorithm)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    aligned = [mask.get(n) for n in names]
    dense = sum(p.numel() for n, p in model.named_parameters() if n not in mask)
    files = sorted((tmp_path / "control_variates").glob("*.pt"))
    assert files and algorithm.store.nbytes() == 4 * len({f.stem.split("_")[0] for f in files}) * (
        dense + sum(int(m.sum()) for m in mask.values())
    )
    for f in files:
        values = torch.load(f, weights_only=True)
        assert [v.numel() for v in values] == [int(m.sum()) if m is not None else p.numel()
                                               for m, p in zip(aligned, model.parameters(), strict=True)]  # fmt: skip
    for n, m in mask.items():  # the server's c is 0 wherever the mask freezes
        assert not algorithm.c[names.index(n)][~m].any()


def test_control_variate_versions_survive_a_resume_from_the_older_checkpoint(tmp_path):
    store = scaffold.ControlVariates(tmp_path)
    for done in (1, 4, 6, 9):
        store.save(0, done, [torch.full((2,), float(done))], keep=5)  # checkpoints at 5 and later
    assert sorted(int(p.stem.split("_")[1]) for p in tmp_path.glob("0_*.pt")) == [4, 6, 9]
    again = scaffold.ControlVariates(tmp_path)  # a new process lists the folder
    assert again.load(0, upto=5)[0].tolist() == [4.0, 4.0]
    assert again.load(0, upto=9)[0].tolist() == [9.0, 9.0] and again.load(1, upto=9) is None


class Killed(Exception):
    pass


def test_sparse_scaffold_killed_mid_round_resumes_to_identical_metrics(tmp_path, monkeypatch):
    config = make_config("sparse_fedavg", "smoke", **SMALL, algorithm="scaffold", num_clients=6, participation=0.5,
                         rounds=5, calibration_rounds=1, calibration_samples=16, checkpoint_every=2)  # fmt: skip
    clean = run_sparse_fedavg(config, run_root=tmp_path / "clean", progress=False)
    calls = {"n": 0}
    finish = scaffold.ControlledSteps.finish

    def killed_in_round_4(self, params):  # after the second client of round 4 wrote its c_i
        out = finish(self, params)
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 2:
            raise Killed
        return out

    monkeypatch.setattr(scaffold.ControlledSteps, "finish", killed_in_round_4)
    with pytest.raises(Killed):
        run_sparse_fedavg(config, run_root=tmp_path / "killed", progress=False)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "killed").glob("sparse_fedavg/*")
    assert load_torch(checkpoint_files(run_dir)[0])["round"] == 2  # resumes two rounds back
    assert len(list(run_dir.glob("control_variates/*.pt"))) >= 3  # the killed run's c_i versions, on disk
    resumed = run_sparse_fedavg(config, run_root=tmp_path / "killed", progress=False)
    frames = [r.metrics().drop(columns="elapsed_s") for r in (resumed, clean)]
    pd.testing.assert_frame_equal(*frames, check_exact=True)
    want, got = load_checkpoint(clean), load_checkpoint(resumed)
    assert all(torch.equal(got["model"][n], t) for n, t in want["model"].items())
    assert all(torch.equal(a, b) for a, b in zip(got["algorithm"]["c"], want["algorithm"]["c"], strict=True))
    assert not list(run_dir.rglob("control_variates/*.pt"))  # a done run keeps no per-client state


# ----------------------------------------------------------------------------- stragglers


def test_stragglers_are_seeded_and_run_a_prefix_of_their_work(monkeypatch):
    config = small_config(stragglers=0.5, local_steps=8, num_clients=10, participation=0.5)
    draws = [local_steps(config, rnd, k) for rnd in range(40) for k in range(10)]
    assert draws == [local_steps(config, rnd, k) for rnd in range(40) for k in range(10)]
    assert all(1 <= s <= 8 for s in draws) and len(set(draws)) == 8
    assert 0.35 < sum(s < 8 for s in draws) / len(draws) < 0.55  # half straggle, 1/8 of those draw all 8 steps
    assert all(local_steps(small_config(local_steps=8), rnd, 0) == 8 for rnd in range(40))
    seen = []

    def recording(model, optimizer, images, labels, batches, *args, **kwargs):
        seen.append(batches.clone())
        return 0.0

    monkeypatch.setattr(fed_clients, "train_steps", recording)
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    row = rounds.fedavg_round(fresh_model(config), data, shards, 3, config)
    for k, batches in zip(map(int, row["clients"].split()), seen, strict=True):
        full, _ = client_batches(config, shards[k], 3, k)
        assert torch.equal(batches, full[: local_steps(config, 3, k)])
