"""Centralized training: epochs of the one training loop, evaluated on val (and test), resumable."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helpers.config import make_config
from helpers.data import Data, augment_generator, load_data, pick_device, step_batches
from helpers.features import head_view
from helpers.models import build_model, set_trainable
from helpers.runs import (
    CheckpointClock,
    Run,
    announce_start,
    load_checkpoint,
    mark_done,
    open_run,
    save_checkpoint,
    write_metrics,
)
from helpers.seeding import derive_seed
from helpers.train import NonFiniteLossError, evaluate, lr_at, make_scaler, train_steps


def build_seeded_model(config: dict, device: torch.device) -> torch.nn.Module:
    """The config's model with its random parts (head, or all of the tiny ViT) drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config["seed"], "init"))
        model = build_model(
            config["model"], num_classes=100, pretrained=config["pretrained"], img_size=config["img_size"]
        )
    return model.to(device)


def run_inputs(config: dict) -> tuple[Data, torch.nn.Module]:
    """What every runner starts from: the config's data on its device and its seeded model there."""
    device = pick_device(config["device"])
    return load_data(config, device), build_seeded_model(config, device)


def run_centralized(
    config: dict | None = None, *, run_root: str | Path | None = None, progress: bool = True, **overrides
) -> Run:
    """Train (or resume, or skip if done) one centralized run; returns its Run (metrics, summary)."""
    run = open_run("centralized", config or make_config("centralized", **overrides), run_root)
    if run.done:
        return run
    config = run.config
    data, model = run_inputs(config)
    params = set_trainable(model, config["train_mode"])
    optimizer = torch.optim.SGD(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    return centralized_training(run, model, data, optimizer, progress=progress)


def centralized_training(
    run: Run, model: torch.nn.Module, data: Data, optimizer: torch.optim.Optimizer, *, progress: bool = True
) -> Run:
    """The resumable epoch loop: checkpoints, metrics rows, done marker. Trains what `optimizer` holds.

    `model` comes in at its initial state (e.g. with a fitted head) and `optimizer` may be SparseSGDM, so
    the same loop serves dense and sparse fine-tuning. A checkpoint, if any, replaces both states.
    Head-only runs train model.head on cached backbone features (helpers.features); checkpoints hold the model.
    """
    config, device = run.config, data.train_x.device
    net, inputs = head_view(model, data, config, run.root)
    if config["compile"]:
        net.compile()  # in place: parameter names, checkpoints and the optimizer are unchanged
    scaler = make_scaler(device)
    epochs, batch = config["epochs"], config["batch_size"]
    steps = math.ceil(len(data.train_y) / batch)
    rows, start, elapsed = [], 0, 0.0
    state = load_checkpoint(run, map_location=device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rows, start, elapsed = state["metrics"], state["epoch"], state["elapsed"]
    announce_start(run, state)
    write_metrics(run, rows)  # drops rows written after the checkpoint we resume from
    clock = CheckpointClock(config["checkpoint_every"], config["checkpoint_minutes"])
    schedule = dict(
        base_lr=config["lr"],
        total_steps=epochs * steps,
        scheduler=config["scheduler"],
        warmup_steps=config["warmup_epochs"] * steps,
        step_size=config["step_size"] * steps,
        gamma=config["gamma"],
    )
    bar = tqdm(range(start, epochs), desc=f"{run.experiment} {run.id}", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        gen = augment_generator(config["seed"], "epoch", epoch)
        batches = step_batches(torch.arange(len(data.train_y)), batch, steps, gen)
        lrs = [lr_at(epoch * steps + i, **schedule) for i in range(steps)]
        try:
            train_loss = train_steps(
                net,
                optimizer,
                inputs.train_x,
                inputs.train_y,
                batches,
                gen,
                img_size=config["img_size"],
                augment=config["augment"],
                lrs=lrs,
                scaler=scaler,
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"run {run.id}, epoch {epoch + 1}: {exc}") from None
        row = {"epoch": epoch + 1, "current_lr": lrs[-1], "train_loss": train_loss}
        last = epoch + 1 == epochs
        if (epoch + 1) % config["eval_every"] == 0 or last:
            row.update(_eval(net, inputs.val_x, inputs.val_y, "val", config))
        if config["eval_test"] or last:  # the test set only for final numbers, unless curves are asked for
            row.update(_eval(net, inputs.test_x, inputs.test_y, "test", config))
        elapsed += time.perf_counter() - t0
        row["elapsed_s"] = round(elapsed, 3)
        rows.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k in ("train_loss", "val_acc", "test_acc")})
        if clock.due(epoch + 1, final=last):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "metrics": rows,
                "elapsed": elapsed,
                "scaler": scaler.state_dict() if scaler else None,
            }
            save_checkpoint(run, state)
        write_metrics(run, rows)
    mark_done(run, {**rows[-1], "run_id": run.id})
    return run


def _eval(model, x, y, split: str, config: dict) -> dict[str, float]:
    m = evaluate(model, x, y, img_size=config["img_size"], batch_size=config["eval_batch_size"])
    return {f"{split}_loss": m["loss"], f"{split}_acc": m["acc"]}
