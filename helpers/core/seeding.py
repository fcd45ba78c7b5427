"""Randomness as a pure function of named keys, so resumed runs need no RNG state."""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on (seed, *keys), e.g. (seed, "client", round, k).

    Integer keys count by value: numpy.int64(3), torch-derived ints and 3 give the same seed.
    """
    keys = tuple(int(k) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k for k in keys)
    text = repr((int(seed),) + keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch.Generator for the draw named by keys (CPU draws are identical on every machine)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator for the draw named by keys."""
    return np.random.default_rng(derive_seed(seed, *keys))
