"""The GPU memory estimate: saved activations counted exactly, linear in the batch, every phase labelled."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helpers.config.experiments import make_config
from helpers.core.models import build_model
from helpers.ops.memory import (
    CUDA_CONTEXT_BYTES,
    LABEL,
    GiB,
    estimate_phases,
    memory_table,
    saved_bytes,
    training_activations,
)


def test_saved_bytes_counts_what_backward_needs_once_and_not_the_weights():
    """Linear -> ReLU -> Linear on (b, 8): autograd keeps the input (first layer's weight gradient) and the ReLU
    output (its own backward and the second layer's weight gradient: one storage); the weights are not counted."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    got = saved_bytes(lambda: model(x).sum().backward(), model)
    assert got == 4 * 3 * 8 + 4 * 3 * 16


def test_training_activations_are_linear_in_the_batch():
    """Measured at batch 1 and 2 and extrapolated: equal to the bytes measured at batch 5 directly."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_smoke", num_classes=100, pretrained=False, img_size=32)
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 100, (5,))
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            direct = saved_bytes(lambda: F.cross_entropy(model(x), y), model)
        assert training_activations(model, 32, 5, dtype) == direct


def test_every_phase_is_reported_against_the_t4_with_its_label():
    phases = estimate_phases(make_config("fedavg", "smoke"))
    names = [p.name for p in phases]
    assert len(names) == 5 and any("sparse" in n for n in names) and any("scoring" in n for n in names)
    for p in phases:
        assert p.total == p.weights + p.state + p.activations + p.data + CUDA_CONTEXT_BYTES and p.activations > 0
    table = memory_table(phases)
    assert LABEL in table and table.count("vs a T4's 15 GiB: fits") == 5
    assert memory_table(phases, capacity=GiB // 4).count("DOES NOT FIT") == 5


def test_an_algorithms_server_state_is_counted():
    """SCAFFOLD keeps four more model-sized fp32 tensors than FedAvg (helpers.algorithms.scaffold), FedAdam two."""
    fedavg = estimate_phases(make_config("fedavg", "smoke"))[0]
    params = sum(p.numel() for p in build_model("vit_tiny_smoke", num_classes=100, pretrained=False, img_size=32)
                 .parameters())  # fmt: skip
    for algorithm, copies in (("scaffold", 4), ("fedadam", 2)):
        phase = estimate_phases(make_config("fedavg", "smoke", algorithm=algorithm))[0]
        assert algorithm in phase.name and phase.state - fedavg.state == copies * 4 * params
