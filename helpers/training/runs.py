"""Run folders keyed by a config hash: atomic checkpoints with fallback, metrics, done marker, finding runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch

from helpers.config.experiments import hashed_items
from helpers.core.params import PARAMS, omitted_defaults
from helpers.core.settings import default_run_root
from helpers.core.storage import OPS, atomic_write, fsync_dir, read_bytes, retried

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def run_id(config: dict) -> str:
    """Short hash of the canonical config (bookkeeping parameters such as device excluded)."""
    text = json.dumps(hashed_items(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Claim(Protocol):
    """A session's hold on a run (helpers.training.leases.Lease): checked before every write into its folder."""

    def check(self) -> None: ...

    def release(self) -> None: ...


@dataclass
class Run:
    """One (experiment, config): its folder and the files in it."""

    experiment: str
    config: dict
    id: str
    dir: Path
    claim: Claim | None = field(default=None, repr=False, compare=False)  # this session's lease, if it trains the run

    @property
    def root(self) -> Path:
        """The run root this run lives under (<root>/<experiment>/<run_id>)."""
        return self.dir.parent.parent

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()

    def summary(self) -> dict:
        """The final metrics written by mark_done (an error naming the run if it is not finished)."""
        if not self.done:
            raise RuntimeError(
                f"{describe(self.experiment, self.config, self.id)} is not finished: another session may be "
                "training it (python -m helpers status); run this again when it is done"
            )
        return json.loads(read_bytes(self.dir / "done.json"))

    def metrics(self) -> pd.DataFrame:
        """The per-epoch/round metrics written so far."""
        path = self.dir / "metrics.csv"
        if not path.exists() or not path.read_text().strip():  # killed before its first row
            return pd.DataFrame()
        return pd.read_csv(path, dtype={"clients": str})


def open_run(experiment: str, config: dict, run_root: str | Path | None = None) -> Run:
    """The run folder for (experiment, config), created if new; refuses a folder holding another config."""
    root = Path(run_root) if run_root is not None else default_run_root()
    rid = run_id(config)
    folder = root / experiment / rid
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(
            f"run folder {folder} is not writable ({exc.strerror}). In Colab, mount Drive first; "
            f"elsewhere set FLME_RUN_ROOT or run_root to a writable folder."
        ) from None
    path = folder / "config.json"
    if path.exists():
        stored = json.loads(read_bytes(path))
        if hashed_items(stored) != hashed_items(config):
            raise ValueError(
                f"{folder} holds a run with a different config; refusing to resume into it. "
                "Delete that folder or use another run_root."
            )
    else:
        atomic_write(path, json.dumps(config, indent=1, sort_keys=True).encode())
    run = Run(experiment, config, rid, folder)
    if run.done:
        print(f"[skip] {describe(experiment, config, rid)}: done", flush=True)
    return run


def describe(experiment: str, config: dict, rid: str | None = None) -> str:
    """One line naming a run and what it is, e.g. "fedavg 3f2a1b2c3d4e (K=100 C=0.1 J=4 iid, lr=0.01, seed 0)"."""
    parts = []
    if "num_clients" in config:
        sharding = config["sharding"]
        if sharding == "noniid":
            sharding = f"noniid Nc={config['classes_per_client']}"
        elif sharding == "dirichlet":
            sharding = f"dirichlet alpha={config['dirichlet_alpha']:g}"
        parts.append(f"K={config['num_clients']} C={config['participation']:g} J={config['local_steps']} {sharding}")
    elif config.get("train_mode") == "head":
        parts.append("linear probe")
    if "sparsity" in config:
        rule = f"sparsity {config['sparsity']:g} {config['mask_rule']} R={config['calibration_rounds']}"
        parts.append("dense, step-0 head frozen" if config["sparsity"] == 0 else rule)
    if "scheduler" in config:
        parts.append(config["scheduler"])
    parts.append(f"lr={config['lr']:g}, seed {config['seed']}")
    return f"{experiment} {rid or run_id(config)} ({', '.join(parts)})"


def announce_start(run: Run, state: dict | None) -> None:
    """Print where a run starts: fresh, or from which epoch/round of how many (the checkpoint it resumes)."""
    unit = "round" if "rounds" in run.config else "epoch"
    total = run.config[f"{unit}s"]
    if state is None:
        print(f"[start] {describe(run.experiment, run.config, run.id)}: {total} {unit}{'s' * (total != 1)}", flush=True)
    else:
        print(f"[resume] {describe(run.experiment, run.config, run.id)}: from {unit} {state[unit]} of {total}",
              flush=True)  # fmt: skip


def run_state(experiment: str, config: dict, run_root: str | Path | None = None) -> str:
    """ "done", "started" (a checkpoint to resume from) or "new", from the files alone (creates nothing)."""
    folder = Path(run_root if run_root is not None else default_run_root()) / experiment / run_id(config)
    if (folder / "done.json").exists():
        return "done"
    return "started" if (folder / CHECKPOINT).exists() or (folder / PREVIOUS).exists() else "new"


def check_holder(run: Run) -> None:
    """Check this session still holds the run (if it claimed it): one that lost it stops before writing."""
    if run.claim is not None:
        run.claim.check()


def save_checkpoint(run: Run, state: dict) -> None:
    """Atomically replace checkpoint.pt, keeping the one before as checkpoint.prev.pt."""
    check_holder(run)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    new, current, previous = run.dir / f".{CHECKPOINT}.new", run.dir / CHECKPOINT, run.dir / PREVIOUS
    atomic_write(new, buffer.getvalue())  # the new file is whole on disk before anything is renamed

    def rotate() -> None:  # safe to repeat after a rename that happened but reported an error
        if new.exists():
            if current.exists():
                OPS.replace(current, previous)
            OPS.replace(new, current)

    retried(f"renaming {new} to {current}", rotate)
    fsync_dir(run.dir)


def load_checkpoint(run: Run, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest readable checkpoint (falls back to the previous one with a warning); None if there is none."""
    paths = [run.dir / CHECKPOINT, run.dir / PREVIOUS]
    existing = [p for p in paths if p.exists()]
    errors = []
    for path in existing:
        data = read_bytes(path)  # Drive errors are retried here, not mistaken for a corrupt file
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
        except Exception as exc:  # truncated zip, garbage bytes, unpickling errors
            errors.append(f"{path}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if errors:
            warnings.warn(f"checkpoint unreadable ({errors[0]}); resuming from {path.name}", stacklevel=2)
        return state
    if errors:
        raise RuntimeError(
            "no readable checkpoint: " + "; ".join(errors) + f". Delete {run.dir} to restart this run from scratch."
        )
    return None


def write_metrics(run: Run, rows: list[dict]) -> None:
    """Rewrite metrics.csv atomically from the rows kept in the checkpoint state (no duplicates on resume)."""
    check_holder(run)
    atomic_write(run.dir / "metrics.csv", pd.DataFrame(rows).to_csv(index=False).encode())


def mark_done(run: Run, summary: dict) -> None:
    """Write done.json: starting this run again loads it instead of training."""
    check_holder(run)
    atomic_write(run.dir / "done.json", json.dumps(summary, indent=1, sort_keys=True).encode())


def save_artifact(run: Run, name: str, obj: object) -> None:
    """Atomically write a torch-saved object into the run folder (e.g. masks and the step-0 head)."""
    check_holder(run)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(run.dir / name, buffer.getvalue())


def load_artifact(run: Run, name: str, map_location: str | torch.device = "cpu") -> object | None:
    """The object written by save_artifact, or None if the run has none."""
    path = run.dir / name
    if not path.exists():
        return None
    return torch.load(io.BytesIO(read_bytes(path)), map_location=map_location, weights_only=False)


class CheckpointClock:
    """Decides when to checkpoint: every `every` epochs/rounds and at least every `minutes` of wall time."""

    def __init__(self, every: int, minutes: float):
        self.every, self.seconds, self.last = every, minutes * 60, time.monotonic()

    def due(self, completed: int, final: bool = False) -> bool:
        if final or completed % self.every == 0 or time.monotonic() - self.last >= self.seconds:
            self.last = time.monotonic()
            return True
        return False


def find_runs(experiment: str, run_root: str | Path | None = None, *, done: bool = True, **match) -> list[Run]:
    """Runs already on disk under <run_root>/<experiment>/ whose config has every `match` key == value (and
    the old behaviour of every omitted, hashed parameter not in `match`: a FedAvg grid skips FedProx runs).

    A list, tuple or set as value means "any of these". Reads config.json only (creates nothing), so a
    notebook can collect the finished cells of a grid that other papermill executions ran. Sorted by folder.
    """
    root = Path(run_root) if run_root is not None else default_run_root()
    found = []
    for path in sorted((root / experiment).glob("*/config.json")):
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):  # a folder being created right now, or damaged: not a finished run
            continue
        ok = all(
            k in config and (config[k] in v if isinstance(v, (list, tuple, set)) else config[k] == v)
            for k, v in match.items()
        )
        # a parameter left out at its default (algorithm: FedAvg) and not asked for must be at its default
        ok = ok and all(k in match or k not in config or not PARAMS[k].hashed for k in omitted_defaults())
        run = Run(experiment, config, path.parent.name, path.parent)
        if ok and (run.done or not done):
            found.append(run)
    return found
