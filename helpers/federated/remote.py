"""The seam for the steps that touch the clients' training data when it is not in this process (a Flower server).

An engine's train_clients that is also a RemoteClients makes the federated runners ask the clients for shard sizes,
sensitivity scores and step-0 statistics instead of computing them on a local copy of the data: the same code
(calibration, step 0, the round loop) runs on either, only the transport differs (helpers.flower.server).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from helpers.data.datasets import Withheld


@runtime_checkable
class RemoteClients(Protocol):
    """The clients' side of every step that reads their training data, asked client by client, in client order."""

    def shard_sizes(self, config: dict) -> list[int]:
        """n_k of every client k: all the server needs of the shards."""
        ...

    def client_scores(
        self, model: nn.Module, config: dict, call: int, clients: list[int]
    ) -> Iterator[tuple[dict[str, Tensor], int]]:
        """Each client's (summed sensitivity scores, samples scored) on `model`, calibration round `call`."""
        ...

    def ridge_statistics(self, model: nn.Module, config: dict) -> Iterator[tuple[Tensor, Tensor]]:
        """Each client's (X^T X, X^T Y) of its own features (helpers.editing.step0.ridge_statistics)."""
        ...


def remote_clients(train_clients: object) -> RemoteClients | None:
    """The engine's remote client operations, or None when the training data is here (the sequential engine)."""
    return train_clients if isinstance(train_clients, RemoteClients) else None


def withheld_shards(sizes: list[int]) -> list[Withheld]:
    """The server's view of the clients' shards: their sizes n_k only."""
    return [Withheld(f"client {k}'s shard", n) for k, n in enumerate(sizes)]
