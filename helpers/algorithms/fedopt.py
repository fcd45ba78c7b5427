"""Adaptive server optimizers (Reddi et al., ICLR 2021, Algorithm 2): FedAdam, FedYogi, FedAdagrad.

With Delta = avg - w: m <- b1 m + (1 - b1) Delta; v <- (per optimizer); w <- w + server_lr m / (sqrt(v) + tau).
Choices the paper leaves open, as taken here: m starts at 0 and v at tau^2 (the paper asks v_{-1} >= tau^2),
no bias correction (Algorithm 2 has none; Flower's FedAdam adds one), FedAdagrad keeps the b1 momentum as in
Algorithm 2. Entries whose Delta is always 0 (frozen by a mask) keep m = 0, so they never move.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from helpers.algorithms.fedavg import FedAvg, pseudo_gradient


class FedAdam(FedAvg):
    """FedAdam: v <- b2 v + (1 - b2) Delta^2."""

    name = "fedadam"
    params = ("server_beta1", "server_beta2", "server_tau")
    stateful = True
    memory_copies = 2  # the first and second moments

    def __init__(self, config: Mapping) -> None:
        super().__init__(config)
        self.beta1, self.tau = config["server_beta1"], config["server_tau"]
        self.beta2 = config.get("server_beta2")  # FedAdagrad has none
        self.m: list[Tensor] | None = None
        self.v: list[Tensor] | None = None

    def second_moment(self, v: list[Tensor], delta2: list[Tensor]) -> None:
        """Update v in place from Delta^2."""
        torch._foreach_lerp_(v, delta2, 1 - self.beta2)

    @torch.no_grad()
    def server_step(self, start: list[Tensor], avg: list[Tensor]) -> None:
        delta = pseudo_gradient(start, avg)
        if self.m is None:
            self.m = [torch.zeros_like(d) for d in delta]
            self.v = [torch.full_like(d, self.tau**2) for d in delta]
        torch._foreach_mul_(self.m, self.beta1)
        torch._foreach_add_(self.m, delta, alpha=1 - self.beta1)
        self.second_moment(self.v, torch._foreach_mul(delta, delta))
        denom = torch._foreach_add(torch._foreach_sqrt(self.v), self.tau)
        torch._foreach_addcdiv_(start, self.m, denom, value=self.server_lr)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v = state["m"], state["v"]


class FedYogi(FedAdam):
    """FedYogi: v <- v - (1 - b2) Delta^2 sign(v - Delta^2)."""

    name = "fedyogi"

    def second_moment(self, v: list[Tensor], delta2: list[Tensor]) -> None:
        sign = torch._foreach_sign(torch._foreach_sub(v, delta2))
        torch._foreach_addcmul_(v, delta2, sign, value=-(1 - self.beta2))


class FedAdagrad(FedAdam):
    """FedAdagrad: v <- v + Delta^2."""

    name = "fedadagrad"
    params = ("server_beta1", "server_tau")

    def second_moment(self, v: list[Tensor], delta2: list[Tensor]) -> None:
        torch._foreach_add_(v, delta2)
