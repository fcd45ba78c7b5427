"""Sparse fine-tuning runs (§9): step 0, calibration, then the masked backbone trained with SparseSGDM in the one
centralized loop (run_sparse_centralized) or the one FedAvg engine (run_sparse_fedavg); resumable, skipped if done.

Step 0 is editing.step0's, calibration and mask storage editing.calibration's; both run once per run and are saved in
the run folder, so a resumed run never recalibrates.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from helpers.config.experiments import make_config
from helpers.core.models import head_parameters
from helpers.data.datasets import Data
from helpers.editing.calibration import EDITING_FILE, calibrate_centralized, calibrate_federated, load_run_masks
from helpers.editing.step0 import fit_head, fit_head_federated
from helpers.federated.clients import client_shards
from helpers.federated.evaluation import RemoteEvaluation, evaluate_split, remote_evaluation
from helpers.federated.remote import remote_clients, withheld_shards
from helpers.federated.rounds import TrainClients, begin_federated, federated_training
from helpers.sparse.sgdm import SparseSGDM, masks_by_parameter
from helpers.training.centralized import centralized_training
from helpers.training.resumable import begin_run
from helpers.training.runs import Run, load_artifact, mark_done, save_artifact


def _edit_state(
    run: Run,
    model: nn.Module,
    data: Data,
    step0: Callable[[], dict],
    calibration: Callable[[], tuple],
    remote: RemoteEvaluation | None = None,
) -> tuple[dict | list, dict]:
    """Step 0 and calibration once per run, saved in the run folder; later starts load them.

    Leaves the model with the step-0 head, frozen, and the backbone trainable. Returns (packed masks, info).
    """
    saved = load_artifact(run, EDITING_FILE)
    if not isinstance(saved, dict) or not {"head", "masks", "info"} <= saved.keys():  # absent, refused or foreign
        info = step0()
        head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
        for split in ("val", "test"):
            # the step-0 model is the control with no backbone training: its val and test results are kept
            m = evaluate_split(model, data, split, run.config, remote)
            info.update({f"step0_{split}_loss": m["loss"], f"step0_{split}_acc": m["acc"]})
        masks, cost = calibration()
        info.update(cost, backbone_entries=masks.entries(), mask_density=masks.density())
        saved = {"head": head, "masks": masks.pack(), "info": info}
        save_artifact(run, EDITING_FILE, saved)
    model.head.load_state_dict(saved["head"])
    head = head_parameters(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in head)
    return saved["masks"], saved["info"]


def _finish(run: Run, info: dict | None = None) -> Run:
    """Add step-0 and calibration cost to done.json (also repairs a crash between the two writes)."""
    if not run.done:  # another session holds it (helpers.training.leases)
        return run
    summary = run.summary()
    if "calibration_s" not in summary:
        saved = load_artifact(run, EDITING_FILE) if info is None else None
        info = info if info is not None else saved.get("info") if isinstance(saved, dict) else None
        if info is not None:  # an unreadable editing.pt (warned) leaves the summary as it is
            mark_done(run, {**summary, **info})
    return run


def run_sparse_centralized(
    config: dict | None = None, *, run_root: str | Path | None = None, progress: bool = True, **overrides
) -> Run:
    """Step 0, calibration, then sparse fine-tuning in the centralized loop (resumes, or skips if done)."""
    run, inputs = begin_run("sparse_centralized", config or make_config("sparse_centralized", **overrides), run_root)
    if inputs is None:
        return _finish(run)
    config, (data, model) = run.config, inputs
    device = next(model.parameters()).device
    packed, info = _edit_state(
        run, model, data,
        step0=lambda: fit_head(model, data, config, run_root=run.root),
        calibration=lambda: calibrate_centralized(model, data, config, progress),
    )  # fmt: skip
    masks = load_run_masks(model, packed, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SparseSGDM(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"],
        masks=masks_by_parameter(model, masks.shared),
    )  # fmt: skip
    centralized_training(run, model, data, optimizer, progress=progress)
    return _finish(run, info)


# Deliberately the signature of fedavg.run_fedavg (helpers.flower.app calls both through one table): keep them alike.
def run_sparse_fedavg(
    config: dict | None = None,
    *,
    run_root: str | Path | None = None,
    progress: bool = True,
    train_clients: TrainClients | None = None,
    **overrides,
) -> Run:
    """Federated step 0, federated calibration, then sparse FedAvg with the mask (resumes, or skips if done).

    `train_clients`: the engine seam, as in fedavg.run_fedavg.
    """
    run, inputs = begin_federated("sparse_fedavg", config, run_root, train_clients, overrides)
    if inputs is None:
        return _finish(run)
    config, (data, model) = run.config, inputs
    device = next(model.parameters()).device
    remote = remote_clients(train_clients)  # the data is on the clients: the server gets n_k only
    shards = client_shards(config, data) if remote is None else withheld_shards(remote.shard_sizes(config))
    packed, info = _edit_state(
        run, model, data,
        step0=lambda: fit_head_federated(model, data, shards, config, run_root=run.root, progress=progress,
                                         keep_alive=run.claim.check if run.claim else None,
                                         train_clients=train_clients),
        calibration=lambda: calibrate_federated(model, data, shards, config, progress, remote),
        remote=remote_evaluation(train_clients),
    )  # fmt: skip
    masks = load_run_masks(model, packed, config, device)
    federated_training(run, model, data, shards, masks=masks, progress=progress, train_clients=train_clients)
    return _finish(run, info)
