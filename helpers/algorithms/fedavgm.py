"""FedAvgM (Hsu et al. 2019): server momentum on the round's pseudo-gradient, as Flower's FedAvgM states it.

v <- server_momentum * v + (avg - w), w <- w + server_lr * v, with v = 0 before the first round. In steady state the
step is server_lr / (1 - server_momentum) times the round's update (the effective rate: 10 at the defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from helpers.algorithms.fedavg import SERVER_LR, FedAvg, pseudo_gradient
from helpers.core.params import PROBABILITY, Param

_REDDI = (
    "Reddi et al. 2021 (ICLR), App. D: FedAvgM's best CIFAR-100 setting, as the authors' code lists it "
    "(google-research/federated, optimization/docs/hyperparameters.md)"
)


class FedAvgM(FedAvg):
    """FedAvg with server momentum; server_momentum=0 runs FedAvg's own operations (bit for bit)."""

    name = "fedavgm"
    params = {
        "server_lr": replace(SERVER_LR, default=1.0, source=_REDDI),
        "server_momentum": Param(float, "FedAvgM's server momentum", **PROBABILITY, default=0.9, source=_REDDI),
    }
    tuning = ("server_lr", (0.1, 0.3, 1.0))  # effective rates server_lr / (1 - 0.9): 1, 3 and 10 times FedAvg's
    stateful = True
    memory_copies = 1  # the velocity

    def __init__(self, config: Mapping) -> None:
        super().__init__(config)
        self.beta = config["server_momentum"]
        self.velocity: list[Tensor] | None = None

    @torch.no_grad()
    def server_step(self, start: list[Tensor], avg: list[Tensor]) -> None:
        if self.beta == 0:  # v = avg - w: the update is FedAvg's, so take its exact floating-point path
            return super().server_step(start, avg)
        delta = pseudo_gradient(start, avg)
        if self.velocity is None:
            self.velocity = delta
        else:
            torch._foreach_mul_(self.velocity, self.beta)
            torch._foreach_add_(self.velocity, delta)
        torch._foreach_add_(start, self.velocity, alpha=self.server_lr)

    def state_dict(self) -> dict:
        return {"velocity": self.velocity}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = state["velocity"]
