"""A Flower node's disk cache between messages (issue 37). flwr 1.41 starts one ClientApp process per message, so what
a node derives once per run (its client's rows of the data, the setup's frozen weights and mask) is kept in files on
its own disk, in the run's folder, and trusted only through the SHA-256 its Context records: the Context is the
SuperNode's, one per Flower run, so a file of another run, of a SuperNode restarted since, or changed on disk is never
read. Files are loaded with torch.load(weights_only=True): no code runs."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from helpers.core.settings import env_value

try:
    from flwr.app import ConfigRecord, Context
except ImportError:  # helpers.flower.server says what to install; this module is only reached through it
    ConfigRecord = Context = None

CACHE_ENV = "FLME_NODE_CACHE"  # "0": rebuild the client's data at every message (the state before issue 37)


def data_cache_on() -> bool:
    """Whether a node keeps its client's data between messages ($FLME_NODE_CACHE, default on)."""
    return (env_value(CACHE_ENV) or "1") != "0"


class NodeCache:
    """Named tensor dicts of one run on one node: files under `folder`, their hashes in `context.state[key]`."""

    def __init__(self, folder: Path, context: Context, key: str):
        self.folder, self.context, self.key = Path(folder), context, key

    def hashes(self) -> ConfigRecord:
        return self.context.state[self.key] if self.key in self.context.state else ConfigRecord()

    def path(self, name: str, digest: str) -> Path:
        return self.folder / f"{name}-{digest[:16]}.pt"

    def put(self, name: str, tensors: Mapping[str, Tensor]) -> None:
        """Write `tensors` (on the CPU) and record their content hash for the later messages of this run."""
        buffer = io.BytesIO()
        torch.save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, buffer)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(name, digest)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)  # no fsync: a torn file fails its hash and is rebuilt
        os.replace(tmp, path)
        hashes = self.hashes()
        hashes[name] = digest
        self.context.state[self.key] = hashes

    def has(self, name: str) -> bool:
        return name in self.hashes()

    def get(self, name: str) -> dict[str, Tensor] | None:
        """The tensors put under `name` in this run, or None: never put, file gone, or content not the one put."""
        digest = self.hashes().get(name)
        if digest is None:
            return None
        try:
            data = self.path(name, str(digest)).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            return None
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
