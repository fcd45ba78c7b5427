"""The seam of a federated algorithm, with FedAvg as its base: each remedy against client drift overrides only what
differs (a client's gradient correction and what it sends beyond its weights, the server step, their state).

Engines call, per round: client_side (per client, around federated.rounds.client_update), receive (per client, in
client order), then server_step once; the resumable loop checkpoints state_dict when `stateful`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from helpers.core.params import Param

# The server's step size: every algorithm takes it, each with the default of its own paper.
SERVER_LR = Param(
    float,
    "the server's step size on the round's update (1: FedAvg's plain average)",
    low=0,
    low_open=True,
    default=1.0,
    source="McMahan et al. 2017, Algorithm 1: the server takes the average",
)


class ClientSide:
    """One client's part of an algorithm in one round; FedAvg's clients have none (plain SGDM steps)."""

    def correct(self, params: list[Tensor]) -> None:
        """Change the gradients `p.grad` after backward, before the optimizer step (they are unscaled)."""

    def finish(self, params: list[Tensor]) -> list[Tensor] | None:
        """After the local steps (`params` hold the client's weights): what it sends beyond them, tensors shaped
        like `params` and zero where its mask freezes (a Flower node sends their trainable entries), or None."""
        return None


class FedAvg:
    """McMahan et al. 2017: the server moves to the clients' size-weighted average, w <- w + server_lr (avg - w)."""

    name = "fedavg"
    # its own parameters, with their defaults and sources: in a config of this algorithm only (helpers.config)
    params: dict[str, Param] = {"server_lr": SERVER_LR}
    # the parameter the remedies comparison tunes on validation, and its grid (docs/remedies.md says why each)
    tuning: tuple[str, tuple] = ("server_lr", (0.5, 1.0, 2.0))  # the step around the clients' average
    upload_factor = 1  # model-sized tensors a client uploads per round (SCAFFOLD: weights and control variates)
    memory_copies = 0  # model-sized fp32 tensors it keeps in memory beside FedAvg's (helpers.ops.memory)
    stateful = False  # server state that the checkpoint must hold (exact resume)
    node_state = False  # per-client state kept between rounds, on a Flower node's disk (SCAFFOLD's c_i)

    def __init__(self, config: Mapping) -> None:
        self.server_lr = config["server_lr"]

    @classmethod
    def from_config(
        cls, config: Mapping, folder: Path | None = None, guard: Callable[[], None] | None = None
    ) -> FedAvg:
        """The algorithm of a run; `folder` (its run folder) is where a stateful one may keep per-client state,
        writing after `guard()` (the run's lease check)."""
        return cls(config)

    def client_side(
        self, rnd: int, client: int, start: list[Tensor], masks: Sequence[Tensor | None], lr: float, steps: int
    ) -> ClientSide | None:
        """Client `client`'s side in round `rnd` (0-based): `start` are the global weights (read only), `masks`
        its bool mask per trainable tensor (None: dense), `lr` and `steps` its local learning rate and step count."""
        return None

    def to_node(
        self, start: list[Tensor], masks: Sequence[Tensor | None]
    ) -> tuple[list[Tensor], dict[str, int]] | None:
        """What a client's side on a Flower node needs of the server's state this round beyond the weights: tensors
        packed at the client's trainable entries (`masks`: scaffold.pack_entries) and numbers; None: none."""
        return None

    def from_server(
        self, tensors: list[Tensor], numbers: Mapping[str, int], start: list[Tensor], masks: Sequence[Tensor | None],
        folder: Path,
    ) -> None:  # fmt: skip
        """On a Flower node, before client_side: take what to_node sent; per-client state lives under `folder`."""

    def receive(self, client: int, extra: object | None) -> None:
        """The server receives what client_side's finish returned (clients in order of their ids)."""

    @torch.no_grad()
    def server_step(self, start: list[Tensor], avg: list[Tensor]) -> None:
        """Move the global weights `start` in place from the round's average `avg` = sum_k n_k/n w_k."""
        # At server_lr=1, w_new == avg exactly, so one full-data client equals plain training.
        if self.server_lr == 1:
            torch._foreach_copy_(start, avg)
        else:
            torch._foreach_lerp_(start, avg, self.server_lr)

    def close(self) -> None:
        """The run is done: drop state kept only for resuming (SCAFFOLD's per-client files)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pseudo_gradient(start: list[Tensor], avg: list[Tensor]) -> list[Tensor]:
    """Delta = avg - w, the round's update that server optimizers treat as a (negative) gradient (Reddi et al.)."""
    return torch._foreach_sub(avg, start)


def aligned_masks(names: Sequence[str], masks: Mapping[str, Tensor] | None) -> list[Tensor | None]:
    """The client's masks in the order of the trainable tensors `names` (None where a tensor has no mask)."""
    masks = masks or {}
    return [masks[n].bool() if n in masks else None for n in names]
