"""Adaptive server optimizers (Reddi et al., ICLR 2021, Algorithm 2): FedAdam, FedYogi, FedAdagrad.

With Delta = avg - w: m <- b1 m + (1 - b1) Delta; v <- (per optimizer); w <- w + server_lr m / (sqrt(v) + tau).
Choices the paper leaves open, as taken here: m starts at 0 and v at tau^2 (the paper asks v_{-1} >= tau^2; the
authors' runs and Flower start at 0), no bias correction (Algorithm 2 has none; Keras Adam in the authors' runs and
Flower's FedAdam add one). Defaults: the paper's best CIFAR-100 values; FedAdagrad's beta1 is 0 as in the authors'
runs (Keras Adagrad has no momentum; Flower fixes it too). Entries whose Delta is always 0 (frozen by a mask) keep
m = 0, so they never move. At |Delta| << tau a step is about server_lr Delta / tau: 10x FedAvg's at the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from helpers.algorithms.fedavg import SERVER_LR, FedAvg, pseudo_gradient
from helpers.core.params import PROBABILITY, Param

_REDDI_BEST = (
    "Reddi et al. 2021 (ICLR), App. D: the best CIFAR-100 values, as the authors' code lists them "
    "(google-research/federated, optimization/docs/hyperparameters.md)"
)
CODE = "Reddi et al. 2021's runs: Keras's defaults (google-research/federated, optimization/docs/hyperparameters.md)"


def server_params(lr: float, tau: float, beta1: float, beta2: float | None) -> dict[str, Param]:
    """An adaptive server optimizer's parameters with their defaults (beta2 None: it has none)."""
    params = {
        "server_lr": replace(SERVER_LR, default=lr, source=_REDDI_BEST),
        "server_beta1": Param(
            float, "the server optimizer's first-moment decay", **PROBABILITY, default=beta1, source=CODE
        ),
        "server_beta2": Param(
            float, "the server optimizer's second-moment decay", **PROBABILITY, default=beta2, source=CODE
        ),
        "server_tau": Param(
            float,
            "the server optimizer's adaptivity floor tau (v starts at tau^2)",
            low=0,
            low_open=True,
            default=tau,
            source=_REDDI_BEST,
        ),
    }
    return {name: spec for name, spec in params.items() if spec.default is not None}


class FedAdam(FedAvg):
    """FedAdam: v <- b2 v + (1 - b2) Delta^2."""

    name = "fedadam"
    params = server_params(lr=1.0, tau=0.1, beta1=0.9, beta2=0.999)
    tuning = ("server_lr", (0.1, 0.3, 1.0))  # at |Delta| << tau a step is ~ server_lr Delta / tau: 1, 3, 10x FedAvg's
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
    params = server_params(lr=1.0, tau=0.1, beta1=0.9, beta2=0.999)

    def second_moment(self, v: list[Tensor], delta2: list[Tensor]) -> None:
        sign = torch._foreach_sign(torch._foreach_sub(v, delta2))
        torch._foreach_addcmul_(v, delta2, sign, value=-(1 - self.beta2))


class FedAdagrad(FedAdam):
    """FedAdagrad: v <- v + Delta^2."""

    name = "fedadagrad"
    params = server_params(lr=0.1, tau=0.01, beta1=0.0, beta2=None)
    tuning = ("server_lr", (0.01, 0.03, 0.1))  # at tau 0.01: 1, 3 and 10 times FedAvg's step while v is small

    def second_moment(self, v: list[Tensor], delta2: list[Tensor]) -> None:
        torch._foreach_add_(v, delta2)
