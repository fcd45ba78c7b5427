"""Each notebook's plan: the runs it trains, from its parameters (`PLANS`). The notebook's setup cell calls its
function; `cost`, `status` and `work` call the same one with the defaults the notebook declares (read from its
parameters cell as literals, never run). Runs whose configs depend on earlier results (01's scheduler and final
runs take the grid's best hyperparameters) are planned exactly once those results are on the run root, and are
`waiting` until then (placeholders of the same cost)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from helpers.config.experiments import make_config, resolve_profile, train_split_size
from helpers.config.parsing import as_list
from helpers.core.settings import default_run_root
from helpers.federated.clients import clients_per_round
from helpers.federated.rounds import rounds_for_budget
from helpers.ops.comparisons import (
    extension_configs,
    extension_tuning_configs,
    measured_alike,
    remedy_algorithms,
    remedy_plan,
    tuning_configs,
)
from helpers.ops.coverage import fed_seeds, seeds_note, sized
from helpers.ops.notebook import declared_parameters
from helpers.ops.tuning import TIES, check_tuning, chosen_values
from helpers.reporting.results import final_rows
from helpers.sparse.masks import MASK_RULES, one_shot
from helpers.training.runs import Run, run_id

BASELINE_J = 4  # 03's step budget is the profile's default rounds at the course's J = 4


@dataclass
class Plan:
    """A notebook's runs in groups (in the order it trains them), what its setup cell prints, and the values its
    later cells use (`info`). Groups named in `waiting` hold placeholders: their configs need results not there."""

    notebook: str
    profile: str
    experiments: dict[str, str] = field(default_factory=dict)  # group -> experiment
    groups: dict[str, list[dict]] = field(default_factory=dict)  # group -> configs
    waiting: tuple[str, ...] = ()
    lines: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add(self, group: str, experiment: str, configs: list[dict]) -> None:
        self.experiments[group], self.groups[group] = experiment, configs

    def __getitem__(self, group: str) -> list[dict]:
        return self.groups[group]

    @property
    def runs(self) -> list[tuple[str, dict]]:
        """(experiment, config) of every planned run, in order (duplicates kept: a notebook may train one twice)."""
        return [(self.experiments[g], c) for g, configs in self.groups.items() for c in configs]

    def runs_of(self, *groups: str) -> list[tuple[str, dict]]:
        """(experiment, config) of the runs of `groups`, in order."""
        return [(self.experiments[g], c) for g in groups for c in self.groups[g]]

    def is_waiting(self, group: str) -> bool:
        return group in self.waiting

    def describe(self) -> str:
        return "\n".join(self.lines)


def finished_runs(experiment: str, configs: list[dict], run_root: str | Path | None) -> list[Run] | None:
    """The runs of `configs` if every one is done on the run root (read only: nothing is created), else None."""
    root = Path(run_root) if run_root is not None else default_run_root()
    runs = [Run(experiment, c, run_id(c), root / experiment / run_id(c)) for c in configs]
    return runs if runs and all(r.done for r in runs) else None


# ----------------------------------------------------------------------------- 01: centralized

GRID_KEYS = ["lr", "momentum", "weight_decay"]


def best_hyperparameters(grid: list[Run]) -> dict:
    """The grid run with the best final validation accuracy: its lr, momentum and weight decay."""
    table = final_rows(grid, GRID_KEYS).sort_values("val_acc", ascending=False)
    return {k: table.iloc[0][k].item() for k in GRID_KEYS}


def best_scheduler(runs: list[Run]) -> str:
    """The scheduler of the run with the best final validation accuracy."""
    return final_rows(runs, ["scheduler"]).sort_values("val_acc").iloc[-1]["scheduler"]


def scheduler_extra(p: Mapping, epochs: int) -> dict[str, dict]:
    """Each scheduler's own settings: step drops at a third of the epochs, warmup_cosine warms up WARMUP_EPOCHS."""
    return {"step": {"step_size": max(1, epochs // 3)}, "warmup_cosine": {"warmup_epochs": p["WARMUP_EPOCHS"]}}


def scheduler_configs(p: Mapping, best: Mapping) -> list[dict]:
    """01's scheduler comparison: the grid's best hyperparameters with each scheduler, on validation."""
    profile, epochs = resolve_profile(p["PROFILE"]), p["EPOCHS"]
    extra = scheduler_extra(p, make_config("centralized", profile, epochs=epochs)["epochs"])
    return [make_config("centralized", profile, **best, scheduler=s, epochs=epochs, eval_test=False, **extra.get(s, {}))
            for s in as_list(p["SCHEDULERS"])]  # fmt: skip


def final_configs(p: Mapping, best: Mapping, scheduler: str) -> list[dict]:
    """01's final runs: the best hyperparameters and scheduler, one run per seed, test curves on."""
    profile, epochs = resolve_profile(p["PROFILE"]), p["EPOCHS"]
    extra = scheduler_extra(p, make_config("centralized", profile, epochs=epochs)["epochs"]).get(scheduler, {})
    return [make_config("centralized", profile, **best, scheduler=scheduler, seed=seed, epochs=epochs, eval_test=True,
                        **extra) for seed in as_list(p["SEEDS"])]  # fmt: skip


def centralized_plan(p: Mapping, run_root: str | Path | None = None) -> Plan:
    """01: linear probe, the lr x momentum x weight-decay grid, then the schedulers and the seeds of the best."""
    profile = resolve_profile(p["PROFILE"])
    plan = Plan("01_centralized", profile)

    def config(**overrides):  # None values fall back to the profile's defaults
        return make_config("centralized", profile, **overrides)

    base, epochs = config(epochs=p["EPOCHS"]), p["EPOCHS"]
    plan.lines.append(f"profile={profile}: {base['model']} on {base['dataset']} at {base['img_size']} px, "
                      f"{base['epochs']} epochs")  # fmt: skip
    plan.add("probe", "centralized", [config(train_mode="head", lr=p["PROBE_LR"], epochs=epochs, eval_test=False)])
    grid = [
        config(lr=lr, momentum=mom, weight_decay=wd, epochs=p["GRID_EPOCHS"] or epochs, eval_test=False)
        for lr, mom, wd in product(*(as_list(p[n]) for n in ("GRID_LR", "GRID_MOMENTUM", "GRID_WEIGHT_DECAY")))
    ]
    plan.add("grid", "centralized", grid)
    grid_runs = finished_runs("centralized", grid, run_root)
    best = best_hyperparameters(grid_runs) if grid_runs else None
    schedulers = scheduler_configs(p, best) if best else [config(scheduler=s, epochs=epochs)
                                                          for s in as_list(p["SCHEDULERS"])]  # fmt: skip
    plan.add("schedulers", "centralized", schedulers)
    scheduler_runs = finished_runs("centralized", schedulers, run_root) if best else None
    chosen = best_scheduler(scheduler_runs) if scheduler_runs else None
    finals = final_configs(p, best, chosen) if chosen else [config(seed=s, epochs=epochs, eval_test=True)
                                                            for s in as_list(p["SEEDS"])]  # fmt: skip
    plan.add("final", "centralized", finals)
    plan.waiting = ("schedulers",) * (best is None) + ("final",) * (chosen is None)
    plan.info.update(base=base, best=best, best_scheduler=chosen)
    return plan


# ----------------------------------------------------------------------------- 02, 03: FedAvg


def fedavg_iid_plan(p: Mapping, run_root: str | Path | None = None) -> Plan:
    """02: FedAvg on IID shards (the baseline), one run per seed of SEEDS and FED_SEEDS."""
    profile = resolve_profile(p["PROFILE"])
    plan = Plan("02_fedavg_iid", profile)
    fixed = dict(sharding="iid", num_clients=p["NUM_CLIENTS"], participation=p["PARTICIPATION"],
                 local_steps=p["LOCAL_STEPS"], rounds=p["ROUNDS"], lr=p["LR"], eval_every=p["EVAL_EVERY"])  # fmt: skip
    seeds = fed_seeds(p)
    configs = [make_config("fedavg", profile, **fixed, seed=seed) for seed in seeds]
    plan.add("runs", "fedavg", configs)
    base = configs[0]
    m = clients_per_round(base["num_clients"], base["participation"])
    samples = base["rounds"] * m * base["local_steps"] * base["batch_size"]
    plan.lines += [
        f"profile={profile}: {base['model']} on {base['dataset']}, K={base['num_clients']}, C={base['participation']} "
        f"(m={m} clients per round), J={base['local_steps']}, {base['rounds']} rounds, client lr={base['lr']}",
        f"compute: {base['rounds']} rounds x {m} clients x {base['local_steps']} steps x batch {base['batch_size']} = "
        f"{samples:,} training samples = {samples / train_split_size(base):.1f} passes over the train split",
        f"seeds: {seeds_note(p, seeds)}",
    ]
    plan.info.update(base=base)
    return plan


def fedavg_noniid_config(p: Mapping, sharding: str, nc: int | None, j: int, seed: int) -> dict:
    """One cell of 03's grid: the sharding, J local steps, the rounds that keep the step budget, the seed."""
    profile = resolve_profile(p["PROFILE"])
    budget = p["STEP_BUDGET"] or make_config("fedavg", profile)["rounds"] * BASELINE_J
    return make_config("fedavg", profile, sharding=sharding, classes_per_client=nc, num_clients=p["NUM_CLIENTS"],
                       participation=p["PARTICIPATION"], local_steps=j, rounds=rounds_for_budget(budget, j),
                       lr=p["LR"], eval_every=p["EVAL_EVERY"], seed=seed, algorithm=p["ALGORITHM"],
                       stragglers=p["STRAGGLERS"])  # fmt: skip


def fedavg_noniid_plan(p: Mapping, run_root: str | Path | None = None) -> Plan:
    """03: FedAvg over Nc x J (and IID), at one step budget per client (rounds follow from J); the cells the
    conclusions rest on (IID and the hardest Nc, at every J) with the seeds of FED_SEEDS too."""
    profile = resolve_profile(p["PROFILE"])
    plan = Plan("03_fedavg_noniid", profile)
    nc_list, j_list, seeds = as_list(p["NC_LIST"]), as_list(p["J_LIST"]), as_list(p["SEEDS"])
    budget = p["STEP_BUDGET"] or make_config("fedavg", profile)["rounds"] * BASELINE_J
    settings = [("noniid", nc) for nc in nc_list] + ([("iid", None)] if p["INCLUDE_IID"] else [])
    key, hardest = fed_seeds(p) if seeds else [], p["HARDEST_NC"]  # fixed, so that NC_LIST can split the grid

    def seeds_of(sharding: str, nc: int | None) -> list[int]:
        return key if sharding == "iid" or nc == hardest else seeds

    grid = [fedavg_noniid_config(p, s, nc, j, seed) for s, nc in settings for j in j_list for seed in seeds_of(s, nc)]
    if not grid:
        raise ValueError(
            "the grid is empty: give NC_LIST (or INCLUDE_IID=True), J_LIST and SEEDS at least one value each"
        )
    plan.add("grid", "fedavg", grid)
    base = grid[0]
    plan.lines += [
        f"profile={profile}: {base['model']} on {base['dataset']}, K={base['num_clients']}, "
        f"C={base['participation']}, step budget {budget} local steps per client",
        f"rounds per J: { ({j: rounds_for_budget(budget, j) for j in j_list}) } -> {len(grid)} runs",
        f"seeds: {seeds} per cell; IID and Nc={hardest} (HARDEST_NC), at every J: {seeds_note(p, key)}",
    ]
    plan.info.update(base=base, budget=budget, settings=settings)
    return plan


# ----------------------------------------------------------------------------- 04-06: model editing


def editing_plan(p: Mapping, run_root: str | Path | None = None) -> Plan:
    """04: centralized sparse fine-tuning over sparsity x R, the dense control, the probe and dense fine-tuning."""
    profile = resolve_profile(p["PROFILE"])
    plan = Plan("04_model_editing", profile)
    rule, rounds_r = p["MASK_RULE"], [1] if one_shot(p["MASK_RULE"]) else as_list(p["CALIBRATION_ROUNDS"])

    def sparse(sparsity, rounds):  # None values fall back to the profile's defaults
        return make_config("sparse_centralized", profile, sparsity=sparsity, calibration_rounds=rounds,
                           mask_rule=rule, score_method=p["SCORE_METHOD"], calibration_samples=p["CALIBRATION_SAMPLES"],
                           embeddings=p["EMBEDDINGS"], step0=p["STEP0"], epochs=p["EPOCHS"], lr=p["LR"],
                           seed=p["SEED"])  # fmt: skip

    grid = [sparse(s, r) for s, r in product(as_list(p["SPARSITIES"]), rounds_r)]
    plan.add("grid", "sparse_centralized", grid)
    plan.add("control", "sparse_centralized", [sparse(0.0, 1)])  # the step-0 head frozen: an all-ones mask
    centralized = dict(epochs=p["EPOCHS"], eval_test=False, seed=p["SEED"])
    plan.add("probe", "centralized", [make_config("centralized", profile, train_mode="head", lr=p["PROBE_LR"],
                                                  **centralized)])  # fmt: skip
    plan.add("dense", "centralized", [make_config("centralized", profile, lr=p["LR"], **centralized)])
    base = grid[0]
    if rounds_r != as_list(p["CALIBRATION_ROUNDS"]):
        plan.lines.append(f"{rule} is a one-shot rule: calibration rounds do not apply, using R = 1")
    plan.lines.append(
        f"profile={profile}: {base['model']} on {base['dataset']}, {base['epochs']} epochs at lr={base['lr']}, "
        f"{len(grid)} sparse runs ({rule}, {p['SCORE_METHOD']} scores on {base['calibration_samples']:,} images per "
        f"round, embeddings {p['EMBEDDINGS']}, step 0 = {p['STEP0']}) and the dense control"
    )
    plan.info.update(base=base, rounds_r=rounds_r, sparse=sparse)
    return plan


def federated_editing_config(p: Mapping, sharding: str, nc: int | None, sparsity: float, rounds: int) -> dict:
    """One sparse FedAvg run of 05: its sharding, sparsity and calibration rounds, the notebook's other settings."""
    return make_config("sparse_fedavg", resolve_profile(p["PROFILE"]), sharding=sharding, classes_per_client=nc,
                       sparsity=sparsity, calibration_rounds=rounds, mask_rule=p["MASK_RULE"],
                       mask_scope=p["MASK_SCOPE"], step0=p["STEP0"], local_steps=p["LOCAL_STEPS"],
                       num_clients=p["NUM_CLIENTS"], participation=p["PARTICIPATION"], rounds=p["ROUNDS"], lr=p["LR"],
                       calibration_samples=p["CALIBRATION_SAMPLES"], embeddings=p["EMBEDDINGS"],
                       seed=p["SEED"])  # fmt: skip


EDITING = "05_federated_editing"


def remedy_configs(p: Mapping, chosen: Mapping, run_root: str | Path | None = None) -> list[dict]:
    """05's remedies comparison at the tuned values `chosen` ({algorithm: (parameter, value)}), every seed of
    FED_SEEDS, the sparse arm at sparse_arm_rounds; with EXTENSION, the runs the extension shares measure its
    interference (measured_alike)."""
    p = sized(p, EDITING)
    algorithms = remedy_algorithms(
        resolve_profile(p["PROFILE"]), None if p["REMEDIES"] is None else as_list(p["REMEDIES"])
    )
    r = sparse_arm_rounds(p, run_root)[0]
    configs = remedy_plan(editing_base(p), algorithms, as_list(p["REMEDY_NC"]), p["REMEDY_J"], chosen, fed_seeds(p), r)
    return measured_alike(configs, extension_comparison(p, None, run_root)) if p["EXTENSION"] else configs


def extension_comparison(p: Mapping, chosen: Mapping | None, run_root: str | Path | None = None) -> list[dict]:
    """05's extension (EXTENSION; else none) at the remedies' settings and seeds, TIES at `chosen` ({"ties":
    ("merge_density", value)}; None: a placeholder until its tuning is done)."""
    if not p["EXTENSION"]:
        return []
    p = sized(p, EDITING)
    r = sparse_arm_rounds(p, run_root)[0]
    return extension_configs(editing_base(p), as_list(p["REMEDY_NC"]), p["REMEDY_J"], chosen, fed_seeds(p), r)


def sparse_arm_rounds(p: Mapping, run_root: str | Path | None) -> tuple[int, bool]:
    """(R, known) of the remedies' and the extension's sparse arm: REMEDY_CALIBRATION_ROUNDS; None: the R whose
    sparse run of 05's grid did best on validation at the comparison's hardest Nc (the smallest of REMEDY_NC) and
    sparsity (of equal ones the fewest), once those runs are done (until then the largest R: it costs no less)."""
    rounds, classes = editing_rounds(p), as_list(p["REMEDY_NC"])
    if one_shot(p["MASK_RULE"]):
        return 1, True
    if p["REMEDY_CALIBRATION_ROUNDS"] is not None or len(rounds) == 1 or not classes:
        return p["REMEDY_CALIBRATION_ROUNDS"] or rounds[0], True
    sparsity = as_list(p["SPARSITIES"])[0]  # the grid's cells there (a session running NC_LIST=[10] waits for them)
    cells = [federated_editing_config(p, "noniid", min(classes), sparsity, r) for r in rounds]
    runs = finished_runs("sparse_fedavg", cells, run_root)
    if runs is None:
        return max(rounds), False
    table = final_rows(runs, ["calibration_rounds"]).sort_values("calibration_rounds")
    return int(table.loc[table["val_acc"].idxmax(), "calibration_rounds"]), True  # a tie: the fewest rounds


def editing_settings(p: Mapping) -> list[tuple[str, int | None]]:
    """05's shardings: the non-IID ones of NC_LIST, then IID if INCLUDE_IID."""
    return [("noniid", nc) for nc in as_list(p["NC_LIST"])] + ([("iid", None)] if p["INCLUDE_IID"] else [])


def editing_rounds(p: Mapping) -> list[int]:
    """05's calibration rounds R (one-shot rules: [1])."""
    return [1] if one_shot(p["MASK_RULE"]) else as_list(p["CALIBRATION_ROUNDS"])


def editing_base(p: Mapping) -> dict:
    """05's first sparse run: the settings every remedy's run shares."""
    (sharding, nc), sparsity = editing_settings(p)[0], as_list(p["SPARSITIES"])[0]
    return federated_editing_config(p, sharding, nc, sparsity, editing_rounds(p)[0])


def federated_editing_plan(p: Mapping, run_root: str | Path | None = None) -> Plan:
    """05: sparse FedAvg over shardings x sparsity x R, a dense control per sharding, the remedies compared and
    (EXTENSION) the extension: TIES-merging in the round and the interference diagnostic, both at every seed of
    FED_SEEDS with their sparse arm at the best R."""
    profile, p = resolve_profile(p["PROFILE"]), sized(p, EDITING)
    plan = Plan(EDITING, profile)
    rounds_r, settings = editing_rounds(p), editing_settings(p)
    grid = [federated_editing_config(p, sh, nc, s, r)
            for (sh, nc), s, r in product(settings, as_list(p["SPARSITIES"]), rounds_r)]  # fmt: skip
    plan.add("grid", "sparse_fedavg", grid)
    plan.add("controls", "sparse_fedavg", [federated_editing_config(p, sh, nc, 0.0, 1) for sh, nc in settings])
    base = grid[0]
    plan.lines.append(
        f"profile={profile}: {base['model']} on {base['dataset']}, K={base['num_clients']}, "
        f"C={base['participation']}, J={base['local_steps']}, {base['rounds']} rounds, lr={base['lr']}; {len(grid)} "
        f"sparse runs ({p['MASK_RULE']}, {p['MASK_SCOPE']} mask, {base['calibration_samples']} images per client and "
        f"round, step 0 = {p['STEP0']}) and {len(plan['controls'])} dense controls"
    )
    algorithms = remedy_algorithms(profile, None if p["REMEDIES"] is None else as_list(p["REMEDIES"]))
    check_tuning(p["TUNING_SPLIT"], p["TUNING_BUDGET"], p["TUNING_GRIDS"], algorithms + [TIES] * p["EXTENSION"])
    classes = as_list(p["REMEDY_NC"])
    if (algorithms or p["EXTENSION"]) and not classes:
        raise ValueError("REMEDY_NC=[] is invalid with remedies to compare or EXTENSION=True: give at least one Nc "
                         "(or REMEDIES=[] and EXTENSION=False)")  # fmt: skip
    hardest, j, budget = min(classes) if classes else None, p["REMEDY_J"], p["TUNING_BUDGET"]
    tuning = tuning_configs(base, algorithms, hardest, j, budget, p["TUNING_GRIDS"])
    plan.add("tuning", "sparse_fedavg", tuning)
    chosen = chosen_on_validation(tuning, run_root)
    seeds, (sparse_r, r_known) = fed_seeds(p), sparse_arm_rounds(p, run_root)
    plan.add("remedies", "sparse_fedavg", remedy_plan(base, algorithms, classes, j, chosen, seeds, sparse_r))
    ties = extension_tuning_configs(base, hardest, j, budget, p["TUNING_GRIDS"]) if p["EXTENSION"] else []
    plan.add("extension_tuning", "sparse_fedavg", ties)
    merge = chosen_on_validation(ties, run_root)
    plan.add("extension", "sparse_fedavg", extension_comparison(p, merge, run_root))
    plan.groups["remedies"] = measured_alike(plan["remedies"], plan["extension"])  # its shared runs measure too
    plan.waiting = ("remedies",) * bool(plan["remedies"] and (tuning and chosen is None or not r_known))
    plan.waiting += ("extension",) * bool(ties and (merge is None or not r_known))
    plan.lines.append(
        f"remedies comparison: {', '.join(algorithms) or 'none'} at Nc={classes}, J={j}: "
        f"{len(plan['remedies'])} runs, each method at the value of its own hyperparameter chosen on validation "
        f"from {len(tuning)} tuning runs (dense, Nc={hardest}, {budget:g} of the rounds each); sparse arm at "
        f"R={sparse_r if r_known else 'best of the grid on validation (not yet)'}; seeds: {seeds_note(p, seeds)}"
    )
    if ties:
        plan.lines.append(
            f"extension: FedAvg's mean and TIES-merging in the round, dense and sparse, at Nc={classes}, J={j}: "
            f"{len(plan['extension'])} runs with the interference diagnostic, TIES's merge_density chosen on "
            f"validation from {len(ties)} tuning runs like the remedies' "
            f"({'merge_density=' + format(merge[TIES][1], 'g') if merge else 'not yet'})"
        )
    plan.info.update(base=base, settings=settings, rounds_r=rounds_r, remedy_algorithms=algorithms, chosen=chosen,
                     merge_chosen=merge, seeds=seeds, remedy_nc=classes,
                     sparse_r=sparse_r if r_known else None)  # fmt: skip
    return plan


def chosen_on_validation(tuning: list[dict], run_root: str | Path | None) -> dict | None:
    """The values the tuning runs `tuning` chose ({method: (parameter, value)}), once all are done; else None."""
    tuned = finished_runs("sparse_fedavg", tuning, run_root) if tuning else None
    return chosen_values(tuned) if tuned else None


def mask_strategies_config(
    p: Mapping, rule: str, sharding: str, nc: int | None, sparsity: float | None = None, seed: int | None = None
) -> dict:
    """One run of 06: a mask rule (R = 1 for the one-shot rules) on a sharding, its seed (None: SEED), the
    notebook's other settings."""
    return make_config("sparse_fedavg", resolve_profile(p["PROFILE"]), mask_rule=rule,
                       calibration_rounds=1 if one_shot(rule) else p["CALIBRATION_ROUNDS"],
                       sparsity=p["SPARSITY"] if sparsity is None else sparsity, sharding=sharding,
                       classes_per_client=nc, step0=p["STEP0"], embeddings=p["EMBEDDINGS"],
                       local_steps=p["LOCAL_STEPS"], num_clients=p["NUM_CLIENTS"], participation=p["PARTICIPATION"],
                       rounds=p["ROUNDS"], lr=p["LR"], calibration_samples=p["CALIBRATION_SAMPLES"],
                       seed=p["SEED"] if seed is None else seed)  # fmt: skip


def mask_strategies_plan(p: Mapping, run_root: str | Path | None = None) -> Plan:
    """06: every mask rule at one sparsity, IID and non-IID (the hardest Nc too), with the dense controls of 05,
    each at every seed of FED_SEEDS."""
    profile, p = resolve_profile(p["PROFILE"]), sized(p, "06_mask_strategies")
    plan = Plan("06_mask_strategies", profile)
    rules, seeds = as_list(p["RULES"] or list(MASK_RULES)), fed_seeds(p)
    settings = ([("iid", None)] if p["INCLUDE_IID"] else []) + [("noniid", nc) for nc in as_list(p["NC_LIST"])]
    grid = [
        mask_strategies_config(p, rule, sh, nc, seed=seed) for sh, nc in settings for rule in rules for seed in seeds
    ]
    plan.add("grid", "sparse_fedavg", grid)
    controls = [mask_strategies_config(p, rules[0], sh, nc, 0.0, seed) for sh, nc in settings for seed in seeds]
    plan.add("controls", "sparse_fedavg", controls)
    base = grid[0]
    plan.lines.append(
        f"profile={profile}: K={base['num_clients']}, C={base['participation']}, J={base['local_steps']}, "
        f"{base['rounds']} rounds, lr={base['lr']}, sparsity {p['SPARSITY']} (density {1 - p['SPARSITY']:g}); "
        f"{len(grid)} runs and {len(plan['controls'])} dense controls at Nc={as_list(p['NC_LIST'])}"
        f"{' and IID' if p['INCLUDE_IID'] else ''}; seeds: {seeds_note(p, seeds)}"
    )
    plan.info.update(base=base, settings=settings, rules=rules, seeds=seeds)
    return plan


PLANS: dict[str, Callable[[Mapping, str | Path | None], Plan]] = {
    "01_centralized": centralized_plan,
    "02_fedavg_iid": fedavg_iid_plan,
    "03_fedavg_noniid": fedavg_noniid_plan,
    "04_model_editing": editing_plan,
    "05_federated_editing": federated_editing_plan,
    "06_mask_strategies": mask_strategies_plan,
}


def notebook_plan(
    notebook: str, profile: str = "full", run_root: str | Path | None = None, reduced: bool = False, **parameters
) -> Plan:
    """The plan of `notebook` at the parameters it declares (its parameters cell), `profile` and `parameters`;
    `reduced`: REDUCED=True where the notebook declares it (the reduced plan, helpers.ops.coverage)."""
    if notebook not in PLANS:
        raise ValueError(f"notebook={notebook!r} has no plan; allowed: {', '.join(PLANS)}")
    declared = declared_parameters(notebook)
    smaller = {"REDUCED": True} if reduced and "REDUCED" in declared else {}
    return PLANS[notebook]({**declared, **smaller, **parameters, "PROFILE": profile}, run_root)
