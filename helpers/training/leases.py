"""Leases: which session trains a run when several (Colab sessions on one Drive folder) share a run root.

A session claims a run by writing `lease.json` into its folder (holder, machine, pid, random token, start time),
waits LEASE_SETTLE_S and reads it back: the run is its own only if the token is still its own. Nobody rewrites
lease.json after that: the holder's heartbeats go to its own `heartbeat-<token>.json`, so a session whose view of
the folder is stale never overwrites the lease of the session that took over. Another session skips a fresh lease
and takes over a stale one, resuming from the checkpoint: stale means this machine has seen the lease and its
heartbeat file unchanged for LEASE_STALE_S (its own clock: another host's clock and Drive's delay do not matter), or
its process on this machine is gone. Before every write into the folder the holder checks its token (and that no
done.json appeared) and beats when due: a session that lost the run stops. Drive gives no atomic create between
machines, so two sessions can both believe they hold a run until the next check; that changes no result, because
each writes files named by its own token (helpers.training.runs) and done.json names the ones that count.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers.core.settings import DRIVE_ROOT, env_value
from helpers.core.storage import StorageError, atomic_write, exists, read_bytes, remove_file
from helpers.training.runs import DONE, Run, describe

LEASE_FILE = "lease.json"
BEAT_PREFIX = "heartbeat-"  # heartbeat-<token>.json: the holder's heartbeats, and whether it released the run
SEEN_DIR = Path(tempfile.gettempdir()) / "flme-leases-seen"  # this machine's record of when a lease last changed
LEASE_STALE_S = 1800.0  # longer than any one step of the full study on a T4 ($FLME_LEASE_STALE_S overrides it)
SETTLE_DRIVE_S, SETTLE_LOCAL_S = 5.0, 0.2  # Drive shows another machine's write late; a local disk at once
HEARTBEAT_EVERY = 30  # heartbeats per stale period (at most one a minute)


class LeaseLost(RuntimeError):
    """This session no longer holds the run: another took it over, or finished it."""


def stale_seconds() -> float:
    """$FLME_LEASE_STALE_S, else LEASE_STALE_S: a lease without a heartbeat for this long is taken over."""
    return float(env_value("FLME_LEASE_STALE_S") or LEASE_STALE_S)


def settle_seconds(folder: Path) -> float:
    """$FLME_LEASE_SETTLE_S, else longer on Drive (another machine's lease shows late) than on a local disk."""
    if env_value("FLME_LEASE_SETTLE_S"):
        return float(env_value("FLME_LEASE_SETTLE_S"))
    return SETTLE_DRIVE_S if DRIVE_ROOT.parent in Path(folder).absolute().parents else SETTLE_LOCAL_S


def this_host() -> str:
    """This machine's name in leases: $FLME_HOST (tests pose as another machine), else its hostname."""
    return env_value("FLME_HOST") or socket.gethostname()


def worker_name() -> str:
    """Who this session is, as leases and `status` show it."""
    return env_value("FLME_WORKER") or f"{os.environ.get('USER', 'user')}@{this_host()}"


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
        """Seconds since the last heartbeat, by the holder's clock (shown to people; staleness does not use it)."""
        return max(0.0, time.time() - self.heartbeat)

    def this_process(self) -> bool:
        return self.host == this_host() and self.pid == os.getpid()

    def dead_here(self) -> bool:
        """Its process was on this machine and is gone (a restarted kernel)."""
        return self.host == this_host() and not self.this_process() and not pid_alive(self.pid)

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


def read_json(path: Path) -> dict | None:
    """A small JSON file of the lease's; None if absent, vanished meanwhile, or not a JSON object."""
    if not exists(path):
        return None
    try:
        data = json.loads(read_bytes(path))
    except (StorageError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_beat(folder: Path, token: str) -> dict | None:
    """The holder's heartbeat file ({"heartbeat": time, "beats": n, "released": bool}), None if it has none."""
    return read_json(Path(folder) / f"{BEAT_PREFIX}{token}.json")


def read_lease(folder: Path) -> LeaseInfo | None:
    """The lease in a run folder, its heartbeat the holder's latest; None if there is none, it is unreadable (a lease
    is never half written), or its holder released it."""
    data = read_json(Path(folder) / LEASE_FILE)
    try:
        info = LeaseInfo(**data) if data is not None else None
    except TypeError:  # not a lease
        return None
    beat = read_beat(folder, info.token) if info is not None else None
    if beat is not None and beat.get("released"):
        return None
    if info is not None and beat is not None and isinstance(beat.get("heartbeat"), (int, float)):
        info.heartbeat = float(beat["heartbeat"])
    return info


def unchanged_for(folder: Path) -> float:
    """Seconds this machine has seen the folder's lease and its holder's heartbeat file unchanged (0 at the first
    look, and whenever either changed since the last look), by this machine's clock. Recorded under SEEN_DIR, so
    every process here (a notebook, `work`, `status`) shares what the others saw."""
    folder = Path(folder)
    lease = read_json(folder / LEASE_FILE)
    beat = read_beat(folder, str(lease.get("token"))) if lease is not None else None
    seen = json.dumps([lease, beat], sort_keys=True)
    record = SEEN_DIR / f"{hashlib.sha256(str(folder.absolute()).encode()).hexdigest()[:24]}.json"
    last = read_json(record) if record.exists() else None
    now = time.time()
    if last is not None and last.get("seen") == seen and isinstance(last.get("since"), (int, float)):
        return max(0.0, now - last["since"])
    SEEN_DIR.mkdir(mode=0o700, exist_ok=True)
    atomic_write(record, json.dumps({"folder": str(folder), "seen": seen, "since": now}).encode())
    return 0.0


def is_stale(folder: Path, info: LeaseInfo) -> bool:
    """A lease another session may take over: its process on this machine is gone, or this machine has seen it
    unchanged for stale_seconds()."""
    return not info.this_process() and (info.dead_here() or unchanged_for(folder) >= stale_seconds())


class Lease:
    """This session's hold on one run folder (a helpers.training.runs.Claim)."""

    def __init__(self, folder: Path, info: LeaseInfo):
        self.folder, self.info, self.beat_at, self.beats = Path(folder), info, time.monotonic(), 0

    @property
    def token(self) -> str:
        return self.info.token

    @classmethod
    def acquire(cls, folder: Path) -> tuple[Lease | None, LeaseInfo | None]:
        """(the lease, the stale lease it replaced) if this session now holds the run, else (None, the holder)."""
        current = read_lease(folder)
        if current is not None and not current.this_process() and not is_stale(folder, current):
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
        appeared; beat when due. Called before every write into the run folder."""
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
            self.beat()

    def beat(self, released: bool = False) -> None:
        """Write this session's heartbeat file (never lease.json: that may be another session's by now)."""
        self.beats += 1
        beat = {"heartbeat": time.time(), "beats": self.beats, "released": released}
        atomic_write(self.folder / f"{BEAT_PREFIX}{self.token}.json", json.dumps(beat).encode())

    def release(self) -> None:
        """Let another session take the run at once: this session's heartbeat file says released (lease.json stays:
        it may be another's by now). Once the run is done nobody trains it, and the lease files go."""
        if not exists(self.folder / DONE):
            self.beat(released=True)
            return
        for path in [self.folder / LEASE_FILE, *self.folder.glob(f"{BEAT_PREFIX}*.json")]:
            remove_file(path)


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
    return ("stale" if is_stale(folder, info) else "running"), info
