"""Interference, measured where it happens (`interference_probe`: probe images per client, 0 = off; not in the run id).

After each round, for each client that trained in it: the share of its probe images on which its own trained model
w_k and the new global model disagree (argmax predictions): the weight-disentanglement error of Ortiz-Jimenez et al.
(NeurIPS 2023) with the client's update as the task vector, measured with the prediction-disagreement distance. The
round's row gets the mean over its clients (`interference`). The probe is the same seeded sample of the client's own
training split every round, under the evaluation preprocessing. It costs two forwards of the probe per client and
round: w_k's, right after its training, and the new global model's. On Flower both run on the client's node
(helpers.flower.node keeps w_k's predictions until the next message; NodeEngine is a RemoteInterference).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from helpers.config.experiments import setting
from helpers.core.seeding import torch_generator
from helpers.data.datasets import Data
from helpers.training.loop import predictions

PROBE_IMAGES = 64  # the study's probe per client (the benchmark measures its cost)


@runtime_checkable
class RemoteInterference(Protocol):
    """Interference asked of the clients where their data is (a Flower federation)."""

    def client_interference(self, model: nn.Module, config: dict, clients: list[int], sizes: list[int]) -> list[float]:
        """Each client's share of its probe (`sizes`: its images) on which its trained model (kept on its side) and
        `model` disagree."""
        ...


def remote_interference(train_clients: object) -> RemoteInterference | None:
    """The engine's remote interference, or None when the clients' data is here."""
    return train_clients if isinstance(train_clients, RemoteInterference) else None


def probe_size(config: dict, shard_size: int) -> int:
    """How many images a client's probe holds: `interference_probe`, or its whole shard if smaller."""
    return min(setting(config, "interference_probe"), shard_size)


def probe_positions(config: dict, shard_size: int, client: int) -> Tensor:
    """The client's probe: `interference` positions in its shard (all of it if smaller), seeded, fixed over rounds."""
    order = torch.randperm(shard_size, generator=torch_generator(config["seed"], "probe", client))
    return order[: probe_size(config, shard_size)]


def probe_predictions(model: nn.Module, data: Data, shard: Tensor, client: int, config: dict) -> Tensor:
    """`model`'s predicted classes on client `client`'s probe (rows of data.train_x: images, or cached features)."""
    rows = shard[probe_positions(config, len(shard), client)].to(data.train_x.device)
    opts = dict(img_size=config["img_size"], batch_size=config["eval_batch_size"], amp=setting(config, "amp"))
    return predictions(model, data.train_x[rows], **opts)


def disagreement(own: Tensor, other: Tensor) -> float:
    """The share of positions where two prediction vectors differ (0 for an empty probe)."""
    return int((own != other.to(own.device)).sum()) / len(own) if len(own) else 0.0


def round_interference(
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    clients: list[int],
    kept: Mapping[int, Tensor],
    config: dict,
    remote: RemoteInterference | None = None,
) -> float:
    """The mean over the round's `clients` of their disagreement with `model` (the new global weights): from the
    predictions of their trained models kept here (`kept`: client -> probe predictions), or asked of `remote`."""
    if not clients:
        return float("nan")
    if remote is not None:
        sizes = [probe_size(config, len(shards[k])) for k in clients]
        return statistics.fmean(remote.client_interference(model, config, clients, sizes))
    new = {k: probe_predictions(model, data, shards[k], k, config) for k in clients}
    return statistics.fmean(disagreement(kept[k], new[k]) for k in clients)
