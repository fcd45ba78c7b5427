"""The remedies comparison of 05 and the report: each federated algorithm (helpers.algorithms) dense and with the
best sparse mask, at the hardest heterogeneity settings and the same step budget; its plan and summary table."""

from __future__ import annotations

import pandas as pd

from helpers.algorithms.registry import ALGORITHMS
from helpers.config.experiments import EXPERIMENTS, REMEDIES, make_config
from helpers.federated.rounds import rounds_for_budget
from helpers.training.runs import Run, last_rows, tidy_results

SMOKE_ALGORITHMS = ("fedavg", "scaffold", "fedadam")  # the smoke pipeline's share: a client side, a server optimizer
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")  # server optimizers whose step is ~ server_lr per entry


def remedy_algorithms(profile: str, chosen: list | None) -> list[str]:
    """The algorithms to compare: `chosen`, or every one (full) / SMOKE_ALGORITHMS (smoke) when None."""
    if chosen is None:
        return list(ALGORITHMS) if profile == "full" else list(SMOKE_ALGORITHMS)
    return list(chosen)


def remedy_plan(
    base: dict, algorithms: list[str], classes: list[int], local_steps: int, adaptive_lr: float
) -> list[dict]:
    """sparse_fedavg configs: per algorithm and Nc in `classes`, the dense control (sparsity 0, step-0 head) and
    `base`'s sparse run, with `local_steps` and the rounds that keep base's step budget (J x rounds); the adaptive
    server optimizers take server_lr=`adaptive_lr` (their step does not shrink with the pseudo-gradient)."""
    shared = {k: v for k, v in base.items() if k in EXPERIMENTS["sparse_fedavg"] and k not in REMEDIES}
    rounds = rounds_for_budget(base["rounds"] * base["local_steps"], local_steps)
    plan = []
    for algorithm in algorithms:
        lr = {"server_lr": adaptive_lr} if algorithm in ADAPTIVE else {}
        for nc in classes:
            for sparsity in (0.0, base["sparsity"]):
                cell = dict(algorithm=algorithm, sharding="noniid", classes_per_client=nc, local_steps=local_steps,
                            rounds=rounds, sparsity=sparsity)  # fmt: skip
                plan.append(make_config("sparse_fedavg", **{**shared, **lr, **cell}))
    return plan


def with_algorithm(table: pd.DataFrame) -> pd.DataFrame:
    """`algorithm` on every row (FedAvg runs leave it out of their configs)."""
    return table.assign(algorithm=table["algorithm"].fillna("fedavg") if "algorithm" in table else "fedavg")


def remedy_table(runs: list[Run]) -> pd.DataFrame:
    """Final test accuracy per algorithm (rows) and Nc x dense/sparse (columns), with each run's total upload."""
    final = with_algorithm(last_rows(tidy_results(runs)))
    total = tidy_results(runs).groupby("run_id")["upload_bytes"].sum().div(2**20)
    final = final.assign(kind=final["sparsity"].map(lambda s: "sparse" if s > 0 else "dense"),
                         upload_mib=final["run_id"].map(total))  # fmt: skip
    order = list(dict.fromkeys(final["algorithm"]))
    wide = final.pivot_table(index="algorithm", columns=["classes_per_client", "kind"],
                             values=["test_acc", "upload_mib"])  # fmt: skip
    return wide.reindex(order)
