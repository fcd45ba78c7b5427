"""The remedies' benchmark: every algorithm timed against FedAvg, SCAFFOLD's memory from the real parameter count
and the bytes its control-variate files really take."""

from __future__ import annotations

import pytest

from helpers.algorithms.registry import ALGORITHMS
from helpers.config.experiments import make_config
from helpers.ops.bench_remedies import bench_algorithms, measured_store_bytes, scaffold_memory

SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", num_clients=6,
             participation=0.5, local_steps=2)  # fmt: skip


def test_every_algorithm_is_timed_against_fedavg():
    out = bench_algorithms(make_config("fedavg", "smoke", **SMALL), repeats=1)
    assert {k.removeprefix("round_vs_fedavg_") for k in out if k.startswith("round_vs")} == set(ALGORITHMS) - {"fedavg"}
    assert all(v > 0 for v in out.values())


def test_scaffold_memory_at_full_size_is_what_its_files_take():
    full = scaffold_memory(density=0.1, clients=100)
    assert 21e6 < full["scaffold_params"] < 23e6  # ViT-S/16 with a 100-class head
    assert full["scaffold_disk_mb_dense"] == pytest.approx(100 * 4 * full["scaffold_params"] / 2**20)
    assert full["scaffold_disk_mb_density_0.1"] < 0.1 * full["scaffold_disk_mb_dense"]
    measured = measured_store_bytes(make_config("fedavg", "smoke", **SMALL), density=0.1)
    assert measured["scaffold_store_bytes"] == measured["scaffold_store_formula_bytes"] > 0
