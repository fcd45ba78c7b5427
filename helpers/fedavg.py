"""FedAvg (McMahan et al. 2017): clients simulated one after another on one model, J local steps each.

The same engine runs sparse federated fine-tuning: pass `masks` (one global name -> 0/1 mask dict, or a
function client -> masks for per-client masks) and clients use SparseSGDM; upload bytes count the mask.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from helpers.centralized import build_seeded_model
from helpers.config import make_config
from helpers.data import NUM_CLASSES, Data, augment_generator, load_data, pick_device, step_batches
from helpers.features import head_view
from helpers.models import set_trainable
from helpers.runs import (
    CheckpointClock,
    Run,
    load_checkpoint,
    mark_done,
    open_run,
    save_checkpoint,
    write_metrics,
)
from helpers.seeding import torch_generator
from helpers.sharding import make_shards
from helpers.sparse_sgdm import SparseSGDM, masks_by_parameter
from helpers.train import NonFiniteLossError, evaluate, lr_at, make_scaler, train_steps

# One global mask for every client, a function client -> mask (per-client masks), or None (dense).
Masks = Mapping[str, Tensor] | Callable[[int], Mapping[str, Tensor] | None] | None
BYTES_PER_ENTRY = 4  # fp32 upload


# ----------------------------------------------------------------------------- config-only checks


def train_class_counts(config: dict) -> np.ndarray:
    """Per-class sizes of the train split from the config alone (mirrors data.stratified_split)."""
    if config["dataset"] == "cifar100":
        counts = [500] * NUM_CLASSES
    else:  # make_synthetic labels sample i with class i % 100
        n = config["synthetic_train_size"]
        counts = [len(range(c, n, NUM_CLASSES)) for c in range(NUM_CLASSES)]
    return np.array([c - int(round(config["val_fraction"] * c)) for c in counts])


def train_split_size(config: dict) -> int:
    """Number of samples in the train split (45,000 for CIFAR-100 with 10% val)."""
    return int(train_class_counts(config).sum())


def check_federated(config: dict) -> None:
    """Rules that need the train split's size; raises ValueError before any data or weights are loaded."""
    counts, k = train_class_counts(config), config["num_clients"]
    if k > counts.sum():
        raise ValueError(
            f"num_clients={k} is invalid: must be <= {counts.sum()} (the train split size); "
            "every client needs at least one sample"
        )
    if config["sharding"] == "noniid":
        nc = config["classes_per_client"]
        slots = int(np.minimum(k, counts).sum())  # a class of n samples can have at most n holders
        if slots < k * nc:
            raise ValueError(
                f"classes_per_client={nc} with num_clients={k} is invalid: needs {k * nc} (client, class) "
                f"pairs but the train split can fill only {slots}; lower num_clients or classes_per_client"
            )


def rounds_for_budget(step_budget: int, local_steps: int) -> int:
    """Rounds that keep J x rounds at `step_budget` local steps per client (rounded up)."""
    if step_budget < 1 or local_steps < 1:
        raise ValueError(f"step_budget={step_budget} and local_steps={local_steps} must both be >= 1")
    return math.ceil(step_budget / local_steps)


# ----------------------------------------------------------------------------- pieces of a round


def client_shards(config: dict, data: Data) -> list[Tensor]:
    """The run's fixed client shards (index tensors into the train split), drawn from `seed`."""
    shards = make_shards(
        data.train_y.cpu().numpy(), sharding=config["sharding"], num_clients=config["num_clients"],
        seed=config["seed"], classes_per_client=config["classes_per_client"], alpha=config["dirichlet_alpha"],
    )  # fmt: skip
    return [torch.from_numpy(s) for s in shards]


def clients_per_round(num_clients: int, participation: float) -> int:
    """m = max(1, round(C*K)), rounding half up (C=0.025, K=100 gives 3, not Python's 2)."""
    return max(1, math.floor(participation * num_clients + 0.5))


def sample_clients(seed: int, rnd: int, num_clients: int, participation: float) -> list[int]:
    """m = clients_per_round(K, C) distinct client ids for round `rnd` (0-based), sorted."""
    m = clients_per_round(num_clients, participation)
    order = torch.randperm(num_clients, generator=torch_generator(seed, "clients", rnd))
    return sorted(order[:m].tolist())


def client_lr(config: dict, rnd: int) -> float:
    """Client learning rate in round `rnd` (0-based): constant, or cosine over the rounds."""
    if config["client_lr_schedule"] == "constant":
        return config["lr"]
    return lr_at(rnd, base_lr=config["lr"], total_steps=config["rounds"], scheduler="cosine")


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
) -> float:
    """One client's J steps of the one training loop; batches and augmentation from (seed, round, client)."""
    gen = augment_generator(config["seed"], "client", rnd, client)
    batches = step_batches(shard, config["batch_size"], config["local_steps"], gen)
    opts = dict(img_size=config["img_size"], augment=config["augment"], scaler=scaler)
    return train_steps(model, optimizer, data.train_x, data.train_y, batches, gen, **opts)


def upload_bytes(model: nn.Module, masks: Mapping[str, Tensor] | None) -> int:
    """Bytes one client uploads: 4 x trainable entries, counting only mask entries == 1 where masked."""
    masks = masks or {}
    entries = sum(
        int(masks[n].count_nonzero()) if n in masks else p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    return BYTES_PER_ENTRY * entries


def fedavg_round(
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    rnd: int,
    config: dict,
    *,
    masks: Masks = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """One round (0-based `rnd`) on the global weights held by `model`, updated in place; returns its row.

    Clients start from the global weights, the server does w <- w + server_lr * sum_k n_k/n (w_k - w).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    start = _clone(params)  # the global weights w
    avg = [torch.zeros_like(p) for p in params]  # sum_k n_k/n w_k
    unit_sum = [torch.zeros_like(p) for p in params]  # sum_k delta_k / |delta_k|, for the pairwise cosine
    clients = sample_clients(config["seed"], rnd, len(shards), config["participation"])
    total = sum(len(shards[k]) for k in clients)
    lr = client_lr(config, rnd)
    losses, norms, uploaded = [], [], 0
    shared = None if masks is None or callable(masks) else upload_bytes(model, masks)
    trained = None if callable(masks) else masks  # entries some client trains; the rest must stay bit-exact
    for i, k in enumerate(clients):
        _copy(params, start)
        own = masks(k) if callable(masks) else masks
        if callable(masks):  # mask_scope=local: the union of this round's client masks, one client at a time
            trained = own if i == 0 else _union(trained, own)
        optimizer = client_optimizer(model, lr, config, own)
        try:
            losses.append(local_train(model, optimizer, data, shards[k], rnd, k, config, scaler))
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"round {rnd + 1}, client {k}: {exc}") from None
        norms.append(_accumulate(params, start, avg, unit_sum, len(shards[k]) / total))
        uploaded += shared if shared is not None else upload_bytes(model, own)
    if trained is not None:
        _keep_frozen(model, start, avg, trained)
    _server_step(params, start, avg, config["server_lr"])
    # Mean pairwise cosine from the sum S of unit updates: |S|^2 = m + sum_{i != j} cos_ij.
    m, s2 = len(clients), _global_norm(unit_sum).item() ** 2
    return {
        "round": rnd + 1,
        "clients": " ".join(map(str, clients)),
        "client_lr": lr,
        "train_loss": statistics.fmean(losses),
        "drift_norm": torch.stack(norms).mean().item(),
        "drift_cos": (s2 - m) / (m * (m - 1)) if m > 1 else math.nan,
        "upload_bytes": uploaded,
    }


@torch.no_grad()
def _clone(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _copy(params: list[Tensor], source: list[Tensor]) -> None:
    torch._foreach_copy_(params, source)  # in place: the one model object, no deepcopy per client


def _global_norm(tensors: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


@torch.no_grad()
def _accumulate(
    params: list[Tensor], start: list[Tensor], avg: list[Tensor], unit_sum: list[Tensor], weight: float
) -> Tensor:
    """Add the client's weights to the average and its unit update to unit_sum; returns |delta| (no sync).

    Reuses the model's own tensors as scratch (they are reloaded for the next client): memory does not grow.
    """
    torch._foreach_add_(avg, params, alpha=weight)
    torch._foreach_sub_(params, start)  # params now hold delta_k = w_k - w
    norm = _global_norm(params)
    torch._foreach_div_(params, norm.clamp_min(1e-30))  # a zero update adds nothing to unit_sum
    torch._foreach_add_(unit_sum, params)
    return norm


def _union(trained: Mapping[str, Tensor] | None, own: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """Entries trained by either; a client without masks, or a parameter missing from its masks, trains in full."""
    if trained is None or own is None:
        return None
    return {n: trained[n].bool() | own[n].bool() for n in trained.keys() & own.keys()}


@torch.no_grad()
def _keep_frozen(model: nn.Module, start: list[Tensor], avg: list[Tensor], masks: Mapping[str, Tensor]) -> None:
    """avg <- w where no client trains (mask 0): the weighted mean of identical values can round off by an ulp,
    which would move frozen entries; this keeps them bit-exact (lerp(w, w, lr) == w)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, w, a in zip(names, start, avg, strict=True):
        if name in masks:
            a.copy_(torch.where(masks[name].to(a.device).bool(), a, w))


@torch.no_grad()
def _server_step(params: list[Tensor], start: list[Tensor], avg: list[Tensor], server_lr: float) -> None:
    # w + lr (avg - w) as lerp: exact at lr=1 (w_new == avg), so one full-data client equals plain training.
    torch._foreach_lerp_(start, avg, server_lr)
    _copy(params, start)


# ----------------------------------------------------------------------------- resumable runs


def run_fedavg(
    config: dict | None = None, *, run_root: str | Path | None = None, progress: bool = True, **overrides
) -> Run:
    """Train (or resume, or skip if done) one FedAvg run; returns its Run (metrics, summary)."""
    config = config if config is not None else make_config("fedavg", **overrides)
    check_federated(config)
    run = open_run("fedavg", config, run_root)
    if run.done:
        return run
    device = pick_device(config["device"])
    data = load_data(config, device)
    model = build_seeded_model(config, device)
    set_trainable(model, config["train_mode"])
    return federated_training(run, model, data, client_shards(config, data), progress=progress)


def federated_training(
    run: Run,
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    *,
    masks: Masks = None,
    progress: bool = True,
) -> Run:
    """The resumable round loop: checkpoints, metrics rows, done marker. Trains the params that require grad.

    `masks` turns it into sparse federated fine-tuning (see fedavg_round); its callers store the masks.
    Head-only runs train model.head on cached backbone features (helpers.features); checkpoints hold the model.
    """
    config, device = run.config, data.train_x.device
    net, inputs = head_view(model, data, config, run.root)
    if config["compile"]:
        net.compile()  # in place: parameter names, checkpoints and the optimizer are unchanged
    rounds, every = config["rounds"], config["eval_every"]
    scaler = make_scaler(device)  # one for the run: a fresh scale per client would skip its first steps
    rows, start, elapsed = [], 0, 0.0
    state = load_checkpoint(run, map_location=device)
    if state is not None:
        model.load_state_dict(state["model"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rows, start, elapsed = state["metrics"], state["round"], state["elapsed"]
    write_metrics(run, rows)  # drops rows written after the checkpoint we resume from
    clock = CheckpointClock(config["checkpoint_every"], config["checkpoint_minutes"])
    bar = tqdm(range(start, rounds), desc=f"{run.experiment} {run.id}", disable=not progress, leave=False)
    for rnd in bar:
        t0 = time.perf_counter()
        try:
            row = fedavg_round(net, inputs, shards, rnd, config, masks=masks, scaler=scaler)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"run {run.id}, {exc}") from None
        last = rnd + 1 == rounds
        evals = {
            "val": (rnd + 1) % every == 0 or last,
            "test": last or (config["eval_test"] and (rnd + 1) % every == 0),
        }
        for split, due in evals.items():
            m = _evaluate(net, inputs, split, config) if due else {"loss": math.nan, "acc": math.nan}
            row.update({f"{split}_loss": m["loss"], f"{split}_acc": m["acc"]})
        elapsed += time.perf_counter() - t0
        row["elapsed_s"] = round(elapsed, 3)
        rows.append(row)
        bar.set_postfix({k: round(row[k], 4) for k in ("train_loss", "val_acc", "drift_cos")})
        if clock.due(rnd + 1, final=last):
            state = {"model": model.state_dict(), "round": rnd + 1, "metrics": rows, "elapsed": elapsed}
            save_checkpoint(run, {**state, "scaler": scaler.state_dict() if scaler else None})
        write_metrics(run, rows)
    mark_done(run, {**rows[-1], "run_id": run.id})
    return run


def _evaluate(model: nn.Module, data: Data, split: str, config: dict) -> dict[str, float]:
    x, y = (data.val_x, data.val_y) if split == "val" else (data.test_x, data.test_y)
    return evaluate(model, x, y, img_size=config["img_size"], batch_size=config["eval_batch_size"])
