"""The remedies comparison's plan: every algorithm dense and sparse per setting at the same step budget, one
shared step 0, each algorithm at its tuned value (the others at their defaults)."""

from __future__ import annotations

from helpers.algorithms.registry import ALGORITHMS, algorithm_class, algorithm_name
from helpers.config.experiments import make_config
from helpers.editing.step0 import head_fedavg_config
from helpers.ops.plans import remedy_algorithms, remedy_plan


def test_every_algorithm_runs_dense_and_sparse_per_setting_at_the_same_budget():
    base = make_config("sparse_fedavg", "smoke", sparsity=0.8, calibration_rounds=2)
    algorithms = remedy_algorithms("full", None)
    assert algorithms == list(ALGORITHMS) and remedy_algorithms("smoke", ["fedprox"]) == ["fedprox"]
    chosen = {"fedprox": ("prox_mu", 0.1), "fedadam": ("server_lr", 0.3)}
    plan = remedy_plan(base, algorithms, [1, 5], local_steps=8, chosen=chosen)
    cells = {(algorithm_name(c), c["classes_per_client"], c["sparsity"]) for c in plan}
    assert cells == {(a, nc, s) for a in ALGORITHMS for nc in (1, 5) for s in (0.0, 0.8)} and len(plan) == len(cells)
    for c in plan:
        assert c["local_steps"] * c["rounds"] >= base["local_steps"] * base["rounds"] > (c["rounds"] - 1) * 8
        own = {n: spec.default for n, spec in algorithm_class(algorithm_name(c)).params.items()}
        tuned = dict([chosen[algorithm_name(c)]]) if algorithm_name(c) in chosen else {}
        assert {n: c[n] for n in own} == {**own, **tuned}  # its defaults, but the tuned value
        assert c["sparsity"] == 0 or c["calibration_rounds"] == 2
    # one step 0 per setting, whatever the algorithm: the comparison differs in the remedy only
    step0 = {c["classes_per_client"]: set() for c in plan}
    for c in plan:
        step0[c["classes_per_client"]].add(tuple(sorted(head_fedavg_config(c).items())))
    assert all(len(configs) == 1 for configs in step0.values())
