"""Timestamps of a Flower round's parts (issue 37): with FLME_FLOWER_TIMING=<file>, the ServerApp and every ClientApp
process append one JSON line per event (helpers.ops.bench_federation reads them into a round's breakdown). Standard
library only: a ClientApp imports this module before anything heavy, so its import time marks where ours begin."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from helpers.core.settings import env_value

TIMING_ENV = "FLME_FLOWER_TIMING"
IMPORTED_AT = time.time()  # when this process started importing our ClientApp/ServerApp module (helpers.flower.app)


def timing_on() -> bool:
    return bool(env_value(TIMING_ENV))


def mark(event: str, **fields) -> None:
    """Append {"t", "pid", "event", "load" (the machine's 1-minute load average), **fields} to $FLME_FLOWER_TIMING
    (nothing without it). One short append per line: lines of concurrent processes never interleave (O_APPEND)."""
    path = env_value(TIMING_ENV)
    if not path:
        return
    stamp = {"t": time.time(), "pid": os.getpid(), "event": event, "load": os.getloadavg()[0]}
    line = json.dumps({**stamp, **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def process_started() -> float | None:
    """This process's start as a Unix time (Linux: /proc, 1/CLK_TCK resolution), or None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # btime in /proc/stat is whole seconds only
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def mark_handler(message_id: str) -> None:
    """A ClientApp handler starts on message `message_id`: also when its process started and began importing ours."""
    if timing_on():
        mark("handler", id=message_id, started=process_started(), imported=IMPORTED_AT)
