"""SparseSGDM: bit-exact equivalence with torch.optim.SGD, frozen entries, mask validation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from helpers.sparse.sgdm import SparseSGDM, masks_by_parameter

# (momentum, dampening, nesterov): every combination torch.optim.SGD accepts.
MOMENTUM_CASES = [
    (m, d, n) for m, d, n in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True)) if not n or (m > 0 and d == 0)
]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """Deterministic data per step; gradients depend on the trajectory, so any drift compounds."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 7, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def random_masks(model: nn.Module, density: float = 0.5, seed: int = 3) -> dict[nn.Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=gen) < density for p in model.parameters()}


@pytest.mark.parametrize("momentum,dampening,nesterov", MOMENTUM_CASES)
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("foreach", [False, True])
def test_all_ones_masks_equal_sgd_bit_for_bit(momentum, dampening, nesterov, weight_decay, foreach):
    hp = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    ref_model, model = make_model(), make_model()
    ref = torch.optim.SGD(ref_model.parameters(), foreach=foreach, **hp)
    masks = {p: torch.ones_like(p) for p in model.parameters()}
    opt = SparseSGDM(model.parameters(), foreach=foreach, masks=masks, **hp)
    train(ref_model, ref, 20)
    train(model, opt, 20)
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref, p)
        if momentum:
            assert torch.equal(ref.state[p_ref]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_maximize_all_ones_equals_sgd():
    hp = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, maximize=True)
    ref_model, model = make_model(), make_model()
    ref = torch.optim.SGD(ref_model.parameters(), **hp)
    opt = SparseSGDM(model.parameters(), masks={p: torch.ones_like(p) for p in model.parameters()}, **hp)
    train(ref_model, ref, 10)
    train(model, opt, 10)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters(), strict=True))


@pytest.mark.parametrize("nesterov", [False, True])
def test_random_masks_freeze_entries_and_match_reference_elsewhere(nesterov):
    """50 steps on fixed random grads: frozen entries and their momentum stay put, the rest is plain SGD."""
    hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    model, ref_model = make_model(), make_model()
    init = [p.detach().clone() for p in model.parameters()]
    masks = random_masks(model)
    opt = SparseSGDM(model.parameters(), masks=masks, **hp)
    ref = torch.optim.SGD(ref_model.parameters(), **hp)
    gen = torch.Generator().manual_seed(7)
    for _ in range(50):
        for p, p_ref in zip(model.parameters(), ref_model.parameters(), strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, p_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, p_ref, p0 in zip(model.parameters(), ref_model.parameters(), init, strict=True):
        frozen = ~masks[p]
        assert frozen.any() and (~frozen).any()
        assert torch.equal(p[frozen], p0[frozen])  # not moved, not even by weight decay
        assert torch.equal(opt.state[p]["momentum_buffer"][frozen], torch.zeros(int(frozen.sum())))
        # Elementwise update: trainable entries follow dense SGD on the same gradients exactly.
        assert torch.equal(p[~frozen], p_ref[~frozen])
        assert not torch.equal(p[~frozen], p0[~frozen])


def test_unmasked_parameters_are_dense_and_closure_loss_returned():
    model = make_model()
    first = next(model.parameters())
    opt = SparseSGDM(model.parameters(), lr=0.1, momentum=0.9, masks={first: torch.zeros_like(first)})
    train(model, opt, 5)
    fresh = make_model()
    assert torch.equal(model[0].weight, fresh[0].weight)
    assert not torch.equal(model[0].bias, fresh[0].bias)
    assert not torch.equal(model[-1].weight, fresh[-1].weight)

    x = torch.randn(4, 7)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


def test_grad_scaler_step_matches_unscaled_step():
    """scaler.step(opt) unscales by a power of two (exact), so it must equal a plain step."""
    model, ref_model = make_model(), make_model()
    masks = random_masks(model)
    opt = SparseSGDM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, masks=masks)
    ref = SparseSGDM(
        ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
        masks=masks_by_parameter(ref_model, {n: masks[p] for n, p in model.named_parameters()}),
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 7), torch.randint(0, 5, (8,))
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        nn.functional.cross_entropy(ref_model(x), y).backward()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters(), strict=True))


def test_set_masks_zeroes_momentum_of_newly_frozen_entries():
    model = make_model()
    opt = SparseSGDM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train(model, opt, 3)
    masks = random_masks(model)
    opt.set_masks(masks)
    before = {p: p.detach().clone() for p in model.parameters()}
    for p, m in masks.items():
        assert torch.equal(opt.state[p]["momentum_buffer"][~m], torch.zeros(int((~m).sum())))
    train(model, opt, 3, seed=5)
    for p, m in masks.items():
        assert torch.equal(p[~m], before[p][~m])
    opt.set_masks(None)
    assert opt.frozen == {}


def test_masks_are_copied_as_frozen_entries():
    model = make_model()
    p = next(model.parameters())
    mask = torch.ones(p.shape, dtype=torch.bool)
    opt = SparseSGDM(model.parameters(), lr=0.1, masks={p: mask})
    mask.zero_()  # the optimizer holds its own copy
    assert opt.frozen[p].dtype == torch.bool and not bool(opt.frozen[p].any())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_non_finite_gradients_at_frozen_entries_change_nothing(bad, foreach, nesterov):
    """0 * inf is NaN: a multiplied mask would turn these frozen entries into NaN; a select leaves them alone."""
    hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, foreach=foreach)
    model = make_model()
    masks = random_masks(model)
    init = [p.detach().clone() for p in model.parameters()]
    opt = SparseSGDM(model.parameters(), masks=masks, **hp)
    gen = torch.Generator().manual_seed(11)
    for _ in range(50):
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen)
            g[~masks[p]] = bad  # every frozen entry gets a non-finite gradient, every step
            p.grad = g
        opt.step()
    for p, p0 in zip(model.parameters(), init, strict=True):
        frozen = ~masks[p]
        assert torch.equal(p[frozen], p0[frozen])
        assert torch.equal(opt.state[p]["momentum_buffer"][frozen], torch.zeros(int(frozen.sum())))
        assert bool(torch.isfinite(p).all()) and not torch.equal(p[~frozen], p0[~frozen])


def test_bad_masks_rejected():
    model, other = make_model(), make_model(1)
    p = next(model.parameters())
    with pytest.raises(ValueError, match="masks"):
        SparseSGDM(model.parameters(), lr=0.1, masks={next(other.parameters()): torch.ones_like(p)})
    with pytest.raises(ValueError, match="masks"):
        SparseSGDM(model.parameters(), lr=0.1, masks={p: torch.ones(3)})
    with pytest.raises(ValueError, match="masks"):
        SparseSGDM(model.parameters(), lr=0.1, masks={p: torch.full_like(p, 0.5)})
    opt = SparseSGDM(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="masks"):
        opt.set_masks({p: 2 * torch.ones_like(p)})


def test_masks_by_parameter_rejects_unknown_names_and_survives_copies():
    model = make_model()
    masks = masks_by_parameter(model, {"0.weight": torch.ones(16, 7)})
    assert next(iter(masks)) is model[0].weight
    with pytest.raises(ValueError, match="not parameters"):
        masks_by_parameter(model, {"0.weight": torch.ones(16, 7), "head.weight": torch.ones(1)})
    # A deep copy has new Parameter objects: masks keyed by the original ones are refused, not ignored.
    clone = copy.deepcopy(model)
    with pytest.raises(ValueError, match="masks"):
        SparseSGDM(clone.parameters(), lr=0.1, masks=masks)
