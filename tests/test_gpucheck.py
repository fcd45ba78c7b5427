"""python -m helpers.gpucheck on the CPU (smoke): every check runs and passes, its JSON holds them; a check can fail."""

from __future__ import annotations

import json

import torch

from helpers.ops import gpucheck


def test_the_cpu_run_passes_every_check_and_writes_its_json(tmp_path, capsys):
    assert gpucheck.main(["--device", "cpu", "--profile", "smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("smoke-*.json")
    result = json.loads(path.read_text())
    checks = {row["check"]: row["passed"] for row in result["checks"]}
    rounds = [f"{kind} {amp}" for kind in ("FedAvg round", "sparse round") for amp in ("fp32", "bf16", "fp16")]
    assert set(rounds) < set(checks) and all(checks[name] for name in rounds)
    assert checks["vectorised scoring = per-sample loop"] and checks["kill and resume (deterministic)"]
    assert checks["full-profile phases under 15 GiB"] is None  # needs CUDA
    assert {"train_images_per_s fp16", "scoring_speedup", "fedavg_overhead_ratio"} <= set(result["figures"])
    assert "all checks passed" in capsys.readouterr().out


def test_a_round_outside_its_tolerance_fails(monkeypatch):
    monkeypatch.setattr(gpucheck, "TOLERANCE", {"fp16": 1e-12})
    rows = gpucheck.check_rounds("smoke", torch.device("cpu"))
    assert [r["passed"] for r in rows] == [False, False] and all("tolerance 1e-12" in r["detail"] for r in rows)
