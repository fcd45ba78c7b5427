"""Centralized training: epochs of the one training loop, evaluated on val (and test), resumable."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from helpers.config.experiments import make_config, setting
from helpers.core.models import set_trainable
from helpers.data.datasets import Data, augment_generator, step_batches
from helpers.training.loop import NonFiniteLossError, evaluate, lr_at, train_steps
from helpers.training.resumable import begin_run, loop_inputs, resumable_loop
from helpers.training.runs import Run


def run_centralized(
    config: dict | None = None, *, run_root: str | Path | None = None, progress: bool = True, **overrides
) -> Run:
    """Train (or resume, or skip if done) one centralized run; returns its Run (metrics, summary)."""
    run, inputs = begin_run("centralized", config or make_config("centralized", **overrides), run_root)
    if inputs is None:
        return run
    config, (data, model) = run.config, inputs
    params = set_trainable(model, config["train_mode"])
    optimizer = torch.optim.SGD(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    return centralized_training(run, model, data, optimizer, progress=progress)


def centralized_training(
    run: Run, model: torch.nn.Module, data: Data, optimizer: torch.optim.Optimizer, *, progress: bool = True
) -> Run:
    """The resumable epoch loop (training.resumable; the optimizer is checkpointed too). Trains what `optimizer` holds.

    `model` comes in at its initial state (e.g. with a fitted head) and `optimizer` may be SparseSGDM, so
    the same loop serves dense and sparse fine-tuning. A checkpoint, if any, replaces both states.
    Head-only runs train model.head on cached backbone features (helpers.training.features); checkpoints hold the model.
    """
    config = run.config
    net, inputs, scaler = loop_inputs(run, model, data)
    epochs, batch = config["epochs"], config["batch_size"]
    steps = math.ceil(len(data.train_y) / batch)
    schedule = dict(
        base_lr=config["lr"],
        total_steps=epochs * steps,
        scheduler=config["scheduler"],
        warmup_steps=config["warmup_epochs"] * steps,
        step_size=config["step_size"] * steps,
        gamma=config["gamma"],
    )

    def one_epoch(epoch: int) -> dict:
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
                amp=setting(config, "amp"),
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"epoch {epoch + 1}: {exc}") from None
        row = {"epoch": epoch + 1, "current_lr": lrs[-1], "train_loss": train_loss}
        last = epoch + 1 == epochs
        if (epoch + 1) % config["eval_every"] == 0 or last:
            row.update(_eval(net, inputs.val_x, inputs.val_y, "val", config))
        if config["eval_test"] or last:  # the test set only for final numbers, unless curves are asked for
            row.update(_eval(net, inputs.test_x, inputs.test_y, "test", config))
        return row

    show = ("train_loss", "val_acc", "test_acc")
    extra = {"optimizer": optimizer}
    return resumable_loop(run, model, one_epoch, unit="epoch", extra=extra, scaler=scaler, show=show, progress=progress)


def _eval(model, x, y, split: str, config: dict) -> dict[str, float]:
    m = evaluate(model, x, y, img_size=config["img_size"], batch_size=config["eval_batch_size"],
                 amp=setting(config, "amp"))  # fmt: skip
    return {f"{split}_loss": m["loss"], f"{split}_acc": m["acc"]}
