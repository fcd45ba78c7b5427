"""File I/O for run folders on a flaky shared drive: atomic writes, and retries with backoff on transient errors.

Google Drive (FUSE in Colab) times out, raises `OSError`s and shows a file written from another machine late.
Every run-folder read and write goes through `retried`; the file operations themselves go through `OPS`, the one
seam where tests inject faults (`storage.OPS = SomeFaultyOps()`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from helpers.core.settings import io_retry_wait_seconds

ATTEMPTS = 6  # about 15 s of backoff in all at the default wait: longer than a Drive hiccup, short for a session
RETRY_WAIT_S = 0.5
# Errors retrying cannot fix: the disk is full, read-only, or forbids the write.
PERMANENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}
T = TypeVar("T")


class StorageError(OSError):
    """A file operation that still failed after every retry."""


class FileOps:
    """The plain file operations run folders use, one attempt each."""

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def read(self, path: Path) -> bytes:
        return Path(path).read_bytes()

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def exists(self, path: Path) -> bool:
        return Path(path).exists()


OPS = FileOps()


def transient(exc: BaseException) -> bool:
    """An error worth retrying: timeouts, dropped connections, I/O errors, a file briefly missing (not a full disk)."""
    return isinstance(exc, OSError) and not isinstance(exc, StorageError) and exc.errno not in PERMANENT


def retried(what: str, fn: Callable[[], T]) -> T:
    """fn() retried with exponential backoff on transient errors; StorageError naming `what` when they persist."""
    wait = io_retry_wait_seconds(RETRY_WAIT_S)

    def warn(state) -> None:
        exc = state.outcome.exception()
        print(f"[retry] {what}: {type(exc).__name__}: {exc}; retrying in {state.next_action.sleep:.2g} s",
              file=sys.stderr, flush=True)  # fmt: skip

    retrying = Retrying(
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential(multiplier=wait, max=max(wait, 8 * wait)),
        retry=retry_if_exception(transient),
        before_sleep=warn,
        reraise=True,
    )
    try:
        return retrying(fn)
    except OSError as exc:
        if not transient(exc):
            raise
        raise StorageError(exc.errno, f"{what} failed {ATTEMPTS} times, last: {type(exc).__name__}: {exc}") from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Write temp file, fsync, rename, retried as a whole: a crash leaves the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")

    def attempt() -> None:
        OPS.write(tmp, data)
        OPS.replace(tmp, path)

    try:
        retried(f"writing {path}", attempt)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def read_bytes(path: Path, sha256: str | None = None) -> bytes:
    """A file's bytes, retried (a file another machine just wrote may be briefly missing). With `sha256`, content
    that differs (a copy still syncing, or replaced) is retried too, then a StorageError naming the file."""

    def attempt() -> bytes:
        data = OPS.read(Path(path))
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise OSError(errno.ESTALE, f"its content is not the one expected (sha256 {sha256[:12]}...)", str(path))
        return data

    return retried(f"reading {path}", attempt)


def exists(path: Path) -> bool:
    """Whether a file is there, as this machine sees the folder now (through OPS: tests serve stale views)."""
    return OPS.exists(Path(path))


def remove_file(path: Path) -> None:
    """Remove a file if it is there, retried."""
    retried(f"removing {path}", lambda: OPS.remove(Path(path)))


def fsync_dir(folder: Path) -> None:
    """Make a rename durable where the file system allows it (best effort: Drive cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (Drive FUSE, Windows) cannot open folders: rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
