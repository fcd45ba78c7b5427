"""Flower in the benchmark (`python -m helpers.bench --flower`): the per-round time of the same FedAvg run on Flower's
simulation against the sequential engine, and Flower's fixed start cost (Ray, workers importing torch, data)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from helpers.federated.rounds import run_fedavg
from helpers.training.runs import Run


def seconds_per_round(run: Run) -> float:
    """Mean round time after the first (elapsed_s is cumulative; round 1 also pays for the nodes' first loads)."""
    elapsed = run.metrics()["elapsed_s"].to_numpy()
    return float((elapsed[-1] - elapsed[0]) / (len(elapsed) - 1))


def bench_flower(config: dict) -> dict:
    """Seconds per round on each engine for one FedAvg config (>= 2 rounds), their ratio, and Flower's wall time
    outside its rounds (start, connect, shutdown). Needs flwr[simulation]."""
    from helpers.flower.app import run_flower  # lazy: Flower is optional; only this measurement needs it

    if config["rounds"] < 2:
        raise ValueError(f"rounds={config['rounds']} is invalid for bench_flower: must be >= 2")
    with tempfile.TemporaryDirectory() as tmp:
        seq = run_fedavg(config, run_root=Path(tmp) / "sequential", progress=False)
        t0 = time.perf_counter()
        flw = run_flower(config, run_root=Path(tmp) / "flower", progress=False)
        wall = time.perf_counter() - t0
        seq_round, flw_round = seconds_per_round(seq), seconds_per_round(flw)
        rounds_s = float(flw.metrics()["elapsed_s"].iloc[-1])
    return {
        "flower_round_s": flw_round,
        "sequential_round_s": seq_round,
        "flower_round_overhead_ratio": flw_round / seq_round,
        "flower_fixed_s": wall - rounds_s,
    }
