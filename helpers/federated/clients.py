"""A client's part of a federated round: its fixed shard, whether it is sampled, its learning rate, a fresh
optimizer (SparseSGDM under a mask) and its J local steps of the one training loop (`client_update`, which every
engine runs: this process for the sequential engine, a Flower node for Flower), and what it uploads."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from helpers.algorithms.fedavg import ClientSide
from helpers.config.experiments import setting
from helpers.core.seeding import torch_generator
from helpers.data.datasets import Data, augment_generator, step_batches
from helpers.data.sharding import config_shards
from helpers.federated.stragglers import local_steps
from helpers.sparse.sgdm import SparseSGDM, masks_by_parameter
from helpers.training.loop import NonFiniteLossError, lr_at, train_steps

BYTES_PER_ENTRY = 4  # fp32 upload


def client_shards(config: dict, data: Data) -> list[Tensor]:
    """The run's fixed client shards (index tensors into the train split), drawn from `seed`."""
    return [torch.from_numpy(s) for s in config_shards(config, data.train_y.cpu().numpy())]


def clients_per_round(num_clients: int, participation: float) -> int:
    """m = max(1, round(C*K)), rounding half up (C=0.025, K=100 gives 3, not Python's 2)."""
    return max(1, math.floor(participation * num_clients + 0.5))


def sample_clients(seed: int, rnd: int, num_clients: int, participation: float) -> list[int]:
    """m = clients_per_round(K, C) distinct client ids for round `rnd` (0-based), sorted."""
    m = clients_per_round(num_clients, participation)
    order = torch.randperm(num_clients, generator=torch_generator(seed, "clients", rnd))
    return sorted(order[:m].tolist())


def client_lr(config: dict, rnd: int) -> float:
    """Client learning rate in round `rnd` (0-based): constant, or cosine over the rounds; x (rnd+1)/warmup_rounds
    during the warmup rounds."""
    lr = config["lr"]
    if config["client_lr_schedule"] != "constant":
        lr = lr_at(rnd, base_lr=config["lr"], total_steps=config["rounds"], scheduler="cosine")
    warmup = setting(config, "warmup_rounds")
    return lr * (rnd + 1) / warmup if rnd < warmup else lr


def client_optimizer(
    model: nn.Module, lr: float, config: dict, masks: Mapping[str, Tensor] | None = None
) -> torch.optim.Optimizer:
    """A fresh SGDM over the trainable params; SparseSGDM when the client has masks."""
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = dict(lr=lr, momentum=config["momentum"], weight_decay=config["weight_decay"])
    if masks is None:
        return torch.optim.SGD(params, **hyper)
    # Masks of frozen parameters (e.g. the head) are dropped: those never move anyway.
    by_param = {p: m for p, m in masks_by_parameter(model, masks).items() if p.requires_grad}
    return SparseSGDM(params, **hyper, masks=by_param)


def local_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    shard: Tensor,
    rnd: int,
    client: int,
    config: dict,
    scaler: torch.amp.GradScaler | None = None,
    side: ClientSide | None = None,
) -> float:
    """One client's J steps of the one training loop (fewer for a straggler: the first ones), with the algorithm's
    gradient correction `side`; batches and augmentation from (seed, round, client)."""
    gen = augment_generator(config["seed"], "client", rnd, client)
    batches = step_batches(shard, config["batch_size"], config["local_steps"], gen)[: local_steps(config, rnd, client)]
    params = [p for p in model.parameters() if p.requires_grad]
    correct = (lambda: side.correct(params)) if side is not None else None
    opts = dict(img_size=config["img_size"], augment=config["augment"], scaler=scaler, amp=setting(config, "amp"))
    opts["correct"] = correct
    return train_steps(model, optimizer, data.train_x, data.train_y, batches, gen, **opts)


def client_update(
    model: nn.Module,
    data: Data,
    shard: Tensor,
    rnd: int,
    client: int,
    config: dict,
    *,
    masks: Mapping[str, Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    side: ClientSide | None = None,
) -> float:
    """A client's part of round `rnd`: a fresh SGDM (SparseSGDM under `masks`) and J local steps (corrected by the
    algorithm's client `side`), in place on `model`, which holds the global weights when called; returns the mean
    training loss.

    Every engine runs clients through this function (this module in one process, helpers.flower on nodes).
    """
    optimizer = client_optimizer(model, client_lr(config, rnd), config, masks)
    try:
        return local_train(model, optimizer, data, shard, rnd, client, config, scaler, side)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(f"round {rnd + 1}, client {client}: {exc}") from None


def upload_bytes(model: nn.Module, masks: Mapping[str, Tensor] | None) -> int:
    """Bytes one client uploads: 4 x trainable entries, counting only mask entries == 1 where masked."""
    masks = masks or {}
    entries = sum(
        int(masks[n].count_nonzero()) if n in masks else p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    return BYTES_PER_ENTRY * entries
