"""Every row of the report's table of deviations from the TaLoS reference is true of the code."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from smallrun import CPU, SMALL

from helpers.config.experiments import make_config
from helpers.data.datasets import augment_generator, load_data
from helpers.editing.calibration import masked_names
from helpers.federated.clients import client_optimizer
from helpers.reporting import report
from helpers.sparse.sensitivity import calibrate_masks
from helpers.sparse.sgdm import SparseSGDM
from helpers.training.loop import train_steps
from helpers.training.resumable import build_seeded_model


def results_of(**configs: dict) -> pd.DataFrame:
    """Tidy results rows of runs with these configs, as the report reads them (one row per experiment)."""
    return pd.DataFrame([{"experiment": experiment, **config} for experiment, config in configs.items()])


@pytest.fixture()
def model():
    return build_seeded_model(make_config("sparse_centralized", "smoke", **SMALL), CPU)


def test_clients_optimise_with_sgd_momentum_not_adamw(model):
    config = make_config("sparse_fedavg", "smoke", **SMALL)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for opt in (client_optimizer(model, 0.1, config), client_optimizer(model, 0.1, config, masks)):
        assert type(opt) in (torch.optim.SGD, SparseSGDM) and isinstance(opt, torch.optim.SGD)
        assert opt.param_groups[0]["momentum"] == config["momentum"] == 0.9
    assert f"momentum {config['momentum']:g}" in report.deviations_table(results_of(sparse_fedavg=config), "smoke")


def test_no_gradient_clipping(model):
    """One plain SGD step of the training loop moves every weight by exactly lr x its gradient, however large."""
    config = make_config("centralized", "smoke", **SMALL)
    data = load_data(config, CPU)
    idx = torch.arange(16)
    model.head.weight.data.mul_(1e3)  # huge logits: a gradient norm far above the reference's clip at 1.0
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = augment_generator(0, "test")
    train_steps(model, optimizer, data.train_x, data.train_y, idx[None], gen, img_size=32, augment="none")
    grads = [p.grad for p in model.parameters()]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) > 10
    # SGD rounds p - lr*g once (a fused multiply-add on some CPUs), the reference twice: allow a few ulps of p.
    # Clipping at 1.0 would shrink every step by more than 90%: far outside that tolerance for the largest steps.
    assert max(float((0.01 * g).abs().max()) for g in grads) > 1e-2
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.01 * g, rtol=1e-6, atol=1e-6)


def test_masked_entries_default_and_the_reference_choice(model):
    everything = [n for n, _ in model.named_parameters() if not n.startswith("head.")]
    default = make_config("sparse_centralized", "smoke", **SMALL)
    assert default["embeddings"] == "masked" and masked_names(model, default) == everything
    reference = masked_names(model, {**default, "embeddings": "dense"})
    assert set(everything) - set(reference) == {"cls_token", "pos_embed"}


def test_sample_counts_in_the_table_are_the_config_defaults(monkeypatch):
    monkeypatch.delenv("FLME_PROFILE", raising=False)  # it would override the profile asked for
    runs = {e: make_config(e, "full") for e in ("sparse_centralized", "sparse_fedavg")}
    text = report.deviations_table(results_of(**runs), "full")  # the values the runs used (their results' columns)
    assert make_config("sparse_centralized", "full")["calibration_samples"] == 5000 and "5,000 train-split" in text
    assert make_config("sparse_fedavg", "full")["calibration_samples"] == 50 and "50 per client" in text


def test_exact_density_with_ties_broken_by_index(model):
    """All scores equal: the reference would keep every entry (all tie with the threshold); ours keeps exactly
    the density, the lowest flat indices first."""
    masks = calibrate_masks(model, lambda m: {n: torch.zeros_like(p) for n, p in m.named_parameters()},
                            sparsity=0.9, rounds=1)  # fmt: skip
    flat = torch.cat([m.flatten() for m in masks.values()])
    keep = round(0.1 * flat.numel())
    assert int(flat.sum()) == keep and bool(flat[:keep].all()) and not bool(flat[keep:].any())
