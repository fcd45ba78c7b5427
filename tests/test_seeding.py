"""Seeds are a pure function of (seed, keys) with integer keys counted by value, not by type."""

from __future__ import annotations

import numpy as np
import torch

from helpers.core.seeding import derive_seed, numpy_rng, torch_generator


def test_integer_keys_hash_by_value_not_type():
    want = derive_seed(3, "client", 7, 42)
    for rnd, client in [(np.int64(7), np.int32(42)), (np.uint8(7), 42), (int(torch.tensor(7)), np.int16(42))]:
        assert derive_seed(np.int64(3), "client", rnd, client) == want
    assert torch.equal(torch.randperm(9, generator=torch_generator(0, np.int64(2))),
                       torch.randperm(9, generator=torch_generator(0, 2)))  # fmt: skip
    assert numpy_rng(0, np.int32(5)).integers(1 << 30) == numpy_rng(0, 5).integers(1 << 30)


def test_different_keys_give_different_seeds():
    seeds = {derive_seed(0, "client", r, k) for r in range(20) for k in range(20)}
    assert len(seeds) == 400
    assert derive_seed(0, "a", 1) != derive_seed(0, "a", "1") != derive_seed(0, "a", True)
    assert derive_seed(0, 1) != derive_seed(1, 1)
    assert 0 <= derive_seed(0, "x") < 2**63
