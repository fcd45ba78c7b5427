"""Notebook 05's comparisons at the hardest heterogeneity, on the cell of its first sparse run (its mask; rounds that
keep its step budget J x rounds at the comparison's J): the remedies against client drift, each tuned alike
(helpers.ops.tuning), and the extension, task arithmetic inside the round: FedAvg's mean against TIES-merging
(helpers.algorithms.merging), each dense (the step-0 head) and sparse, with the interference diagnostic on
(helpers.federated.interference). TIES's merge_density is tuned like a remedy's parameter: over its grid, dense, at
the hardest Nc, with TUNING_BUDGET of the rounds, on validation; both merge rules use FedAvg's server step at
server_lr 1 (TIES's lambda), so that the rule is the one difference."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from helpers.algorithms.registry import ALGORITHMS
from helpers.config.experiments import experiment_parameters, make_config, remedy_parameters
from helpers.federated.interference import PROBE_IMAGES
from helpers.federated.rounds import rounds_for_budget
from helpers.ops.tuning import TIES, tuning_grid, tuning_rounds, with_tuning
from helpers.reporting.results import editing_table, write_results
from helpers.training.runs import Run, run_id

SMOKE_ALGORITHMS = ("fedavg", "scaffold", "fedadam")  # the smoke pipeline's share: a client side, a server optimizer


def remedy_algorithms(profile: str, chosen: list | None) -> list[str]:
    """The algorithms to compare: `chosen`, or every one (full) / SMOKE_ALGORITHMS (smoke) when None."""
    if chosen is None:
        return list(ALGORITHMS) if profile == "full" else list(SMOKE_ALGORITHMS)
    return list(chosen)


def remedy_base(base: dict, algorithm: str, local_steps: int, rounds: int) -> dict:
    """`base` (a sparse run of 05) as a remedy's run: every value but the other algorithms' own parameters (the
    algorithm's own take its defaults unless set), `local_steps` and `rounds`."""
    others = set(remedy_parameters())
    shared = {k: v for k, v in base.items() if k in experiment_parameters("sparse_fedavg") and k not in others}
    return {**shared, "algorithm": algorithm, "sharding": "noniid", "local_steps": local_steps, "rounds": rounds}


def remedy_rounds(base: dict, local_steps: int) -> int:
    """The comparison's rounds: base's step budget (J x rounds) at `local_steps`."""
    return rounds_for_budget(base["rounds"] * base["local_steps"], local_steps)


def tuning_configs(
    base: dict, algorithms: list[str], nc: int, local_steps: int, budget: float, grids: Mapping | None = None
) -> list[dict]:
    """Per algorithm, one dense run (sparsity 0, the step-0 head) per value of its grid at Nc = `nc` (the hardest
    setting), each with `budget` of the comparison's rounds: the same count and budget for every method."""
    rounds = tuning_rounds(remedy_rounds(base, local_steps), budget)
    configs = []
    for algorithm in algorithms:
        name, values = tuning_grid(algorithm, grids)
        cell = remedy_base(base, algorithm, local_steps, rounds)
        configs += [make_config("sparse_fedavg", **{**cell, "classes_per_client": nc, "sparsity": 0.0, name: v})
                    for v in values]  # fmt: skip
    return configs


def remedy_plan(
    base: dict,
    algorithms: list[str],
    classes: list[int],
    local_steps: int,
    chosen: Mapping | None = None,
    seeds: list[int] | None = None,
    sparse_rounds: int | None = None,
) -> list[dict]:
    """sparse_fedavg configs: per algorithm, Nc in `classes` and seed in `seeds` (None: base's), the dense control
    (sparsity 0, step-0 head) and `base`'s sparse run (its mask from `sparse_rounds` calibration rounds; None:
    base's), with `local_steps` and the rounds that keep base's step budget (J x rounds), each algorithm at its
    `chosen` (parameter, value) (None: at its defaults, a placeholder until the tuning is done)."""
    rounds, plan = remedy_rounds(base, local_steps), []
    for algorithm in algorithms:
        tuned = dict([chosen[algorithm]]) if chosen and algorithm in chosen else {}
        for nc in classes:
            for seed in seeds or [base["seed"]]:
                cell = {**remedy_base(base, algorithm, local_steps, rounds), "classes_per_client": nc, "seed": seed}
                plan += [make_config("sparse_fedavg", **{**cell, **arm, **tuned}) for arm in arms(base, sparse_rounds)]
    return plan


def arms(base: dict, sparse_rounds: int | None) -> list[dict]:
    """The comparisons' arms: dense (sparsity 0, the step-0 head), then base's mask (from `sparse_rounds` calibration
    rounds; None: base's) unless base is dense itself."""
    sparse = {"sparsity": base["sparsity"], **({} if sparse_rounds is None else {"calibration_rounds": sparse_rounds})}
    return [{"sparsity": 0.0}] + ([sparse] if base["sparsity"] else [])


# ----------------------------------------------------------------------------- the extension: TIES, interference


def extension_base(base: dict, nc: int, local_steps: int, rounds: int) -> dict:
    """`base` (a sparse run of 05) as an extension run at Nc = `nc`: FedAvg's server step at its defaults (no
    remedy's parameters: server_lr 1), no merge rule or diagnostic yet, `local_steps` and `rounds`."""
    dropped = {*remedy_parameters(), "merge", "merge_density", "interference_probe"}
    shared = {k: v for k, v in base.items() if k in experiment_parameters("sparse_fedavg") and k not in dropped}
    return {**shared, "sharding": "noniid", "classes_per_client": nc, "local_steps": local_steps, "rounds": rounds}


def extension_tuning_configs(
    base: dict, nc: int, local_steps: int, budget: float, grids: Mapping | None = None
) -> list[dict]:
    """TIES's tuning, as every remedy's (tuning_configs): one dense run (sparsity 0, the step-0 head) per
    merge_density of its grid (TUNING_GRIDS["ties"] replaces it) at Nc = `nc`, with `budget` of the rounds."""
    name, values = tuning_grid(TIES, grids)
    cell = extension_base(base, nc, local_steps, tuning_rounds(remedy_rounds(base, local_steps), budget))
    return [make_config("sparse_fedavg", **{**cell, "sparsity": 0.0, "merge": TIES, name: v}) for v in values]


def extension_configs(
    base: dict,
    classes: list[int],
    local_steps: int,
    chosen: Mapping | None = None,
    seeds: list[int] | None = None,
    sparse_rounds: int | None = None,
) -> list[dict]:
    """The extension's runs, per Nc in `classes` and seed in `seeds` (None: base's): FedAvg's mean, then TIES at its
    `chosen` merge_density (None: the default density, a placeholder until the tuning is done), each dense (sparsity
    0, the step-0 head) and with base's mask (from `sparse_rounds` calibration rounds; None: base's), at base's step
    budget; the interference diagnostic on (PROBE_IMAGES per client)."""
    tuned = dict([chosen[TIES]]) if chosen and TIES in chosen else {}
    rounds, configs = remedy_rounds(base, local_steps), []
    for nc in classes:
        for seed in seeds or [base["seed"]]:
            cell = {**extension_base(base, nc, local_steps, rounds), "interference_probe": PROBE_IMAGES, "seed": seed}
            for merge in ({}, {"merge": TIES, **tuned}):
                configs += [
                    make_config("sparse_fedavg", **{**cell, **arm, **merge}) for arm in arms(base, sparse_rounds)
                ]
    return configs


def measured_alike(configs: list[dict], extension: list[dict]) -> list[dict]:
    """`configs` with every run the extension also plans (FedAvg's, where its server_lr is 1: the same run id, as the
    diagnostic is not in it) taken as the extension's config, so that whichever notebook cell or `work` session
    trains it first measures its interference."""
    theirs = {run_id(c): c for c in extension}
    return [theirs.get(run_id(c), c) for c in configs]


def without_diagnostic(runs: list[Run]) -> list[Run]:
    """The extension's runs whose rows hold no interference: trained before EXTENSION was on (as a remedies run that
    shares its id): their interference is missing from extension.csv until their folder is deleted and retrained."""
    return [r for r in runs if r.done and "interference" not in r.metrics()]


def write_extension_results(runs: list[Run], chosen: Mapping, name: str, grids: Mapping | None = None) -> Path:
    """results/<profile>/<name>.csv: the extension's tidy rows; TIES's rows also with its tuned parameter, grid and
    value (FedAvg's mean tunes nothing here: those columns stay empty on its rows)."""
    table = with_tuning(editing_table(runs), chosen, grids)
    mean = table["merge"].ne(TIES) if "merge" in table else True
    table.loc[mean, ["tuned_param", "tuning_grid", "tuned_value"]] = None
    return write_results(runs, name, table=table)
