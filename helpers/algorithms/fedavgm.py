"""FedAvgM (Hsu et al. 2019): server momentum on the round's pseudo-gradient, as Flower's FedAvgM states it.

v <- server_momentum * v + (avg - w), w <- w + server_lr * v, with v = 0 before the first round.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from helpers.algorithms.fedavg import FedAvg, pseudo_gradient


class FedAvgM(FedAvg):
    """FedAvg with server momentum; server_momentum=0 runs FedAvg's own operations (bit for bit)."""

    name = "fedavgm"
    params = ("server_momentum",)
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
