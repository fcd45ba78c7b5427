"""The federated round (FedAvg's, McMahan et al. 2017, and every algorithm's): sample the clients, train them
through the engine seam (`train_clients`; the sequential engine trains them one after another on one model), sum
their weights on the fly and apply the algorithm's server step; the resumable round loop around it.

The same engine runs sparse federated fine-tuning: pass `masks` (sparse.masks.Masks: one for every client, or one
per client) and clients use SparseSGDM; upload bytes count the mask. A client's own part is federated.clients.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from helpers.algorithms.fedavg import FedAvg, aligned_masks
from helpers.algorithms.merging import MERGE_RULES, STREAMED
from helpers.algorithms.registry import make_algorithm
from helpers.config.experiments import make_config, setting
from helpers.core.models import set_trainable
from helpers.data.datasets import Data
from helpers.federated.clients import client_lr, client_shards, client_update, sample_clients, upload_bytes
from helpers.federated.evaluation import remote_evaluation, round_evaluation
from helpers.federated.interference import probe_predictions, remote_interference, round_interference
from helpers.federated.remote import remote_clients, withheld_shards
from helpers.federated.stragglers import local_steps
from helpers.sparse.masks import Masks
from helpers.training.loop import NonFiniteLossError
from helpers.training.resumable import begin_run, loop_inputs, resumable_loop
from helpers.training.runs import Run, check_holder

# ----------------------------------------------------------------------------- config-only checks


def rounds_for_budget(step_budget: int, local_steps: int) -> int:
    """Rounds that keep J x rounds at `step_budget` local steps per client (rounded up)."""
    if step_budget < 1 or local_steps < 1:
        raise ValueError(f"step_budget={step_budget} and local_steps={local_steps} must both be >= 1")
    return math.ceil(step_budget / local_steps)


# ----------------------------------------------------------------------------- the server's side of a round


def check_no_buffers(model: nn.Module) -> None:
    """FedAvg averages parameters only: a buffer (BatchNorm statistics) would carry one client's state to the next."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(
            f"FedAvg supports models without buffers; this model has {len(buffers)} (e.g. {', '.join(buffers[:3])}), "
            "such as BatchNorm running statistics, which the clients would not average: use a model with "
            "LayerNorm (the ViTs of helpers.core.models have no buffers)"
        )


class RoundSum:
    """The server's side of one round: clients are added one at a time (memory does not grow with m), then
    `apply` moves the global weights by the algorithm's server step from avg = sum_k n_k/n w_k (FedAvg:
    w <- w + server_lr (avg - w)) and returns the round's metrics.

    Another `merge` rule (helpers.algorithms.merging, e.g. ties) gives `avg` instead: it needs every client's
    update, so the round's trained weights are kept (m x trainable entries, fp32; only for such a rule).
    Both engines feed it the clients' trained weights in the order of their client ids, so their sums are
    the same floating-point operations.
    """

    def __init__(self, model: nn.Module, merge: str = STREAMED, density: float = 1.0):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.start = _clone([p for p in model.parameters() if p.requires_grad])  # the global weights w
        self.avg = [torch.zeros_like(w) for w in self.start]  # sum_k n_k/n w_k
        self.merge, self.density = merge, density
        self.kept: list[list[Tensor]] = []  # each client's w_k, for a merge rule that is not streamed
        self.shares: list[float] = []
        self.unit_sum = [torch.zeros_like(w) for w in self.start]  # sum_k delta_k / |delta_k|, for the cosine
        self.norms: list[Tensor] = []
        self.losses: list[float] = []
        self.uploaded = 0
        self.trained: Mapping[str, Tensor] | None = None  # entries some client trains (None: all of them)
        self.scaler_state: dict | None = None

    def add(
        self,
        weights: list[Tensor],
        share: float,
        *,
        loss: float,
        upload: int,
        masks: Mapping[str, Tensor] | None = None,
        scaler_state: dict | None = None,
    ) -> None:
        """Add one client: its trained weights w_k (used as scratch space: overwritten), n_k/n, its loss,
        upload bytes, masks and final GradScaler state."""
        first = not self.norms
        if self.merge != STREAMED:
            self.kept.append(_clone(weights))
            self.shares.append(share)
        self.norms.append(_accumulate(weights, self.start, self.avg, self.unit_sum, share))
        self.losses.append(loss)
        self.uploaded += upload
        # mask_scope=local: the union of the round's client masks (a global mask is the same object every time)
        self.trained = masks if first or masks is self.trained else _union(self.trained, masks)
        if scaler_state is not None:  # the most cautious client's scale goes on (the lowest, then least grown)
            key = lambda s: (s["scale"], s["_growth_tracker"])
            self.scaler_state = min(self.scaler_state or scaler_state, scaler_state, key=key)

    def apply(self, params: list[Tensor], server_step: Callable[[list[Tensor], list[Tensor]], None]) -> dict:
        """Write the new global weights into `params` (the model's trainable parameters); returns the metrics.

        `server_step(w, avg)` moves w in place (helpers.algorithms.fedavg.FedAvg.server_step); entries no client
        trained stay where they were, whatever state a server optimizer keeps."""
        if self.merge != STREAMED:
            self.avg = MERGE_RULES[self.merge](self.start, self.kept, self.shares, self.density)
            self.kept = []
        before = _clone(self.start) if self.trained is not None else None
        if self.trained is not None:
            _keep_frozen(self.names, self.start, self.avg, self.trained)
        server_step(self.start, self.avg)
        if before is not None:
            _keep_frozen(self.names, before, self.start, self.trained)
        _copy(params, self.start)
        norms = torch.stack(self.norms)
        # Mean pairwise cosine over the clients that moved, from the sum S of their unit updates:
        # |S|^2 = m + sum_{i != j} cos_ij. A zero update has no direction: it is left out, not counted as cos 0.
        m, s2 = int((norms > 0).sum()), _global_norm(self.unit_sum).item() ** 2
        return {
            "train_loss": statistics.fmean(self.losses),
            "drift_norm": norms.mean().item(),
            "drift_cos": (s2 - m) / (m * (m - 1)) if m > 1 else math.nan,
            "upload_bytes": self.uploaded,
        }


class ClientResult(NamedTuple):
    """One client's part of a round, as the server aggregates it."""

    client: int
    weights: list[Tensor]  # the trained trainable parameters (RoundSum.add overwrites them)
    loss: float
    masks: Mapping[str, Tensor] | None  # the client's masks (for upload bytes and frozen entries)
    scaler_state: dict | None  # its final GradScaler state
    extra: object | None = None  # what it sends beyond its weights (helpers.algorithms.fedavg.ClientSide.finish)
    share: float | None = None  # n_k / n over the clients that replied, when an engine drops some (node_failure)
    probe: Tensor | None = None  # its trained model's predictions on its probe (interference_probe; Flower: None)


# The engine seam, train_in_turn's signature:
# (model, data, shards, rnd, clients, config, *, masks, start, scaler, algorithm)
TrainClients = Callable[..., Iterator[ClientResult]]


def fedavg_round(
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    rnd: int,
    config: dict,
    *,
    masks: Masks | None = None,
    scaler: torch.amp.GradScaler | None = None,
    train_clients: TrainClients | None = None,
    algorithm: FedAvg | None = None,
) -> dict:
    """One round (0-based `rnd`) on the global weights held by `model`, updated in place; returns its row.

    `algorithm` (default: the config's, with in-memory state) says what differs from FedAvg (helpers.algorithms.fedavg).
    `train_clients` (default train_in_turn, same signature) is the one engine seam: it trains the round's
    clients and yields their results in client order; helpers.flower.app passes one that trains them on Flower nodes.
    """
    check_no_buffers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    server = RoundSum(model, setting(config, "merge"), config.get("merge_density", 1.0))
    clients = sample_clients(config["seed"], rnd, len(shards), config["participation"])
    total = sum(len(shards[k]) for k in clients)
    shared = upload_bytes(model, masks.shared) if masks is not None and not masks.local else None
    train_clients, algorithm = train_clients or train_in_turn, algorithm or make_algorithm(config)
    opts = dict(masks=masks, start=server.start, scaler=scaler, algorithm=algorithm)
    replied, probes = [], {}
    for r in train_clients(model, data, shards, rnd, clients, config, **opts):
        upload = algorithm.upload_factor * (shared if shared is not None else upload_bytes(model, r.masks))
        share = len(shards[r.client]) / total if r.share is None else r.share
        if r.probe is not None:
            probes[r.client] = r.probe
        server.add(r.weights, share, loss=r.loss, upload=upload, masks=r.masks, scaler_state=r.scaler_state)
        algorithm.receive(r.client, r.extra)
        replied.append(r.client)
    if scaler is not None:
        scaler.load_state_dict(server.scaler_state)
    row = {"round": rnd + 1, "clients": " ".join(map(str, clients)), "client_lr": client_lr(config, rnd)}
    if setting(config, "node_failure") == "drop":  # the column only where clients may be dropped
        row["dropped"] = " ".join(str(k) for k in clients if k not in replied)
    row.update(server.apply(params, algorithm.server_step))
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # checked before any checkpoint
        raise NonFiniteLossError(f"round {rnd + 1}: the server step gave non-finite global weights (its step size is "
                                 "usually too large); the round is not kept")  # fmt: skip
    if setting(config, "interference_probe"):  # the column only when the diagnostic is on
        remote = remote_interference(train_clients)
        row["interference"] = round_interference(model, data, shards, replied, probes, config, remote)
    return row


def train_in_turn(
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    rnd: int,
    clients: list[int],
    config: dict,
    *,
    masks: Masks | None,
    start: list[Tensor],
    scaler: torch.amp.GradScaler | None,
    algorithm: FedAvg,
) -> Iterator[ClientResult]:
    """The clients one after another on `model` itself (weights reloaded in place from `start`, no copies),
    each from the round's global weights and GradScaler state, so no client depends on the one before it."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    params, lr = list(params), client_lr(config, rnd)
    scaler_start = scaler.state_dict() if scaler is not None else None
    for k in clients:
        _copy(params, start)
        if scaler is not None:
            scaler.load_state_dict(scaler_start)
        own = masks.of_client(k) if masks is not None else None
        steps = local_steps(config, rnd, k)
        side = algorithm.client_side(rnd, k, start, aligned_masks(names, own), lr, steps)
        loss = client_update(model, data, shards[k], rnd, k, config, masks=own, scaler=scaler, side=side)
        extra = side.finish(params) if side is not None else None
        probe = probe_predictions(model, data, shards[k], k, config) if setting(config, "interference_probe") else None
        state = scaler.state_dict() if scaler is not None else None
        yield ClientResult(k, params, loss, own, state, extra, probe=probe)


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
    weights: list[Tensor], start: list[Tensor], avg: list[Tensor], unit_sum: list[Tensor], share: float
) -> Tensor:
    """Add the client's weights to the average and its unit update to unit_sum; returns |delta| (no sync).

    Overwrites `weights` (the model's own tensors, reloaded for the next client): memory does not grow.
    """
    torch._foreach_add_(avg, weights, alpha=share)
    torch._foreach_sub_(weights, start)  # weights now hold delta_k = w_k - w
    norm = _global_norm(weights)
    torch._foreach_div_(weights, norm.clamp_min(1e-30))  # a zero update adds nothing to unit_sum
    torch._foreach_add_(unit_sum, weights)
    return norm


def _union(trained: Mapping[str, Tensor] | None, own: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """Entries trained by either; a client without masks, or a parameter missing from its masks, trains in full."""
    if trained is None or own is None:
        return None
    return {n: trained[n].bool() | own[n].bool() for n in trained.keys() & own.keys()}


@torch.no_grad()
def _keep_frozen(names: list[str], start: list[Tensor], avg: list[Tensor], masks: Mapping[str, Tensor]) -> None:
    """avg <- w where no client trains (mask 0): the weighted mean of identical values can round off by an ulp,
    which would move frozen entries; this keeps them bit-exact (lerp(w, w, lr) == w)."""
    for name, w, a in zip(names, start, avg, strict=True):
        if name in masks:
            a.copy_(torch.where(masks[name].to(a.device).bool(), a, w))


# ----------------------------------------------------------------------------- resumable runs


def run_fedavg(
    config: dict | None = None,
    *,
    run_root: str | Path | None = None,
    progress: bool = True,
    train_clients: TrainClients | None = None,
    **overrides,
) -> Run:
    """Train (or resume, or skip if done) one FedAvg run; returns its Run (metrics, summary).

    `train_clients`: the engine seam of fedavg_round (helpers.flower.app trains the clients on Flower nodes).
    """
    run, inputs = begin_federated("fedavg", config, run_root, train_clients, overrides)
    if inputs is None:
        return run
    data, model = inputs
    set_trainable(model, run.config["train_mode"])
    remote = remote_clients(train_clients)  # the data is on the clients: the server gets n_k only
    shards = client_shards(run.config, data) if remote is None else withheld_shards(remote.shard_sizes(run.config))
    return federated_training(run, model, data, shards, progress=progress, train_clients=train_clients)


def begin_federated(
    experiment: str,
    config: dict | None,
    run_root: str | Path | None,
    train_clients: TrainClients | None,
    overrides: dict,
) -> tuple[Run, tuple[Data, nn.Module] | None]:
    """training.resumable.begin_run for a federated experiment, once its engine is checked (before any run folder)."""
    config = config or make_config(experiment, **overrides)
    check_engine(config, train_clients)
    remote = remote_evaluation(train_clients) is not None and setting(config, "evaluation") == "clients"
    return begin_run(experiment, config, run_root, data_here=not remote)  # remote: the server loads no data


def check_engine(config: dict, train_clients: TrainClients | None) -> None:
    """A run with engine="flower" trains on Flower nodes: run here without them, it would be mislabelled."""
    if config.get("engine") == "flower" and train_clients is None:
        raise ValueError(
            "engine='flower' runs train on Flower nodes: start them with helpers.flower.app.run_flower "
            "(python -m helpers flower), or use engine='sequential'"
        )


def federated_training(
    run: Run,
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    *,
    masks: Masks | None = None,
    progress: bool = True,
    train_clients: TrainClients | None = None,
) -> Run:
    """The resumable round loop (helpers.training.resumable). Trains the params that require grad.

    `masks` turns it into sparse federated fine-tuning (see fedavg_round); its callers store the masks.
    `train_clients` (default train_in_turn) trains each round's clients: see fedavg_round.
    Head-only runs train model.head on cached backbone features (helpers.training.features); checkpoints hold the model.
    """
    config = run.config
    net, inputs, scaler = loop_inputs(run, model, data)
    # its state (server optimizer, c) goes into the checkpoint; SCAFFOLD's c_i files are written under the lease
    algorithm = make_algorithm(config, run.dir, guard=lambda: check_holder(run))
    opts = dict(masks=masks, scaler=scaler, train_clients=train_clients, algorithm=algorithm)

    def one_round(rnd: int) -> dict:
        row = fedavg_round(net, inputs, shards, rnd, config, **opts)
        return {**row, **round_evaluation(net, inputs, rnd, config, remote_evaluation(train_clients))}

    show = ("train_loss", "val_acc", "drift_cos")
    extra = {"algorithm": algorithm} if algorithm.stateful else None
    resumable_loop(run, model, one_round, unit="round", extra=extra, scaler=scaler, show=show, progress=progress)
    algorithm.close()  # done: what only a resume needs goes (SCAFFOLD's c_i files: GBs at full size)
    return run
