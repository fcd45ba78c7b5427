"""Model editing (§9): sparse fine-tuning of the backbone under a calibrated gradient mask, centrally and in FL.

Three steps, each on the project's one implementation of the thing it needs:
  step 0     fit the head on the frozen backbone (SGD on cached features, or closed-form ridge), then freeze it;
             federated: ridge from summed client statistics, or FedAvg on the head (train_mode="head") --
             never on pooled client data;
  calibrate  masks with helpers.sensitivity (federated: each client scores its own shard, the server sums the
             scores, or keeps per-client masks with mask_scope="local"); saved with the head in the run folder,
             so a resumed run never recalibrates;
  fine-tune  the masked backbone with SparseSGDM in the one centralized loop / the one FedAvg engine.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from helpers.centralized import centralized_training, run_inputs
from helpers.config import EXPERIMENTS, MASK_ONLY, make_config, train_split_size
from helpers.data import NUM_CLASSES, Data, eval_batch, step_batches
from helpers.features import fingerprint, split_features
from helpers.fedavg import (
    BYTES_PER_ENTRY,
    check_engine,
    client_shards,
    federated_training,
    run_fedavg,
)
from helpers.models import backbone_parameters, head_parameters
from helpers.runs import (
    Run,
    atomic_write,
    load_artifact,
    load_checkpoint,
    load_results,
    mark_done,
    open_run,
    save_artifact,
    tidy_results,
    with_integer_columns,
    write_results,
)
from helpers.seeding import derive_seed, torch_generator
from helpers.sensitivity import (
    SENSITIVITY_RULES,
    _layer_of,
    calibrate_masks,
    compute_scores,
    mask_density_table,
    mask_jaccard,
    overall_density,
)
from helpers.sparse_sgdm import SparseSGDM, masks_by_parameter
from helpers.train import NonFiniteLossError, evaluate, lr_at, make_scaler, train_steps

EDITING_FILE = "editing.pt"  # step-0 head, packed masks and calibration cost, in the run folder
Masks = dict[str, Tensor]


# ----------------------------------------------------------------------------- step 0: the head


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
    scaler, loss = make_scaler(features.device), math.nan
    for epoch in range(epochs):
        gen = torch_generator(config["seed"], "step0", epoch)
        batches = step_batches(torch.arange(n), batch, steps, gen)
        lrs = [lr_at(epoch * steps + i, base_lr=config["step0_lr"], total_steps=epochs * steps,
                     scheduler="cosine") for i in range(steps)]  # fmt: skip
        try:
            loss = train_steps(head, optimizer, features, labels, batches, gen, img_size=config["img_size"],
                               lrs=lrs, scaler=scaler)  # fmt: skip
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
    m = max(1, round(config["participation"] * config["num_clients"]))
    per_round = m * config["local_steps"] * config["batch_size"]
    rounds = max(1, math.ceil(config["step0_epochs"] * train_split_size(config) / per_round))
    shared = {k: config[k] for k in EXPERIMENTS["fedavg"] if k in config}
    # augment=None: the head trains on cached (un-augmented) features, whatever the sparse run augments.
    # engine="sequential": both engines share one step-0 run (helpers.flower runs step 0 on the server).
    overrides = {"train_mode": "head", "lr": config["step0_lr"], "rounds": rounds, "eval_every": rounds,
                 "augment": None, "engine": "sequential"}  # fmt: skip
    return make_config("fedavg", **{**shared, **overrides})


def fit_head_federated(
    model: nn.Module,
    data: Data,
    shards: list[Tensor],
    config: dict,
    *,
    run_root: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Step 0 without pooling client data: ridge from the sum of client statistics, or FedAvg on the head."""
    t0 = time.perf_counter()
    if config["step0"] == "ridge":
        # Row i of the features depends on image i only: this equals every client featurising its own shard.
        features = split_features(model, data, "train", config, run_root)
        xtx = xty = None
        for shard in shards:  # each client uploads (X_k^T X_k, X_k^T Y_k); the server sums them and solves
            shard = shard.to(features.device)
            a, b = ridge_statistics(features[shard], data.train_y[shard])
            xtx, xty = (a, b) if xtx is None else (xtx + a, xty + b)
        set_head(model, *solve_ridge(xtx, xty, config["ridge_lambda"]))
        uploaded = len(shards) * BYTES_PER_ENTRY * (xtx.numel() + xty.numel())
        return {"step0_s": round(time.perf_counter() - t0, 3), "step0_upload_bytes": uploaded}
    head_run = run_fedavg(head_fedavg_config(config), run_root=run_root, progress=progress)
    state = load_checkpoint(head_run, map_location=data.train_x.device)
    if state is None:
        raise RuntimeError(f"step 0: the head's FedAvg run {head_run.dir} has no checkpoint; delete that folder")
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in state["model"].items() if k.startswith("head.")})
    return {
        "step0_s": head_run.summary()["elapsed_s"],
        "step0_upload_bytes": int(head_run.metrics()["upload_bytes"].sum()),
        "step0_run": head_run.id,
    }


# ----------------------------------------------------------------------------- calibration


class Scorer:
    """score_fn for calibrate_masks: the sum over `pools` (the train split, or each client's shard) of
    compute_scores on calibration_samples samples of that pool (all of it if smaller), eval preprocessing.

    Each pool is scored on its own (its own samples and label draws), then the sums are added: the server's
    sum of client scores. Every round draws fresh labels (the generator's key holds the round). Scores are a
    pure function of the weights and the round, so the first round (the step-0 model, shared by a grid over
    sparsity and rounds) is computed once per process and its cost counted each time.
    Counts what calibration costs: seconds, samples scored, score tensors uploaded.
    """

    def __init__(self, data: Data, pools: list[Tensor], keys: list[tuple], config: dict, progress: bool = False):
        self.data, self.pools, self.keys, self.config, self.progress = data, pools, keys, config, progress
        self.calls = self.samples = self.uploads = 0
        self.seconds = self.reused_seconds = 0.0  # scoring time, and the part of it taken from the cache

    def batches(self, pool: Tensor, key: tuple):
        """The pool's calibration batches: a seeded subset without replacement (the same in every round)."""
        size, dev = self.config["batch_size"], self.data.train_x.device
        order = torch.randperm(len(pool), generator=torch_generator(self.config["seed"], "calibration", *key))
        chosen = pool[order][: self.config["calibration_samples"]]
        self.samples += len(chosen)
        for idx in chosen.split(size):
            idx = idx.to(dev)
            yield eval_batch(self.data.train_x[idx], img_size=self.config["img_size"]), self.data.train_y[idx]

    def __call__(self, model: nn.Module) -> Masks:
        self.calls += 1
        key = self._cache_key(model) if self.calls == 1 else None
        if key is not None and key in _FIRST_ROUND:
            scores, cost = _FIRST_ROUND[key]
            self.seconds, self.samples, self.uploads = (a + b for a, b in zip(self.cost(), cost, strict=True))
            self.reused_seconds += cost[0]
            return {n: s.clone() for n, s in scores.items()}
        before, t0 = self.cost(), time.perf_counter()
        total = None
        pools = zip(self.pools, self.keys, strict=True)
        bar = tqdm(pools, total=len(self.pools), desc=f"scoring (round {self.calls})", leave=False,
                   disable=not self.progress or len(self.pools) < 2)  # fmt: skip
        for pool, key_ in bar:
            gen = torch_generator(self.config["seed"], "talos_labels", self.calls, *key_)  # fresh labels every round
            scores = compute_scores(model, self.batches(pool, key_), method=self.config["score_method"], generator=gen)
            self.uploads += 1
            total = scores if total is None else {n: total[n].add_(s) for n, s in scores.items()}
        self.seconds += time.perf_counter() - t0
        if key is not None:
            _FIRST_ROUND.clear()
            cost = tuple(a - b for a, b in zip(self.cost(), before, strict=True))
            _FIRST_ROUND[key] = ({n: s.clone() for n, s in total.items()}, cost)
        return total

    def cost(self) -> tuple[float, int, int]:
        return self.seconds, self.samples, self.uploads

    def _cache_key(self, model: nn.Module) -> tuple:
        names = ("dataset", "data_root", "synthetic_train_size", "synthetic_test_size", "val_fraction", "data_seed",
                 "model", "img_size", "seed", "batch_size", "calibration_samples", "score_method")  # fmt: skip
        pools = hashlib.sha1(b"".join(p.cpu().numpy().tobytes() + b"|" for p in self.pools)).hexdigest()
        return (*(self.config[k] for k in names), pools, tuple(self.keys), str(self.data.train_x.device),
                fingerprint(model, head=True))  # fmt: skip


_FIRST_ROUND: dict[tuple, tuple[Masks, tuple]] = {}


TOKEN_EMBEDDINGS = ("cls_token", "reg_token", "pos_embed")  # parameters of the ViT itself, not of a layer


def masked_names(model: nn.Module, config: dict) -> list[str]:
    """The backbone parameters under the mask: all of them, or (embeddings="dense", as in the TaLoS reference)
    all but the token embeddings, which then train densely."""
    dense = TOKEN_EMBEDDINGS if config["embeddings"] == "dense" else ()
    return [n for n in backbone_parameters(model) if n not in dense]


def check_masks(model: nn.Module, masks: Mapping[str, Tensor], config: dict) -> None:
    """Masks must cover exactly the masked parameters: one left out would silently train densely."""
    want = masked_names(model, config)
    missing, extra = [n for n in want if n not in masks], sorted(set(masks) - set(want))
    if missing or extra:
        raise ValueError(
            f"masks do not match the masked parameters (embeddings={config['embeddings']!r}): "
            + (f"no mask for {missing[:5]} ({len(missing)} in all), which would train densely; " if missing else "")
            + (f"masks for {extra[:5]}, which are not masked parameters; " if extra else "")
            + "recalibrate: delete the run folder"
        )


def calibrate(model: nn.Module, scorer: Scorer, config: dict, seed: int | None = None) -> Masks:
    """calibrate_masks with the config's sparsity, rounds, rule and masked parameters (one-shot rules and
    sparsity 0 never call the scorer)."""
    return calibrate_masks(
        model, scorer, sparsity=config["sparsity"], rounds=config["calibration_rounds"], rule=config["mask_rule"],
        seed=config["seed"] if seed is None else seed, names=masked_names(model, config),
    )  # fmt: skip


def calibrate_centralized(model: nn.Module, data: Data, config: dict, progress: bool = False) -> tuple[Masks, dict]:
    """Masks from scores on calibration_samples samples of the train split; returns (masks, cost)."""
    t0 = time.perf_counter()
    scorer = Scorer(data, [torch.arange(len(data.train_y))], [("train",)], config, progress)
    masks = calibrate(model, scorer, config)
    seconds = time.perf_counter() - t0 + scorer.reused_seconds
    return masks, {"calibration_s": round(seconds, 3), "calibration_scored": scorer.samples}


def calibrate_federated(
    model: nn.Module, data: Data, shards: list[Tensor], config: dict, progress: bool = False
) -> tuple[Masks | list[Masks], dict]:
    """Global scope: one mask from the sum of every client's scores. Local: each client's own mask.

    Returns (masks, cost); cost counts the score tensors clients upload (none for local masks).
    """
    t0 = time.perf_counter()
    keys = [("client", k) for k in range(len(shards))]
    if config["mask_scope"] == "global":
        scorers = [Scorer(data, shards, keys, config, progress)]
        masks = calibrate(model, scorers[0], config)
    else:
        scorers = [Scorer(data, [shard], [key], config) for shard, key in zip(shards, keys, strict=True)]
        bar = tqdm(scorers, desc="local masks", leave=False, disable=not progress)
        masks = [calibrate(model, sc, config, seed=derive_seed(config["seed"], *sc.keys[0])) for sc in bar]
    entries = sum(p.numel() for p in backbone_parameters(model).values())
    uploads = sum(sc.uploads for sc in scorers) if config["mask_scope"] == "global" else 0
    cost = {
        "calibration_s": round(time.perf_counter() - t0 + sum(sc.reused_seconds for sc in scorers), 3),
        "calibration_scored": sum(sc.samples for sc in scorers),
        "calibration_upload_bytes": BYTES_PER_ENTRY * entries * uploads,
    }
    return masks, cost


def sample_count_study(model: nn.Module, data: Data, config: dict, counts: list[int]) -> tuple[pd.DataFrame, Figure]:
    """How the mask depends on the calibration sample count: centralized masks (the config's sparsity, rule and
    rounds) from each count, and their Jaccard overlap with the mask from the largest count; with a plot.

    `model` holds its step-0 head. Each count draws its own first samples of one seeded order of the train split,
    so a smaller count scores a subset of a larger one.
    """
    counts = sorted({int(n) for n in counts})
    masks, rows = {}, []
    for n in counts:
        masks[n], cost = calibrate_centralized(model, data, {**config, "calibration_samples": n})
        rows.append({"calibration_samples": n, "calibration_s": cost["calibration_s"]})
    table = pd.DataFrame(rows)
    table["jaccard_vs_largest"] = [mask_jaccard(masks[n], masks[counts[-1]]) for n in counts]
    density = 1 - config["sparsity"]
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(table["calibration_samples"], table["jaccard_vs_largest"], marker="o")
    ax.axhline(density / (2 - density), color="grey", ls=":", label="two random masks")
    ax.axvline(config["calibration_samples"], color="tab:red", ls="--", label="profile default")
    ax.set_xscale("log")
    ax.set_xlabel("calibration samples per round (log scale)")
    ax.set_ylabel(f"Jaccard with the mask from {counts[-1]:,}")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return table, fig


def pack_masks(masks: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], Tensor]]:
    """Bool masks as bits (8x smaller on disk): name -> (shape, uint8 tensor)."""
    return {
        n: (tuple(m.shape), torch.from_numpy(np.packbits(m.bool().cpu().numpy().ravel()))) for n, m in masks.items()
    }


def unpack_masks(packed: Mapping[str, tuple], device: str | torch.device = "cpu") -> Masks:
    """The bool masks (True = trainable) of pack_masks' output, on `device`."""
    out = {}
    for n, (shape, bits) in packed.items():
        flat = np.unpackbits(bits.numpy(), count=math.prod(shape)).astype(bool)
        out[n] = torch.from_numpy(flat).view(shape).to(device)
    return out


def load_masks(run: Run, device: str | torch.device = "cpu") -> Masks | list[Masks]:
    """The masks a sparse run trained with (one dict, or one per client for mask_scope="local")."""
    saved = load_artifact(run, EDITING_FILE)
    if saved is None:
        raise ValueError(f"run {run.dir} has no {EDITING_FILE}: it is not a sparse run or it has not calibrated yet")
    packed = saved["masks"]
    return [unpack_masks(p, device) for p in packed] if isinstance(packed, list) else unpack_masks(packed, device)


def load_run_masks(
    model: nn.Module, packed: dict | list, config: dict, device: torch.device
) -> Masks | Callable[[int], Masks]:
    """A sparse run's saved masks, checked against the model: one dict, or client -> its masks
    (mask_scope="local", unpacked when the client trains)."""
    if isinstance(packed, list):
        return lambda k: _checked(model, unpack_masks(packed[k], device), config)
    return _checked(model, unpack_masks(packed, device), config)


def _checked(model: nn.Module, masks: Masks, config: dict) -> Masks:
    check_masks(model, masks, config)
    return masks


def _edit_state(
    run: Run, model: nn.Module, data: Data, step0: Callable[[], dict], calibration: Callable[[], tuple]
) -> tuple[dict | list, dict]:
    """Step 0 and calibration once per run, saved in the run folder; later starts load them.

    Leaves the model with the step-0 head, frozen, and the backbone trainable. Returns (packed masks, info).
    """
    saved = load_artifact(run, EDITING_FILE)
    if saved is None:
        info = step0()
        head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
        for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
            # the step-0 model is the control with no backbone training: its val and test results are kept
            m = evaluate(model, x, y, img_size=run.config["img_size"], batch_size=run.config["eval_batch_size"])
            info.update({f"step0_{split}_loss": m["loss"], f"step0_{split}_acc": m["acc"]})
        masks, cost = calibration()
        single = masks if isinstance(masks, dict) else masks[0]
        info.update(cost, backbone_entries=sum(x.numel() for x in single.values()))
        info["mask_density"] = (
            overall_density(masks) if isinstance(masks, dict) else float(np.mean([overall_density(x) for x in masks]))
        )
        packed = pack_masks(masks) if isinstance(masks, dict) else [pack_masks(x) for x in masks]
        saved = {"head": head, "masks": packed, "info": info}
        save_artifact(run, EDITING_FILE, saved)
    model.head.load_state_dict(saved["head"])
    head = head_parameters(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in head)
    return saved["masks"], saved["info"]


def _finish(run: Run, info: dict | None = None) -> Run:
    """Add step-0 and calibration cost to done.json (also repairs a crash between the two writes)."""
    summary = run.summary()
    if "calibration_s" not in summary:
        info = info if info is not None else load_artifact(run, EDITING_FILE)["info"]
        mark_done(run, {**summary, **info})
    return run


# ----------------------------------------------------------------------------- resumable runs


def run_sparse_centralized(
    config: dict | None = None, *, run_root: str | Path | None = None, progress: bool = True, **overrides
) -> Run:
    """Step 0, calibration, then sparse fine-tuning in the centralized loop (resumes, or skips if done)."""
    run = open_run("sparse_centralized", config or make_config("sparse_centralized", **overrides), run_root)
    if run.done:
        return _finish(run)
    config = run.config
    data, model = run_inputs(config)
    device = data.train_x.device
    packed, info = _edit_state(
        run, model, data,
        step0=lambda: fit_head(model, data, config, run_root=run.root),
        calibration=lambda: calibrate_centralized(model, data, config, progress),
    )  # fmt: skip
    masks = load_run_masks(model, packed, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SparseSGDM(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"],
        masks=masks_by_parameter(model, masks),
    )  # fmt: skip
    centralized_training(run, model, data, optimizer, progress=progress)
    return _finish(run, info)


def run_sparse_fedavg(
    config: dict | None = None,
    *,
    run_root: str | Path | None = None,
    progress: bool = True,
    round_fn: Callable[..., dict] | None = None,
    **overrides,
) -> Run:
    """Federated step 0, federated calibration, then sparse FedAvg with the mask (resumes, or skips if done).

    `round_fn`: see federated_training (helpers.flower runs the rounds on Flower nodes through it).
    """
    config = config or make_config("sparse_fedavg", **overrides)
    check_engine(config, round_fn)
    run = open_run("sparse_fedavg", config, run_root)
    if run.done:
        return _finish(run)
    config = run.config
    data, model = run_inputs(config)
    device = data.train_x.device
    shards = client_shards(config, data)
    packed, info = _edit_state(
        run, model, data,
        step0=lambda: fit_head_federated(model, data, shards, config, run_root=run.root, progress=progress),
        calibration=lambda: calibrate_federated(model, data, shards, config, progress),
    )  # fmt: skip
    masks = load_run_masks(model, packed, config, device)
    federated_training(run, model, data, shards, masks=masks, progress=progress, round_fn=round_fn)
    return _finish(run, info)


# ----------------------------------------------------------------------------- tables and figures

DENSE_LABEL = "dense, new head"  # dense fine-tuning / FedAvg of 01-03: the head trained from scratch with the rest
DENSE_STEP0_LABEL = "dense, step-0 head"  # control (a): the whole backbone trained, head fixed after step 0
STEP0_LABEL = "step-0 model"  # control (b): the step-0 head on the untouched backbone
INFO_COLUMNS = ("step0_s", "step0_val_acc", "step0_val_loss", "step0_test_acc", "step0_test_loss",
                "step0_upload_bytes", "calibration_s",
                "calibration_scored", "calibration_upload_bytes", "mask_density", "backbone_entries")  # fmt: skip


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per finished run: run id, experiment, every config value and its done.json summary."""
    rows = [{"run_id": r.id, "experiment": r.experiment, **r.config, **r.summary()} for r in runs if r.done]
    return pd.DataFrame(rows)


def write_editing_results(runs: list[Run], name: str, extra: pd.DataFrame | None = None) -> Path:
    """results/<profile>/<name>.csv: tidy rows per (run, epoch|round) plus step-0 and calibration cost columns,
    and a row per step-0 model (step0_rows); `extra` tidy rows (e.g. the dense FedAvg reference read from 02/03)
    are appended as they are."""
    path = write_results(runs, name)  # the path and the one-profile check of every results file
    table, info = tidy_results(runs), summary_table(runs)
    columns = ["run_id"] + [c for c in INFO_COLUMNS if c in info]
    if len(columns) > 1 and not table.empty:
        table = table.merge(info[columns], on="run_id", how="left")
    parts = [t for t in (table, step0_rows(runs), extra) if t is not None and not t.empty]
    table = with_integer_columns(pd.concat(parts, ignore_index=True)) if parts else table
    atomic_write(path, table.to_csv(index=False).encode())
    return path


STEP0_METRICS = ("val_loss", "val_acc", "test_loss", "test_acc")


def step0_rows(runs: list[Run]) -> pd.DataFrame:
    """The no-backbone-training control: one tidy row (experiment "step0", step 0) per distinct step-0 model
    among the finished sparse runs, holding its val and test metrics. Runs sharing a step 0 (same data, shards,
    seed and head training) give one row; mask settings are left empty."""
    rows = {}
    for run in runs:
        summary = run.summary() if run.done and run.experiment.startswith("sparse_") else {}
        if "step0_test_acc" not in summary:
            continue
        metrics = {m: summary[f"step0_{m}"] for m in STEP0_METRICS}
        config = {k: v for k, v in run.config.items() if k not in ("sparsity", *MASK_ONLY)}
        key = hashlib.sha1(repr(sorted(metrics.items()) + [config.get("sharding"), config.get("classes_per_client"),
                                                            config["seed"]]).encode()).hexdigest()[:12]  # fmt: skip
        step = "round" if "rounds" in run.config else "epoch"
        rows.setdefault(key, {"run_id": f"step0-{key}", "experiment": "step0", step: 0, **metrics, **config})
    return pd.DataFrame(list(rows.values()))


def sharding_label(sharding: str, classes_per_client: object) -> str:
    """'IID', or the number of classes per client ('5') of a non-IID sharding (the 'Nc' column of 03)."""
    return "IID" if sharding == "iid" else str(int(classes_per_client))


def method_label(config: Mapping) -> str:
    """Short name of what a run trains: 'dense, new head', 'head only', 'sparse s=0.9 R=4' (+ rule), or a
    control: 'dense, step-0 head' (sparsity 0) and 'step-0 model' (no backbone training, see step0_rows)."""
    if config.get("experiment") == "step0":
        return STEP0_LABEL
    if "sparsity" not in config or pd.isna(config.get("sparsity")):
        return "head only" if config.get("train_mode") == "head" else DENSE_LABEL
    if config["sparsity"] == 0:
        return DENSE_STEP0_LABEL
    rule = "" if config.get("mask_rule", "least_sensitive") == "least_sensitive" else f" {config['mask_rule']}"
    rounds = f" R={int(config['calibration_rounds'])}" if pd.notna(config.get("calibration_rounds")) else ""
    return f"sparse{rule} s={config['sparsity']:g}{rounds}"


def method_labels(table: pd.DataFrame) -> pd.Series:
    """method_label of every row of a tidy table (computed once per distinct configuration)."""
    keys = [c for c in ("experiment", "sparsity", "train_mode", "mask_rule", "calibration_rounds") if c in table]
    configs = table[keys].astype(object).where(table[keys].notna(), None)
    rows = list(configs.itertuples(index=False, name=None))
    labels = {row: method_label({k: v for k, v in zip(keys, row) if v is not None}) for row in set(rows)}
    return pd.Series([labels[row] for row in rows], index=table.index, dtype=object)


def sparse_rows(table: pd.DataFrame) -> pd.Series:
    """True for the rows of sparse runs proper (sparsity > 0): not the dense control, step-0 or dense rows."""
    if "sparsity" not in table:
        return pd.Series(False, index=table.index)
    return table["sparsity"].fillna(0) > 0


def rules_with_controls(table: pd.DataFrame) -> pd.DataFrame:
    """A labelled table (with `method`) whose `mask_rule` names the controls and dense runs by their method,
    so that one column lists the rules and what they are compared with."""
    rule = sparse_rows(table)
    mask_rule = table["mask_rule"] if "mask_rule" in table else pd.Series(None, index=table.index, dtype=object)
    return table.assign(mask_rule=mask_rule.where(rule, table["method"]))


def with_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Add 'method' (see method_label) and, for federated rows, 'Nc' (see sharding_label) columns."""
    table = table.copy()
    table.insert(0, "method", method_labels(table))
    if "sharding" in table:
        table.insert(1, "Nc", [sharding_label(s, n) for s, n in zip(table["sharding"], table["classes_per_client"])])
    return table


def dense_fedavg_reference(
    profile: str, settings: Iterable[tuple[str, object]] | None = None, **match: object
) -> pd.DataFrame:
    """Tidy rows of the dense FedAvg runs of 02/03 (results/<profile>/fedavg_iid.csv, fedavg_noniid.csv) whose
    columns equal `match` (e.g. local_steps=4, lr=0.01) and, if given, whose (sharding, classes_per_client) is one
    of `settings` (03 may have run more Nc than the caller compares); empty when those notebooks have not run yet."""
    tables = [load_results(name, profile) for name in ("fedavg_iid", "fedavg_noniid")]
    tables = [t for t in tables if t is not None and not t.empty]
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True).drop_duplicates(subset=["run_id", "round"])
    for key, value in {"train_mode": "full", **match}.items():
        if key in table:
            table = table[table[key] == value]
    if settings is not None:
        wanted = {sharding_label(sh, nc) for sh, nc in settings}
        labels = [sharding_label(sh, nc) for sh, nc in zip(table["sharding"], table["classes_per_client"])]
        table = table[pd.Series(labels, index=table.index, dtype=object).isin(wanted)]
    return table.reset_index(drop=True)


def final_results(table: pd.DataFrame) -> pd.DataFrame:
    """The last row of every run in a tidy table."""
    if table.empty:
        return table
    step = "round" if "round" in table else "epoch"
    return table.sort_values(step).groupby("run_id", sort=False).tail(1).reset_index(drop=True)


def plot_vs_sparsity(
    table: pd.DataFrame,
    metrics: list[str],
    hue: str = "calibration_rounds",
    references: Mapping | None = None,
) -> Figure:
    """Final `metrics` against sparsity (one line per `hue`), with dashed lines for `references`
    ({label: {metric: value}}, e.g. dense fine-tuning and the linear probe)."""
    import seaborn as sns

    fig = Figure(figsize=(5 * len(metrics), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    styles = iter([("grey", "--"), ("black", ":"), ("tab:red", "-.")] * 3)
    refs = {label: (values, next(styles)) for label, values in (references or {}).items()}
    for ax, metric in zip(axes, metrics, strict=True):
        data = table.dropna(subset=[metric]) if metric in table else table.iloc[:0]
        if not data.empty:
            sns.lineplot(data=data, x="sparsity", y=metric, hue=hue, marker="o", errorbar="sd", ax=ax,
                         palette="colorblind")  # fmt: skip
        for label, (values, (color, style)) in refs.items():
            if metric in values and pd.notna(values[metric]):
                ax.axhline(values[metric], color=color, ls=style, lw=1.2, label=label)
        ax.set_xlabel("sparsity (fraction of backbone entries frozen)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend(title=hue.replace("_", " "), fontsize=8)
    return fig


def layer_density_table(masks_by_label: Mapping[str, Masks]) -> pd.DataFrame:
    """Trainable fraction per layer (patch_embed, blocks.i, norm, ...) of each labelled mask."""
    frames = []
    for label, masks in masks_by_label.items():
        table = mask_density_table(masks)
        table["layer"] = table["name"].map(_layer_of)
        table = table.groupby("layer", sort=False)[["entries", "trainable"]].sum().reset_index()
        table["density"] = table["trainable"] / table["entries"].clip(lower=1)
        frames.append(table.assign(mask=label))
    return pd.concat(frames, ignore_index=True)


def plot_layer_density(masks_by_label: Mapping[str, Masks], title: str | None = None) -> Figure:
    """Grouped bars: trainable fraction per layer, one colour per labelled mask."""
    import seaborn as sns

    table = layer_density_table(masks_by_label)
    fig = Figure(figsize=(max(6.0, 0.5 * table["layer"].nunique() + 3), 3.6), layout="constrained")
    ax = fig.add_subplot()
    sns.barplot(data=table, x="layer", y="density", hue="mask", ax=ax, palette="colorblind")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.set_ylabel("trainable fraction")
    ax.set_xlabel("")
    if title:
        ax.set_title(title)
    return fig


def jaccard_matrix(masks_by_label: Mapping[str, Masks]) -> pd.DataFrame:
    """Pairwise Jaccard overlap |A & B| / |A | B| of the trainable sets."""
    labels = list(masks_by_label)
    values = [[mask_jaccard(masks_by_label[a], masks_by_label[b]) for b in labels] for a in labels]
    return pd.DataFrame(values, index=labels, columns=labels)


def plot_jaccard(matrix: pd.DataFrame, title: str | None = None) -> Figure:
    """Heatmap of a jaccard_matrix."""
    import seaborn as sns

    fig = Figure(figsize=(1.1 * len(matrix) + 2.5, 0.9 * len(matrix) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(matrix, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", square=True, ax=ax)
    ax.set_title(title or "Jaccard overlap of trainable entries")
    return fig


def one_shot(rule: str) -> bool:
    """True for the rules whose masks come from one scoring (magnitude, random): rounds do not apply."""
    return rule not in SENSITIVITY_RULES
