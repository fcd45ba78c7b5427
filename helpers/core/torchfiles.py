"""Torch files in folders other people and machines can write (a shared Drive, a node's state-dir): the one writer
and the one loader. The loader never executes code: `torch.load(weights_only=True)` builds tensors, numbers,
strings and containers only, and refuses a pickle that names anything else (a planted `__reduce__` payload).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from helpers.core.storage import atomic_write, read_bytes


class UnreadableFile(ValueError):
    """A torch file that is truncated, corrupt, or refused because it holds more than plain data."""


def plain_data(obj: object) -> object:
    """`obj` with numpy scalars as Python numbers (weights_only refuses numpy types); tensors and the rest as they
    are. Applied before saving, so every file this project writes loads safely."""
    if isinstance(obj, dict):
        return {k: plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_data(v) for v in obj)
    return obj.item() if isinstance(obj, np.generic) else obj


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(plain_data(obj), buffer)
    return buffer.getvalue()


def save_torch(path: Path, obj: object) -> None:
    """Write `obj` as a torch file, atomically and retried (storage.atomic_write)."""
    atomic_write(path, torch_bytes(obj))


def torch_from_bytes(data: bytes, path: Path, map_location: str | torch.device | None = "cpu") -> object:
    """The object in a torch file's bytes, or UnreadableFile naming `path` and why (never runs code)."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a foreign pickle, refused below anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        if named:  # a pickle that would import and call something: a planted payload, or not our file
            raise UnreadableFile(f"{path} was refused (it names {named.group(1)}, which is code, not data): a file "
                                 "that could run code is never unpickled") from None  # fmt: skip
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        why = detail.group(1).strip() if detail else "not plain tensors and numbers"
        raise UnreadableFile(f"{path} is unreadable (UnpicklingError: {why})") from None
    except Exception as exc:  # truncated zip, garbage bytes, a wrong magic number
        raise UnreadableFile(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None


def load_torch(path: Path, map_location: str | torch.device | None = "cpu") -> object:
    """The object in a torch file: read with retries (a Drive error is not a corrupt file), loaded safely."""
    return torch_from_bytes(read_bytes(path), path, map_location)
