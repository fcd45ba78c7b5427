"""Flower's per-round overhead in the benchmark: both engines time the same run; the ratio is theirs."""

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from helpers.config.experiments import make_config  # noqa: E402
from helpers.ops.bench_flower import bench_flower  # noqa: E402


def test_flower_round_time_is_measured_against_the_sequential_engine():
    config = make_config("fedavg", "smoke", synthetic_train_size=600, synthetic_test_size=100, device="cpu",
                         num_clients=10, participation=0.3, rounds=3)  # fmt: skip
    out = bench_flower(config)
    assert out["flower_round_s"] > 0 and out["sequential_round_s"] > 0 and out["flower_fixed_s"] > 0
    assert out["flower_round_overhead_ratio"] == pytest.approx(out["flower_round_s"] / out["sequential_round_s"])
    with pytest.raises(ValueError, match=r"^rounds=1 is invalid for bench_flower: must be >= 2"):
        bench_flower({**config, "rounds": 1})
