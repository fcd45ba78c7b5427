"""Run folders keyed by a config hash: atomic checkpoints with fallback, metrics, done marker, finding runs.

A session writes its own files, named by its lease token (checkpoint-<token>-<steps done>.pt, metrics-<token>.csv),
and done.json names the ones that count (with the metrics' hash): a session that lost the run and writes late
replaces nobody's file, and readers follow done.json. Runs written before files carried a token (checkpoint.pt,
checkpoint.prev.pt, metrics.csv, done.json without names) resume and read as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
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
from helpers.core.storage import atomic_write, exists, read_bytes, remove_file
from helpers.core.torchfiles import UnreadableFile, load_torch, save_torch

CHECKPOINT, PREVIOUS, METRICS = "checkpoint.pt", "checkpoint.prev.pt", "metrics.csv"  # runs from before tokens
DONE, FILES = "done.json", "files"  # done.json's FILES entry names the run's authoritative files
UNCLAIMED = "local"  # the token part of files written without a lease (benchmarks, tests)
TOKENED_CHECKPOINT = re.compile(r"checkpoint-(?P<token>[0-9A-Za-z]+)-(?P<step>\d+)\.pt")
TOKENED_METRICS = re.compile(r"metrics-[0-9A-Za-z]+\.csv")


def run_id(config: dict) -> str:
    """Short hash of the canonical config (bookkeeping parameters such as device excluded)."""
    text = json.dumps(hashed_items(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Claim(Protocol):
    """A session's hold on a run (helpers.training.leases.Lease): checked before every write into its folder; its
    token names the files the session writes."""

    token: str

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
    # the files this session wrote or resumed from, as done.json will name them ({FILES} entry)
    written: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def root(self) -> Path:
        """The run root this run lives under (<root>/<experiment>/<run_id>)."""
        return self.dir.parent.parent

    @property
    def done(self) -> bool:
        return exists(self.dir / DONE)

    @property
    def token(self) -> str:
        """What names this session's files: its lease token (UNCLAIMED without a lease)."""
        return self.claim.token if self.claim is not None else UNCLAIMED

    def summary(self) -> dict:
        """The final metrics written by mark_done (an error naming the run if it is not finished)."""
        if not self.done:
            raise RuntimeError(
                f"{describe(self.experiment, self.config, self.id)} is not finished: another session may be "
                "training it (python -m helpers status); run this again when it is done"
            )
        summary = json.loads(read_bytes(self.dir / DONE))
        summary.pop(FILES, None)
        return summary

    def metrics(self) -> pd.DataFrame:
        """The per-epoch/round metrics: done.json's file once finished (checked against its hash), else the
        newest written so far."""
        data = metrics_bytes(self.dir)
        if not data.strip():  # killed before its first row
            return pd.DataFrame()
        return pd.read_csv(io.BytesIO(data), dtype={"clients": str})


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
        if config.get("train_mode") == "head":  # a sparse FedAvg run's step 0 (helpers.editing.step0)
            parts.append("head only")
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
    if (folder / DONE).exists():
        return "done"
    return "started" if checkpoint_files(folder) else "new"


def check_holder(run: Run) -> None:
    """Check this session still holds the run (if it claimed it): one that lost it stops before writing."""
    if run.claim is not None:
        run.claim.check()


def done_files(folder: Path) -> dict:
    """done.json's names of the run's authoritative files ({} if not done, or done before files were named)."""
    if not exists(folder / DONE):
        return {}
    try:
        files = json.loads(read_bytes(folder / DONE)).get(FILES, {})
    except (ValueError, AttributeError):  # not JSON, or not an object: Run.summary says so
        return {}
    if not isinstance(files, dict):
        return {}
    # names of this folder's own kinds of file only: a planted done.json must not point a reader elsewhere
    ok = {
        "checkpoint": re.compile(rf"{TOKENED_CHECKPOINT.pattern}|{re.escape(CHECKPOINT)}|{re.escape(PREVIOUS)}"),
        "metrics": re.compile(rf"{TOKENED_METRICS.pattern}|{re.escape(METRICS)}"),
        "metrics_sha256": re.compile(r"[0-9a-f]{64}"),
    }
    return {k: v for k, v in files.items() if k in ok and isinstance(v, str) and ok[k].fullmatch(v)}


def steps_done(state: dict) -> int:
    """The rounds or epochs a checkpoint state has completed (0 if it names neither)."""
    return int(state.get("round", state.get("epoch", 0)))


def checkpoint_steps(folder: Path) -> list[tuple[int, str, Path]]:
    """(steps done, token, path) of every tokened checkpoint in the folder, newest first."""
    found = []
    for path in folder.glob("checkpoint-*.pt"):
        if match := TOKENED_CHECKPOINT.fullmatch(path.name):
            found.append((int(match["step"]), match["token"], path))
    return sorted(found, key=lambda item: (-item[0], item[2].name))


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints to resume from, best first: done.json's, then the most steps done (whichever session wrote
    it: every step is deterministic), then a run's from before tokens (checkpoint.pt, checkpoint.prev.pt)."""
    order = [path for _, _, path in checkpoint_steps(folder)]
    order += [folder / name for name in (CHECKPOINT, PREVIOUS) if (folder / name).exists()]
    named = done_files(folder).get("checkpoint")
    if named and folder / named in order:
        order.remove(folder / named)
        order.insert(0, folder / named)
    return order


def save_checkpoint(run: Run, state: dict) -> None:
    """Write this session's checkpoint (atomic; a new name per step, so no rename can replace another session's),
    then drop the checkpoints its last two supersede."""
    check_holder(run)
    path = run.dir / f"checkpoint-{run.token}-{steps_done(state)}.pt"
    save_torch(path, state)  # the new file is whole on disk before anything is removed
    run.written["checkpoint"] = path.name
    prune_checkpoints(run)


def prune_checkpoints(run: Run) -> None:
    """Keep this session's two newest checkpoints (the fallback for a corrupt newest) and any with more steps;
    remove the older ones of every session, and the untokened ones of an older run once two are its own."""
    everything = checkpoint_steps(run.dir)
    own = [step for step, token, _ in everything if token == run.token]
    if len(own) < 2:
        return
    keep_from = own[1]  # the older of the two newest
    stale = [path for step, _, path in everything if step < keep_from]
    stale += [run.dir / name for name in (CHECKPOINT, PREVIOUS) if (run.dir / name).exists()]
    for path in stale:
        remove_file(path)


def load_checkpoint(run: Run, map_location: str | torch.device = "cpu") -> dict | None:
    """The best readable checkpoint (checkpoint_files' order). One that is truncated, corrupt or refused (it
    holds more than plain data: it is never unpickled) is skipped with a warning naming it and why; if none is
    readable the run starts over (None), as it does with no checkpoint."""
    errors = []
    for path in checkpoint_files(run.dir):
        try:
            state = load_torch(path, map_location)  # Drive errors are retried there, not mistaken for corruption
            if not isinstance(state, dict):
                raise UnreadableFile(f"{path} holds a {type(state).__name__}, not a checkpoint")
        except UnreadableFile as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"checkpoint skipped: {errors[0]}; resuming from {path.name}", stacklevel=2)
        run.written["checkpoint"] = path.name
        return state
    if errors:
        warnings.warn(f"no readable checkpoint ({'; '.join(errors)}): run {run.id} starts over", stacklevel=2)
    return None


def metrics_file(folder: Path) -> Path | None:
    """The metrics file a reader takes: done.json's once done (metrics.csv for runs done before files were named),
    else the one written last; None if there is none yet."""
    if exists(folder / DONE):
        return folder / done_files(folder).get("metrics", METRICS)
    written = [p for p in [*folder.glob("metrics-*.csv"), folder / METRICS] if p.exists()]
    return max(written, key=lambda p: p.stat().st_mtime_ns, default=None)


def metrics_bytes(folder: Path) -> bytes:
    """The bytes of metrics_file (b"" if none yet). Once done they must match done.json's hash: a copy that has not
    reached this machine yet (or was replaced) is retried, then a StorageError naming it."""
    path, want = metrics_file(folder), done_files(folder).get("metrics_sha256")
    if path is None or (want is None and not path.exists()):
        return b""
    return read_bytes(path, sha256=want)


def write_metrics(run: Run, rows: list[dict]) -> None:
    """Rewrite this session's metrics file atomically from the rows kept in the checkpoint state (no duplicates on
    resume)."""
    check_holder(run)
    data, name = pd.DataFrame(rows).to_csv(index=False).encode(), f"metrics-{run.token}.csv"
    atomic_write(run.dir / name, data)
    run.written.update(metrics=name, metrics_sha256=hashlib.sha256(data).hexdigest())


def mark_done(run: Run, summary: dict) -> None:
    """Write done.json (starting this run again loads it instead of training): `summary` and the names of the files
    this session wrote (over those of an earlier done.json it amends); once it wrote the metrics, the files of other
    sessions go."""
    check_holder(run)
    files = {**done_files(run.dir), **run.written}
    body = {**summary, FILES: files} if files else summary
    atomic_write(run.dir / DONE, json.dumps(body, indent=1, sort_keys=True).encode())
    if "metrics" in run.written:
        remove_others(run.dir, files)


def remove_others(folder: Path, files: dict) -> None:
    """Remove the checkpoints and metrics done.json's `files` do not name: other sessions' and an older run's (the
    checkpoints of the session that wrote the named one stay: its last two)."""
    named = TOKENED_CHECKPOINT.fullmatch(files.get("checkpoint", ""))
    others = [p for _, token, p in checkpoint_steps(folder) if named is None or token != named["token"]]
    others += [*folder.glob("metrics-*.csv"), *(folder / name for name in (CHECKPOINT, PREVIOUS, METRICS))]
    for path in others:
        if path.exists() and path.name not in (files.get("checkpoint"), files.get("metrics")):
            remove_file(path)


def save_artifact(run: Run, name: str, obj: object) -> None:
    """Atomically write a torch-saved object into the run folder (e.g. masks and the step-0 head)."""
    check_holder(run)
    save_torch(run.dir / name, obj)


def load_artifact(run: Run, name: str, map_location: str | torch.device = "cpu") -> object | None:
    """The object written by save_artifact; None if the run has none, or (with a warning naming the file and why)
    if it is unreadable or refused: it is then made again, as if it were missing."""
    path = run.dir / name
    if not path.exists():
        return None
    try:
        return load_torch(path, map_location)
    except UnreadableFile as exc:
        warnings.warn(f"{exc}; treated as missing", stacklevel=2)
        return None


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
