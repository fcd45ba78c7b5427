"""Post-hoc task-vector scaling, the simplest task-arithmetic baseline: a finished run's task vector tau = w_T - w_0
scaled, w_0 + alpha tau, with alpha chosen on the validation split (the test split only at the chosen alpha), no
extra training.

w_0 is the run's starting point, rebuilt rather than stored: the seeded model (helpers.training.resumable), with the
step-0 head from the run's editing.pt for sparse runs and their dense controls (step 0 trains the head alone, so the
backbone is the seeded one). w_T is the final checkpoint. alpha = 0 is the starting model, alpha = 1 the run itself.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from helpers.data.datasets import load_data, pick_device
from helpers.editing.calibration import EDITING_FILE
from helpers.federated.evaluation import evaluate_split
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import Run, load_artifact, load_checkpoint

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # 1 is the run; above 1 extrapolates its direction


def start_weights(run: Run, device: torch.device) -> nn.Module:
    """The model the run started from (w_0): seeded, with its step-0 head if it is an editing run."""
    model = build_seeded_model(run.config, device)
    if "sparsity" in run.config:
        saved = load_artifact(run, EDITING_FILE, map_location=device)
        if not isinstance(saved, dict) or "head" not in saved:
            raise FileNotFoundError(f"{run.dir / EDITING_FILE} holds no step-0 head: the run's w_0 cannot be rebuilt")
        model.head.load_state_dict(saved["head"])
    return model


def final_weights(run: Run, device: torch.device) -> dict[str, torch.Tensor]:
    """w_T: the model of the run's final checkpoint."""
    run.summary()  # an error naming the run if it is not finished
    state = load_checkpoint(run, map_location=device)
    if state is None:
        raise FileNotFoundError(f"run {run.id} ({run.dir}) has no readable checkpoint: no final weights to scale")
    return state["model"]


@torch.no_grad()
def scaled(w0: dict[str, torch.Tensor], wt: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """w_0 + alpha (w_T - w_0) per tensor; lerp gives w_0 and w_T exactly at alpha 0 and 1."""
    return {k: torch.lerp(w0[k], wt[k], alpha) if wt[k].is_floating_point() else wt[k] for k in wt}


def scale_task_vector(run: Run, alphas: tuple[float, ...] = ALPHAS, device: str | None = None) -> pd.DataFrame:
    """One row per alpha: validation loss and accuracy of w_0 + alpha (w_T - w_0); the test split at the alpha with the
    best validation accuracy only (`chosen`; a tie goes to the lower validation loss, then to the earlier alpha), with
    the run's config columns (a tidy table like helpers.reporting.results')."""
    config = run.config
    dev = pick_device(device or config["device"])
    wt = final_weights(run, dev)
    data = load_data(config, dev)
    model = start_weights(run, dev)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for alpha in alphas:
        model.load_state_dict(scaled(w0, wt, alpha))
        val = evaluate_split(model, data, "val", config)
        rows.append({"alpha": alpha, "val_loss": val["loss"], "val_acc": val["acc"]})
    table = pd.DataFrame(rows)
    best = table.sort_values(["val_acc", "val_loss"], ascending=[False, True], kind="stable").index[0]
    model.load_state_dict(scaled(w0, wt, table.loc[best, "alpha"]))
    test = evaluate_split(model, data, "test", config)
    table["chosen"] = table.index == best
    table.loc[best, ["test_loss", "test_acc"]] = [test["loss"], test["acc"]]
    return table.assign(run_id=run.id, experiment=run.experiment, **config)
