"""What many tests share: the small synthetic smoke data (600 train / 100 test images) on the CPU, a FedAvg config on
it, and a freshly seeded model with the config's trainable parameters."""

from __future__ import annotations

import torch

from helpers.config.experiments import make_config
from helpers.core.models import set_trainable
from helpers.training.resumable import build_seeded_model

CPU = torch.device("cpu")
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu")


def small_config(**overrides) -> dict:
    """A smoke FedAvg config on the small data; `overrides` replace any value."""
    return make_config("fedavg", "smoke", **{**SMALL, **overrides})


def fresh_model(config: dict) -> torch.nn.Module:
    """The config's seeded initial model, with only its train_mode's parameters trainable."""
    model = build_seeded_model(config, CPU)
    set_trainable(model, config["train_mode"])
    return model
