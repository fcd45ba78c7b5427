"""Leases: which session trains a run when several (Colab sessions on one Drive folder) share a run root.

A session claims a run by writing `lease.json` into its folder (holder, machine, pid, random token, start and
heartbeat times), waits LEASE_SETTLE_S and reads it back: the run is its own only if the token is still its own.
Another session skips a fresh lease and takes over a stale one (no heartbeat for LEASE_STALE_S, or a dead process
on this machine), resuming from the checkpoint. Before every write into the folder the holder checks its token
(and that no done.json appeared) and refreshes the heartbeat when due: a session that lost the run stops.
Drive gives no atomic create between machines, so two sessions can both believe they hold a run until the next
check; results stay correct because every write is whole (atomic rename) and every step is deterministic.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers.core.storage import StorageError, atomic_write, exists, read_bytes, remove_file
from helpers.training.runs import DONE, DRIVE_ROOT, Run, describe

LEASE_FILE = "lease.json"
STALE_ENV, LEASE_STALE_S = "FLME_LEASE_STALE_S", 1800.0  # longer than any one step of the full study on a T4
SETTLE_ENV = "FLME_LEASE_SETTLE_S"  # wait between writing a lease and reading it back
SETTLE_DRIVE_S, SETTLE_LOCAL_S = 5.0, 0.2  # Drive shows another machine's write late; a local disk at once
HEARTBEAT_EVERY = 30  # heartbeats per stale period (at most one a minute)
WORKER_ENV = "FLME_WORKER"  # a name for this session in leases and status (e.g. a student's); default user@host
HOST_ENV = "FLME_HOST"  # this machine's name in leases (default its hostname); tests pose as another machine


class LeaseLost(RuntimeError):
    """This session no longer holds the run: another took it over, or finished it."""


def stale_seconds() -> float:
    """$FLME_LEASE_STALE_S, else LEASE_STALE_S: a lease without a heartbeat for this long is taken over."""
    return float(os.environ.get(STALE_ENV, LEASE_STALE_S))


def settle_seconds(folder: Path) -> float:
    """$FLME_LEASE_SETTLE_S, else longer on Drive (another machine's lease shows late) than on a local disk."""
    if os.environ.get(SETTLE_ENV):
        return float(os.environ[SETTLE_ENV])
    return SETTLE_DRIVE_S if DRIVE_ROOT.parent in Path(folder).absolute().parents else SETTLE_LOCAL_S


def this_host() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def worker_name() -> str:
    """Who this session is, as leases and `status` show it."""
    return os.environ.get(WORKER_ENV) or f"{os.environ.get('USER', 'user')}@{this_host()}"


@dataclass
class LeaseInfo:
    """The content of a lease file."""

    holder: str
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    def age(self) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, time.time() - self.heartbeat)

    def this_process(self) -> bool:
        return self.host == this_host() and self.pid == os.getpid()

    def stale(self) -> bool:
        """No heartbeat for stale_seconds(), or its process on this machine is gone (a restarted kernel)."""
        return self.age() > stale_seconds() or (
            self.host == this_host() and not self.this_process() and not pid_alive(self.pid)
        )

    def describe(self) -> str:
        return f"{self.holder} (pid {self.pid} on {self.host}, last heartbeat {self.age():.0f} s ago)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_lease(folder: Path) -> LeaseInfo | None:
    """The lease in a run folder; None if there is none (or it is unreadable: a lease is never half written)."""
    path = Path(folder) / LEASE_FILE
    if not exists(path):
        return None
    try:
        return LeaseInfo(**json.loads(read_bytes(path)))
    except (StorageError, ValueError, TypeError):  # vanished meanwhile (released), or not a lease
        return None


class Lease:
    """This session's hold on one run folder (a helpers.training.runs.Claim)."""

    def __init__(self, folder: Path, info: LeaseInfo):
        self.folder, self.info, self.beat_at = Path(folder), info, time.monotonic()

    @property
    def token(self) -> str:
        return self.info.token

    @classmethod
    def acquire(cls, folder: Path) -> tuple[Lease | None, LeaseInfo | None]:
        """(the lease, the stale lease it replaced) if this session now holds the run, else (None, the holder)."""
        current = read_lease(folder)
        if current is not None and not current.stale() and not current.this_process():
            return None, current
        now = time.time()
        info = LeaseInfo(worker_name(), this_host(), os.getpid(), secrets.token_hex(8), now, now)
        atomic_write(Path(folder) / LEASE_FILE, json.dumps(asdict(info)).encode())
        time.sleep(settle_seconds(folder))  # a session that wrote at the same moment: the last write wins
        back = read_lease(folder)
        if back is None or back.token != info.token:
            return None, back
        return cls(folder, info), current

    def check(self) -> None:
        """Raise LeaseLost unless the folder's lease still carries this session's token and no done.json
        appeared; refresh the heartbeat when due. Called before every write into the run folder."""
        if exists(self.folder / DONE):
            raise LeaseLost(f"{self.folder} was finished by another session; this session stops and writes nothing")
        try:
            stored = LeaseInfo(**json.loads(read_bytes(self.folder / LEASE_FILE)))
        except StorageError as exc:
            if exc.errno != errno.ENOENT:
                raise
            stored = None
        if stored is None or stored.token != self.info.token:
            who = stored.describe() if stored else "nobody (the lease file is gone)"
            raise LeaseLost(
                f"{self.folder}: this session's lease was replaced; it is now held by {who}. "
                "This session stops and writes nothing more to the run."
            )
        if time.monotonic() - self.beat_at >= stale_seconds() / HEARTBEAT_EVERY:
            self.info.heartbeat, self.beat_at = time.time(), time.monotonic()
            atomic_write(self.folder / LEASE_FILE, json.dumps(asdict(self.info)).encode())

    def release(self) -> None:
        """Delete the lease if it is still this session's (another session may take the run at once)."""
        current = read_lease(self.folder)
        if current is not None and current.token == self.info.token:
            remove_file(self.folder / LEASE_FILE)


def claim(run: Run) -> bool:
    """Claim a run that is not done for this session (run.claim is set); False, with a message naming the holder,
    if another session holds it."""
    lease, other = Lease.acquire(run.dir)
    name = describe(run.experiment, run.config, run.id)
    if lease is None:
        held = other.describe() if other else "another session"
        print(f"[held] {name}: trained by {held}; skipped here", flush=True)
        return False
    if other is not None and not other.this_process():
        print(f"[take over] {name}: the lease of {other.describe()} is stale", flush=True)
    run.claim = lease
    return True


def release_run(run: Run) -> None:
    """Give up this session's claim on a run (after done.json, or when it stops)."""
    if run.claim is not None:
        run.claim.release()
        run.claim = None


def lease_state(folder: Path) -> tuple[str, LeaseInfo | None]:
    """("running" | "stale" | "free", the lease) of a run folder, from its lease file alone."""
    info = read_lease(folder)
    if info is None:
        return "free", None
    return ("stale" if info.stale() else "running"), info
