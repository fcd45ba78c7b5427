"""SCAFFOLD on a problem with a known answer, with the clients' default optimizer (SGD, momentum 0.9, weight decay on).

Client i minimises F_i(w) = 1/2 (w - a_i)^T A_i (w - a_i) + lambda/2 |w|^2 (its loss plus the optimizer's weight
decay), F = (1/N) sum_i F_i. In closed form: w* = (A + lambda I)^-1 b with A = mean A_i, b = mean A_i a_i, and the
control variates' targets c_i* = grad F_i(w*) = A_i (w* - a_i) + lambda w* (option II: gradients of the objective
the clients minimise), c* = grad F(w*) = 0, so c - c_i -> grad F(w*) - grad F_i(w*) (lambda w* cancels; option I's
loss gradient has the same difference). The clients run through the engine's client optimizer and
helpers.algorithms.scaffold; every reference is the math above, never the engine's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from smallrun import small_config
from torch import Tensor, nn

from helpers.algorithms import scaffold
from helpers.algorithms.fedavg import aligned_masks
from helpers.algorithms.registry import make_algorithm
from helpers.config.experiments import make_config
from helpers.federated.clients import client_lr, client_optimizer
from helpers.federated.rounds import RoundSum
from helpers.federated.stragglers import local_steps

N, DIM = 4, 8  # clients; entries of the model (a 2x3 weight and a bias of 2)


class Quadratic(nn.Module):
    """A layer-shaped model (two trainable tensors) whose loss on client i is its quadratic."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 3))
        self.bias = nn.Parameter(torch.zeros(2))

    def flat(self) -> Tensor:
        return torch.cat([self.weight.flatten(), self.bias])


def problem(seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Clients' curvatures A_i (eigenvalues 0.2..1, own eigenvectors) and optima a_i far apart: strong drift."""
    gen = torch.Generator().manual_seed(seed)
    rotations = [torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))[0] for _ in range(N)]
    curvatures = [q @ torch.diag(torch.linspace(0.2, 1.0, DIM, dtype=torch.float64)) @ q.T for q in rotations]
    return curvatures, [3 * torch.randn(DIM, generator=gen, dtype=torch.float64) for _ in range(N)]


def optimum(curv, optima, lam: float, trainable: Tensor) -> tuple[Tensor, list[Tensor]]:
    """w* of F over the `trainable` entries (the others stay at the model's initial 0), and c_i* = grad F_i(w*)."""
    hessian = sum(curv) / N + lam * torch.eye(DIM, dtype=torch.float64)
    b = sum(a_mat @ a for a_mat, a in zip(curv, optima, strict=True)) / N
    w = torch.zeros(DIM, dtype=torch.float64)
    w[trainable] = torch.linalg.solve(hessian[trainable][:, trainable], b[trainable])
    return w, [a_mat @ (w - a) + lam * w for a_mat, a in zip(curv, optima, strict=True)]


def loss(model: Quadratic, a_mat: Tensor, a: Tensor) -> Tensor:
    d = model.flat() - a.float()
    return 0.5 * d @ a_mat.float() @ d


def run_scaffold(config, curv, optima, rounds, *, mask=None, scale=None) -> list[dict]:
    """SCAFFOLD's rounds as federated.rounds runs them (client_optimizer, client_side, correct, finish, RoundSum,
    server_step), every client in every round; returns per round w, c, each c_i (flat) and the steps each client's
    GradScaler (initial `scale`) skipped."""
    model, algorithm = Quadratic(), make_algorithm(config)
    names, params = [n for n, _ in model.named_parameters()], list(model.parameters())
    masks = {"weight": mask[:6].view(2, 3), "bias": mask[6:]} if mask is not None else None
    lr, history = client_lr(config, 0), []
    for rnd in range(rounds):
        server, skipped = RoundSum(model), []
        for k in range(N):
            with torch.no_grad():
                torch._foreach_copy_(params, server.start)
            opt = client_optimizer(model, lr, config, masks)
            side = algorithm.client_side(rnd, k, server.start, aligned_masks(names, masks), lr, config["local_steps"])
            scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
            for _ in range(local_steps(config, rnd, k)):
                opt.zero_grad()
                if scaler is None:
                    loss(model, curv[k], optima[k]).backward()
                    side.correct(params)
                    opt.step()
                else:  # as helpers.training.loop.train_steps: the correction sees unscaled gradients
                    scaler.scale(loss(model, curv[k], optima[k])).backward()
                    scaler.unscale_(opt)
                    side.correct(params)
                    scaler.step(opt)
                    scaler.update()
            skipped.append(round(math.log2(scale / scaler.get_scale())) if scaler else 0)  # each skip halves it
            algorithm.receive(k, side.finish(params))
            server.add(params, 1 / N, loss=0.0, upload=0, masks=masks)
        server.apply(params, algorithm.server_step)
        c_i = [scaffold.unpack_entries(algorithm.store.load(k, rnd + 1), aligned_masks(names, masks), params)
               for k in range(N)]  # fmt: skip
        history.append({"w": flat(params), "c": flat(algorithm.c), "c_i": [flat(v) for v in c_i], "skipped": skipped})
    return history


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().flatten() for t in tensors]).double()


def errors(state: dict, w_star: Tensor, c_star: list[Tensor]) -> tuple[float, float]:
    """max |w - w*| and max_i |(c - c_i) - (grad F(w*) - grad F_i(w*))| (grad F(w*) = mean c_i*)."""
    want = [sum(c_star) / N - ci for ci in c_star]
    got = [state["c"] - ci for ci in state["c_i"]]
    return float((state["w"] - w_star).abs().max()), max(float((g - w).abs().max()) for g, w in zip(got, want))


def default_config(**overrides) -> dict:
    """A SCAFFOLD config at the clients' defaults (momentum, weight decay, lr); asserts they are the defaults."""
    config = small_config(algorithm="scaffold", num_clients=N, participation=1.0, **overrides)
    defaults = make_config("fedavg", "smoke", algorithm="scaffold")
    assert all(config[k] == defaults[k] for k in ("momentum", "weight_decay", "lr"))
    assert config["momentum"] == 0.9 and config["weight_decay"] > 0
    return config


DENSE = torch.ones(DIM, dtype=torch.bool)
ROUNDS = {4: 80, 8: 30, 16: 40}  # to the float32 floor (~1e-6 of the first round's errors) with a margin


@pytest.mark.parametrize(("steps", "option"), [(4, "II"), (8, "II"), (16, "II"), (8, "I")])
def test_scaffold_corrects_drift_at_the_default_client_optimizer(steps, option):
    config = default_config(local_steps=steps, scaffold_option=option)
    curv, optima = problem()
    w_star, c_star = optimum(curv, optima, config["weight_decay"], DENSE)
    if option == "I":  # its c_i is the loss gradient: lambda w* is not in it (c - c_i is the same)
        c_star = [ci - config["weight_decay"] * w_star for ci in c_star]
    history = run_scaffold(config, curv, optima, rounds=ROUNDS[steps])
    (w0, corr0), (w_err, corr_err) = errors(history[0], w_star, c_star), errors(history[-1], w_star, c_star)
    assert w_err < 1e-5 * w0 and corr_err < 1e-5 * corr0, (w0, corr0, w_err, corr_err)
    assert max(float(c.abs().max()) for c in c_star) > 1  # the drift was real: the true corrections are large
    assert float((history[-1]["c"] - sum(c_star) / N).abs().max()) < 1e-5  # c -> grad F(w*) (0 for option II)


@pytest.mark.parametrize("steps", [4, 8, 16])
def test_the_papers_option_ii_diverges_under_momentum(steps, monkeypatch):
    """The same runs with the paper's (w - y_i) / (K eta), exact for plain SGD only: the correction error grows."""
    monkeypatch.setattr(scaffold, "effective_steps", lambda taken, momentum: taken)
    config = default_config(local_steps=steps)
    curv, optima = problem()
    w_star, c_star = optimum(curv, optima, config["weight_decay"], DENSE)
    corr = [errors(state, w_star, c_star)[1] for state in run_scaffold(config, curv, optima, rounds=24)]
    assert corr[-1] > 10 * corr[0] and all(b > a for a, b in zip(corr[12:], corr[13:])), corr


def test_scaffold_under_a_mask_and_stragglers_converges_to_the_masked_optimum():
    """SparseSGDM freezes 3 of 8 entries and half the clients straggle (1..J steps): w* minimises F over the
    trainable entries (the frozen ones stay at 0); c and c_i are 0 at the frozen entries."""
    config = default_config(local_steps=8, stragglers=0.5)
    curv, optima = problem(seed=1)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    w_star, c_star = optimum(curv, optima, config["weight_decay"], mask)
    c_star = [ci * mask for ci in c_star]
    history = run_scaffold(config, curv, optima, rounds=40, mask=mask)
    assert len({local_steps(config, r, k) for r in range(40) for k in range(N)}) > 4  # stragglers did straggle
    (w0, corr0), (w_err, corr_err) = errors(history[0], w_star, c_star), errors(history[-1], w_star, c_star)
    assert w_err < 1e-5 * w0 and corr_err < 1e-5 * corr0, (w0, corr0, w_err, corr_err)
    assert not history[-1]["c"][~mask].any() and all(not c[~mask].any() for c in history[-1]["c_i"])


@pytest.mark.parametrize("option", ["II", "I"])
def test_steps_a_grad_scaler_skips_count_for_nothing(option):
    """A scale of 2^127 overflows the first gradients: the GradScaler skips those steps (halving its scale), and
    client 0's new c_i is that of the steps it applied, from the heavy-ball recursion written here."""
    config = default_config(local_steps=8, scaffold_option=option)
    lam, beta, lr = config["weight_decay"], config["momentum"], config["lr"]
    curv, optima = problem()
    (state,) = run_scaffold(config, curv, optima, rounds=1, scale=2.0**127)
    skipped = state["skipped"][0]
    assert 0 < skipped < config["local_steps"]
    # Round 1 (c = c_i = 0): heavy-ball SGD on F_0 from w = 0; a skipped step moved nothing.
    y, m, grads = torch.zeros(DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64), []
    for _ in range(config["local_steps"] - skipped):
        grads.append(curv[0] @ (y - optima[0]) + lam * y)
        m = beta * m + grads[-1]
        y = y - lr * m
    n = len(grads)
    weights = [(1 - beta ** (n - k)) / (1 - beta) for k in range(n)]  # how far step k's gradient moved y
    want = grads[0] if option == "I" else sum(w * g for w, g in zip(weights, grads, strict=True)) / sum(weights)
    assert torch.isfinite(state["c_i"][0]).all()
    torch.testing.assert_close(state["c_i"][0], want, atol=1e-5, rtol=1e-4)


def test_effective_steps_is_heavy_ball_displacement_per_unit_gradient():
    """K_eff: torch's SGD (momentum beta) moves a weight by lr K_eff under a constant unit gradient; K at beta 0."""
    for momentum in (0.0, 0.5, 0.9):
        for steps in (1, 4, 8, 16):
            w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
            for _ in range(steps):
                opt.zero_grad()
                w.sum().backward()
                opt.step()
            assert scaffold.effective_steps(steps, momentum) == pytest.approx(-w.item() / 0.1, rel=1e-12)
    assert scaffold.effective_steps(8, 0.0) == 8  # exactly the paper's K: plain SGD runs are unchanged
