"""The remedies comparison's plan: every algorithm dense and sparse per setting at the same step budget, one
shared step 0, the adaptive server optimizers at their own server_lr."""

from __future__ import annotations

from helpers.algorithms.registry import ALGORITHMS, algorithm_name
from helpers.config.experiments import make_config
from helpers.editing.step0 import head_fedavg_config
from helpers.ops.plans import ADAPTIVE, remedy_algorithms, remedy_plan


def test_every_algorithm_runs_dense_and_sparse_per_setting_at_the_same_budget():
    base = make_config("sparse_fedavg", "smoke", sparsity=0.8, calibration_rounds=2)
    algorithms = remedy_algorithms("full", None)
    assert algorithms == list(ALGORITHMS) and remedy_algorithms("smoke", ["fedprox"]) == ["fedprox"]
    plan = remedy_plan(base, algorithms, [1, 5], local_steps=8, adaptive_lr=0.02)
    cells = {(algorithm_name(c), c["classes_per_client"], c["sparsity"]) for c in plan}
    assert cells == {(a, nc, s) for a in ALGORITHMS for nc in (1, 5) for s in (0.0, 0.8)} and len(plan) == len(cells)
    for c in plan:
        assert c["local_steps"] * c["rounds"] >= base["local_steps"] * base["rounds"] > (c["rounds"] - 1) * 8
        assert c["server_lr"] == (0.02 if algorithm_name(c) in ADAPTIVE else base["server_lr"])
        assert c["sparsity"] == 0 or c["calibration_rounds"] == 2
    # one step 0 per setting, whatever the algorithm: the comparison differs in the remedy only
    step0 = {c["classes_per_client"]: set() for c in plan}
    for c in plan:
        step0[c["classes_per_client"]].add(tuple(sorted(head_fedavg_config(c).items())))
    assert all(len(configs) == 1 for configs in step0.values())
