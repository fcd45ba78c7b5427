"""Step 0 of model editing (§9): fit the head on the frozen backbone, then it stays frozen.

Centralized: SGD on cached train-split features, or closed-form ridge. Federated, never on pooled client data:
ridge from the sum of the clients' sufficient statistics, or FedAvg on the head (train_mode="head").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.config.experiments import (
    experiment_parameters,
    make_config,
    remedy_parameters,
    setting,
    train_split_size,
)
from helpers.core.precision import make_scaler
from helpers.core.seeding import torch_generator
from helpers.data.datasets import NUM_CLASSES, Data, step_batches
from helpers.federated.clients import BYTES_PER_ENTRY, clients_per_round
from helpers.federated.remote import remote_clients
from helpers.federated.rounds import TrainClients, run_fedavg
from helpers.training.features import split_features
from helpers.training.loop import NonFiniteLossError, lr_at, train_steps
from helpers.training.runs import load_checkpoint

HEAD_POLL_S = 20.0  # how often a sparse run looks again at a step-0 head run that another session trains


def ridge_statistics(x: Tensor, y: Tensor, num_classes: int = NUM_CLASSES) -> tuple[Tensor, Tensor]:
    """One client's sufficient statistics (X^T X, X^T Y), X with a bias column, Y one-hot; float64."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
    return x.T @ x, x.T @ F.one_hot(y, num_classes).double()


def solve_ridge(xtx: Tensor, xty: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """W = (X^T X + lam I)^-1 X^T Y with the bias unpenalised; returns the head's weight (C, D) and bias (C,)."""
    penalty = torch.full((len(xtx),), float(lam), dtype=xtx.dtype, device=xtx.device)
    penalty[-1] = 0.0
    solution = torch.linalg.solve(xtx + torch.diag(penalty), xty)  # (D + 1, C)
    return solution[:-1].T.float(), solution[-1].float()


@torch.no_grad()
def set_head(model: nn.Module, weight: Tensor, bias: Tensor) -> None:
    """Write a fitted linear classifier into model.head."""
    model.head.weight.copy_(weight)
    model.head.bias.copy_(bias)


def train_head(head: nn.Linear, features: Tensor, labels: Tensor, config: dict) -> float:
    """SGD with momentum on cached features (the one training loop): step0_epochs epochs, cosine from step0_lr."""
    n, batch, epochs = len(labels), config["batch_size"], config["step0_epochs"]
    steps = math.ceil(n / batch)
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(
        params, lr=config["step0_lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    amp = setting(config, "amp")
    scaler, loss = make_scaler(features.device, amp), math.nan
    for epoch in range(epochs):
        gen = torch_generator(config["seed"], "step0", epoch)
        batches = step_batches(torch.arange(n), batch, steps, gen)
        lrs = [lr_at(epoch * steps + i, base_lr=config["step0_lr"], total_steps=epochs * steps,
                     scheduler="cosine") for i in range(steps)]  # fmt: skip
        try:
            loss = train_steps(head, optimizer, features, labels, batches, gen, img_size=config["img_size"],
                               lrs=lrs, scaler=scaler, amp=amp)  # fmt: skip
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"step 0 (step0_lr={config['step0_lr']}): {exc}") from None
    return loss


def fit_head(
    model: nn.Module, data: Data, config: dict, *, method: str | None = None, run_root: str | Path | None = None
) -> dict:
    """Step 0, centralized: fit model.head on the frozen backbone's train-split features ("sgd" or "ridge")."""
    method = method or config["step0"]
    if method not in ("sgd", "ridge"):
        raise ValueError(f"step0={method!r} is invalid: must be one of sgd, ridge")
    t0 = time.perf_counter()
    features = split_features(model, data, "train", config, run_root)
    if method == "ridge":
        set_head(model, *solve_ridge(*ridge_statistics(features, data.train_y), config["ridge_lambda"]))
    else:
        train_head(model.head, features, data.train_y, config)
    return {"step0_s": round(time.perf_counter() - t0, 3)}


def head_fedavg_config(config: dict) -> dict:
    """The dense FedAvg run (train_mode="head") that is step 0 of a sparse FedAvg run with step0="sgd".

    Same data, shards, seed and client settings, lr = step0_lr, and as many rounds as make step0_epochs
    passes over the train split; every sparse run on the same shards shares (and reuses) it.
    """
    m = clients_per_round(config["num_clients"], config["participation"])
    per_round = m * config["local_steps"] * config["batch_size"]
    rounds = max(1, math.ceil(config["step0_epochs"] * train_split_size(config) / per_round))
    # Plain FedAvg whatever the remedy: every algorithm's sparse runs on these shards share one step 0.
    remedies = set(remedy_parameters()) - {"server_lr"}  # FedAvg's own step stays, unless a remedy set it (below)
    shared = {k: config[k] for k in experiment_parameters("fedavg") if k in config and k not in remedies}
    # augment=None: the head trains on cached (un-augmented) features, whatever the sparse run augments.
    # engine="sequential": both engines share one step-0 run (helpers.flower.app runs step 0 on the server).
    overrides = {"train_mode": "head", "lr": config["step0_lr"], "rounds": rounds, "eval_every": rounds,
                 "augment": None, "engine": "sequential"}  # fmt: skip
    if "algorithm" in config:  # a remedy's server_lr means its own step (FedAdam's): step 0 keeps FedAvg's default
        overrides["server_lr"] = None
    overrides["warmup_rounds"] = None  # the warmup is the fine-tuning's (TaLoS), not the head's
    # FedAvg's mean and no diagnostic: runs of either merge rule share one step 0 (the same control)
    overrides.update(merge=None, merge_density=None, interference_probe=None)
    return make_config("fedavg", **{**shared, **overrides})


def fit_head_federated(
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    config: dict,
    *,
    run_root: str | Path | None = None,
    progress: bool = True,
    keep_alive: Callable[[], None] | None = None,
    train_clients: TrainClients | None = None,
) -> dict:
    """Step 0 without pooling client data: ridge from the sum of client statistics, or FedAvg on the head.

    `train_clients`: the engine (a RemoteClients computes the statistics and trains the head on the clients).
    The head's FedAvg run is shared: while another session trains it, wait (calling `keep_alive`: the sparse
    run's lease check and heartbeat), then use it; a stale holder's run is taken over here."""
    t0 = time.perf_counter()
    remote = remote_clients(train_clients)
    if config["step0"] == "ridge":
        if remote is not None:
            stats = remote.ridge_statistics(model, config)
        else:  # row i of the features depends on image i only: this equals every client featurising its own shard
            features = split_features(model, data, "train", config, run_root)
            stats = (ridge_statistics(features[s.to(features.device)], data.train_y[s.to(features.device)])
                     for s in shards)  # fmt: skip
        xtx = xty = None
        for a, b in stats:  # each client uploads (X_k^T X_k, X_k^T Y_k); the server sums them and solves
            xtx, xty = (a, b) if xtx is None else (xtx + a, xty + b)
        set_head(model, *solve_ridge(xtx, xty, config["ridge_lambda"]))
        uploaded = len(shards) * BYTES_PER_ENTRY * (xtx.numel() + xty.numel())
        return {"step0_s": round(time.perf_counter() - t0, 3), "step0_upload_bytes": uploaded}
    # on Flower the head trains on the nodes (each featurises its own shard); the run is the sequential engine's
    head = dict(run_root=run_root, progress=progress, train_clients=train_clients if remote else None)
    head_run = run_fedavg(head_fedavg_config(config), **head)
    while not head_run.done:
        print(f"step 0: waiting {HEAD_POLL_S:g} s for the head's FedAvg run {head_run.id}", flush=True)
        time.sleep(HEAD_POLL_S)
        if keep_alive is not None:
            keep_alive()
        head_run = run_fedavg(head_fedavg_config(config), **head)
    state = load_checkpoint(head_run, map_location=next(model.parameters()).device)
    if state is None:
        raise RuntimeError(f"step 0: the head's FedAvg run {head_run.dir} has no checkpoint; delete that folder")
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in state["model"].items() if k.startswith("head.")})
    return {
        "step0_s": head_run.summary()["elapsed_s"],
        "step0_upload_bytes": int(head_run.metrics()["upload_bytes"].sum()),
        "step0_run": head_run.id,
    }
