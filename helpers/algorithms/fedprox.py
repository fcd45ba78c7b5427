"""FedProx (Li et al. 2020): each client minimises f_k(w) + prox_mu/2 |w - w_global|^2 with the same local steps.

The proximal term's gradient prox_mu (w - w_global) is added to the loss gradient before the optimizer step, so
weight decay, momentum and a mask (SparseSGDM: frozen entries get no update) apply to it as to the loss gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from helpers.algorithms.fedavg import ClientSide, FedAvg
from helpers.core.params import Param


class ProximalTerm(ClientSide):
    """grad <- grad + mu (w - w_global); at mu = 0 the gradients are unchanged bit for bit."""

    def __init__(self, start: list[Tensor], mu: float) -> None:
        self.start, self.mu = start, mu

    @torch.no_grad()
    def correct(self, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, torch._foreach_sub(params, self.start), alpha=self.mu)


class FedProx(FedAvg):
    """FedAvg's server with proximal clients."""

    name = "fedprox"
    params = {
        **FedAvg.params,
        "prox_mu": Param(
            float,
            "FedProx's proximal weight mu",
            low=0,
            default=1.0,
            source="Li et al. 2020 (MLSys), Sec. 5.3: the best mu on its image tasks (MNIST, FEMNIST), "
            "as the authors' code (litian96/FedProx) plots them",
        ),
    }
    tuning = ("prox_mu", (0.01, 0.1, 1.0))  # from about FedAvg (0.01) to the paper's best on its image tasks (1)

    def __init__(self, config: Mapping) -> None:
        super().__init__(config)
        self.mu = config["prox_mu"]

    def client_side(
        self, rnd: int, client: int, start: list[Tensor], masks: Sequence[Tensor | None], lr: float, steps: int
    ) -> ClientSide:
        return ProximalTerm(start, self.mu)
