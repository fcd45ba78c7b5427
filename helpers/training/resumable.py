"""The resumable-run skeleton every runner shares: open the run and build its inputs, then the checkpointed loop.

A runner supplies only what differs: its step function (one epoch, one round) and its extra checkpointed state.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from numbers import Real
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from helpers.config.experiments import setting
from helpers.core.models import build_model
from helpers.core.precision import make_scaler, resolve_amp, use_deterministic
from helpers.core.seeding import derive_seed
from helpers.data.datasets import Data, load_data, no_data, pick_device
from helpers.training.features import head_view
from helpers.training.leases import claim, release_run
from helpers.training.loop import NonFiniteLossError
from helpers.training.runs import (
    CheckpointClock,
    Run,
    announce_start,
    load_checkpoint,
    mark_done,
    open_run,
    save_checkpoint,
    write_metrics,
)


class Stateful(Protocol):
    """What a runner may register as extra checkpointed state (an optimizer, a GradScaler)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_seeded_model(config: dict, device: torch.device) -> nn.Module:
    """The config's model with its random parts (head, or all of the tiny ViT) drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config["seed"], "init"))
        model = build_model(
            config["model"], num_classes=100, pretrained=config["pretrained"], img_size=config["img_size"]
        )
    return model.to(device)


def run_inputs(config: dict, data_here: bool = True) -> tuple[Data, nn.Module]:
    """What every runner starts from: the config's data on its device (none if not `data_here`: every split is on
    the clients) and its seeded model there."""
    device = pick_device(config["device"])
    data = load_data(config, device) if data_here else no_data("evaluation='clients' with remote clients")
    return data, build_seeded_model(config, device)


def begin_run(
    experiment: str, config: dict, run_root: str | Path | None, data_here: bool = True
) -> tuple[Run, tuple[Data, nn.Module] | None]:
    """Open (or find) the run and claim it (training.leases); unless it is done or another session holds it, also
    build its inputs (data unless not `data_here`, seeded model), else None.

    The config's `deterministic` is applied here, before any CUDA work (process-wide: see precision.use_deterministic).
    """
    run = open_run(experiment, config, run_root)
    if run.done or not claim(run):
        return run, None
    try:
        use_deterministic(setting(config, "deterministic"))
        return run, run_inputs(run.config, data_here)
    except BaseException:  # e.g. the download failed: another session may try at once
        release_run(run)
        raise


def loop_inputs(run: Run, model: nn.Module, data: Data) -> tuple[nn.Module, Data, torch.amp.GradScaler | None]:
    """What a loop trains, on what, with which scaler: (model.head, cached features) for head-only runs, else
    (model, images), compiled if the config asks; a GradScaler in fp16 (carried over steps, so it is checkpointed)."""
    net, inputs = head_view(model, data, run.config, run.root)
    if run.config["compile"]:
        net.compile()  # in place: parameter names, checkpoints and the optimizer are unchanged
    return net, inputs, make_scaler(next(model.parameters()).device, setting(run.config, "amp"))


def resumable_loop(
    run: Run,
    model: nn.Module,
    step_fn: Callable[[int], dict],
    *,
    unit: str,
    extra: Mapping[str, Stateful] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    show: tuple[str, ...] = (),
    progress: bool = True,
) -> Run:
    """Run step_fn(0-based step) -> metrics row for the config's `{unit}s` steps, resuming from the checkpoint.

    Checkpoints hold model, `extra` states (by their keys), `unit` (steps done), metrics, elapsed, scaler and the
    precision trained in; the metrics file is rewritten after every step; done.json gets the last row and the precision
    (and names those files: helpers.training.runs). `progress`: a tqdm bar where it can redraw (a notebook, a
    terminal), else one line per step on stderr (a log, a pipe) naming the `show` row keys. The run's lease is
    released at the end, or when the loop stops early (another session may resume it at once).
    """
    try:
        return _loop(run, model, step_fn, unit=unit, extra=extra or {}, scaler=scaler, show=show, progress=progress)
    finally:
        release_run(run)


def _loop(run, model, step_fn, *, unit, extra, scaler, show, progress) -> Run:
    """resumable_loop's body."""
    total = run.config[f"{unit}s"]
    rows, start, elapsed = [], 0, 0.0
    device = next(model.parameters()).device
    precision = resolve_amp(setting(run.config, "amp"), device)
    state = load_checkpoint(run, map_location=device)
    if state is not None:
        check_precision(run, state, precision, unit)
        model.load_state_dict(state["model"])
        for key, obj in extra.items():
            obj.load_state_dict(state[key])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rows, start, elapsed = state["metrics"], state[unit], state["elapsed"]
    announce_start(run, state)
    write_metrics(run, rows)  # drops rows written after the checkpoint we resume from
    clock = CheckpointClock(run.config["checkpoint_every"], run.config["checkpoint_minutes"])
    drawn = progress and interactive()
    bar = tqdm(range(start, total), desc=f"{run.experiment} {run.id}", disable=not drawn, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        try:
            row = step_fn(step)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"run {run.id}, {exc}") from None
        elapsed += time.perf_counter() - t0
        row["elapsed_s"] = round(elapsed, 3)
        rows.append(row)
        bar.set_postfix({k: round(row[k], 4) for k in show if k in row})
        if progress and not drawn:
            print(step_line(run, unit, step + 1, total, row, show), file=sys.stderr, flush=True)
        if clock.due(step + 1, final=step + 1 == total):
            state = {"model": model.state_dict(), **{k: obj.state_dict() for k, obj in extra.items()}}
            state.update({unit: step + 1, "metrics": rows, "elapsed": elapsed})
            save_checkpoint(run, {**state, "scaler": scaler.state_dict() if scaler else None, "precision": precision})
        write_metrics(run, rows)
    mark_done(run, {**rows[-1], "run_id": run.id, "precision": precision})
    return run


def interactive() -> bool:
    """Whether a progress bar can redraw in place: in a notebook's kernel (tqdm.auto draws a widget, as in Colab) or
    on a terminal. Elsewhere (a log file, a pipe) a bar would leave a line of carriage returns."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return (shell is not None and "IPKernelApp" in shell.config) or sys.stderr.isatty()


def step_line(run: Run, unit: str, done: int, total: int, row: dict, show: tuple[str, ...]) -> str:
    """E.g. '[round 3/10] fedavg 3f2a1b2c3d4e: train_loss=2.31 val_acc=0.0425 (8.4 s)'."""
    values = [f"{k}={row[k]:.4g}" for k in show if isinstance(row.get(k), Real) and math.isfinite(row[k])]
    return f"[{unit} {done}/{total}] {run.experiment} {run.id}: {' '.join(values)} ({row['elapsed_s']:.1f} s)"


def check_precision(run: Run, state: dict, precision: str, unit: str) -> None:
    """Refuse to resume a checkpoint trained in another precision (only amp=auto on another kind of device can):
    one run's rows would mix precisions. Checkpoints from before precision was recorded are not checked."""
    recorded = state.get("precision")
    if recorded is None or recorded == precision:
        return
    amp = setting(run.config, "amp")
    raise RuntimeError(
        f"run {run.id} was trained in {recorded} up to {unit} {state[unit]}, but amp={amp!r} gives {precision} on "
        f"this device: resuming would mix precisions in one run. Resume it on a device where amp={amp!r} gives "
        f"{recorded} (auto: fp16 on GPUs below sm_80 such as a T4, bf16 on sm_80+, fp32 on CPU), or delete "
        f"{run.dir} to restart it."
    )
