"""Issue 33's seeds and coverage in the notebooks' plans: three seeds for the federated cells the conclusions rest on,
05's sparsity x R grid, 06 at the hardest Nc, the remedies' sparse arm at the best R, the reduced plan; counted
here independently of helpers.ops.coverage, rejected in one line when a value is bad, priced by the cost."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from helpers.algorithms.registry import ALGORITHMS
from helpers.ops import cost, plans
from helpers.ops.cli import main
from helpers.ops.plans import notebook_plan
from helpers.ops.study import study_plan
from helpers.sparse.masks import MASK_RULES
from helpers.training.runs import run_id

NOWHERE = "/nonexistent"
SEEDS = {0, 1, 2}  # the full profile's FED_SEEDS, as the notebooks' parameter cells document it


@pytest.fixture
def full(monkeypatch):
    monkeypatch.delenv("FLME_PROFILE", raising=False)  # it would turn the full profile into smoke


def cells(configs: list[dict], *keys: str) -> dict[tuple, frozenset[int]]:
    """The seeds of each cell (the values of `keys`)."""
    out: dict[tuple, set[int]] = {}
    for c in configs:  # IID configs keep the default Nc: not part of their cell
        cell = tuple(None if k == "classes_per_client" and c["sharding"] == "iid" else c.get(k) for k in keys)
        out.setdefault(cell, set()).add(c["seed"])
    return {cell: frozenset(seeds) for cell, seeds in out.items()}


def test_the_iid_baseline_and_the_hardest_nc_of_every_j_run_three_seeds(full):
    assert {c["seed"] for c in notebook_plan("02_fedavg_iid", "full", NOWHERE)["runs"]} == SEEDS
    grid = notebook_plan("03_fedavg_noniid", "full", NOWHERE)["grid"]
    nc_list, j_list = [1, 5, 10, 50], [4, 8, 16]  # the notebook's defaults
    assert len(grid) == len(j_list) * (2 * len(SEEDS) + (len(nc_list) - 1))  # IID and Nc 1 three times, others once
    for (sharding, nc, j), seeds in cells(grid, "sharding", "classes_per_client", "local_steps").items():
        assert seeds == (SEEDS if sharding == "iid" or nc == 1 else {0}), (sharding, nc, j)
    assert len({run_id(c) for c in grid}) == len(grid)


def test_03_split_by_nc_over_sessions_plans_the_same_runs(full):
    whole = {run_id(c) for c in notebook_plan("03_fedavg_noniid", "full", NOWHERE)["grid"]}
    parts = {run_id(c) for c in notebook_plan("03_fedavg_noniid", "full", NOWHERE, NC_LIST=[])["grid"]}  # IID
    for nc in (1, 5, 10, 50):  # docs/runs.md: one Nc per session
        plan = notebook_plan("03_fedavg_noniid", "full", NOWHERE, NC_LIST=[nc], INCLUDE_IID=False)
        parts |= {run_id(c) for c in plan["grid"]}
    assert parts == whole


def test_05_covers_sparsity_and_r_and_seeds_its_comparisons(full):
    plan = notebook_plan("05_federated_editing", "full", NOWHERE)
    settings, sparsities, rounds = 3, [0.9, 0.95, 0.99], [1, 2, 4]  # Nc 1, Nc 10, IID
    assert len(plan["grid"]) == settings * len(sparsities) * len(rounds) and len(plan["controls"]) == settings
    assert {(c["sparsity"], c["calibration_rounds"]) for c in plan["grid"]} == {
        (s, r) for s in sparsities for r in rounds
    }
    assert {c["seed"] for c in plan["grid"] + plan["tuning"]} == {0}  # the grid and the tuning: one seed
    remedies = plan["remedies"]
    assert len(remedies) == len(ALGORITHMS) * 2 * len(SEEDS) * 2  # algorithms x Nc {1, 5} x seeds x dense/sparse
    assert set(cells(remedies, "algorithm", "classes_per_client", "sparsity").values()) == {frozenset(SEEDS)}
    extension = plan["extension"]
    assert len(extension) == 2 * len(SEEDS) * 2 * 2  # Nc x seeds x mean/TIES x dense/sparse
    assert Counter(c["seed"] for c in extension) == {s: 8 for s in SEEDS}
    shared = {run_id(c) for c in extension} & {run_id(c) for c in remedies}
    assert len(shared) == 2 * len(SEEDS) * 2  # FedAvg's mean runs, dense and sparse, every seed
    # nothing done yet: the sparse arms wait for the grid's best R, planned at the largest (it costs no less)
    assert plan.waiting == ("remedies", "extension")
    assert {c["calibration_rounds"] for c in remedies + extension if c["sparsity"] > 0} == {4}


def test_06_compares_the_rules_at_the_hardest_nc_too_over_three_seeds(full):
    plan = notebook_plan("06_mask_strategies", "full", NOWHERE)
    settings = {("iid", None), ("noniid", 1), ("noniid", 10)}
    assert len(plan["grid"]) == len(MASK_RULES) * len(settings) * len(SEEDS)
    assert len(plan["controls"]) == len(settings) * len(SEEDS)
    assert set(cells(plan["grid"], "sharding", "classes_per_client")) == settings
    assert set(cells(plan["grid"], "mask_rule", "sharding", "classes_per_client").values()) == {frozenset(SEEDS)}


def test_the_reduced_plan_is_smaller_and_keeps_three_seeds(full):
    editing = notebook_plan("05_federated_editing", "full", NOWHERE, reduced=True)
    assert len(editing["grid"]) == 3 * 2 * 2  # settings x sparsity {0.9, 0.99} x R {1, 4}
    assert len(editing["remedies"]) == len(ALGORITHMS) * 1 * len(SEEDS) * 2  # Nc 1 only
    rules = notebook_plan("06_mask_strategies", "full", NOWHERE, reduced=True)
    assert len(rules["grid"]) == len(MASK_RULES) * 2 * len(SEEDS)  # IID and Nc 1
    assert {c["seed"] for c in rules["grid"]} == SEEDS
    # status and work see the same plan as the notebook
    planned = study_plan("full", ["05"], NOWHERE, reduced=True)
    assert [p.id for p in planned] == [run_id(c) for _, c in editing.runs]


def test_smoke_runs_one_seed_and_says_so():
    for name, group in (
        ("02_fedavg_iid", "runs"),
        ("05_federated_editing", "remedies"),
        ("06_mask_strategies", "grid"),
    ):
        plan = notebook_plan(name, "smoke", NOWHERE)
        assert {c["seed"] for c in plan[group]} == {0}
        assert "smoke: one seed; full runs 3" in plan.describe()


def test_explicit_seeds_are_planned_once_each_after_seed():
    plan = notebook_plan("06_mask_strategies", "smoke", NOWHERE, SEED=3, FED_SEEDS=[5, 3, 5])
    assert [c["seed"] for c in plan["controls"]] == [3, 5, 3, 5]  # IID, then Nc 10 (smoke's)


@pytest.mark.parametrize(
    "notebook, parameters, message",
    [
        ("02_fedavg_iid", {"FED_SEEDS": []}, r"^FED_SEEDS=\[\] is invalid: give at least one seed"),
        ("03_fedavg_noniid", {"FED_SEEDS": [-1]}, r"^FED_SEEDS=\[-1\] is invalid: must be an integer >= 0"),
        ("05_federated_editing", {"FED_SEEDS": "seeds"}, r"^FED_SEEDS='seeds' is invalid"),
        ("06_mask_strategies", {"FED_SEEDS": [0.5]}, r"^FED_SEEDS=\[0.5\] is invalid"),
    ],
)
def test_a_bad_fed_seeds_stops_the_plan_naming_it(notebook, parameters, message):
    with pytest.raises(ValueError, match=message):
        notebook_plan(notebook, "smoke", NOWHERE, **parameters)


@pytest.mark.parametrize(
    "notebook, name, value",
    [
        ("05", "FED_SEEDS", "[]"),
        ("06", "FED_SEEDS", "[-2]"),
        ("05", "REMEDY_CALIBRATION_ROUNDS", "0"),
        ("06", "NC_LIST", "[0]"),
        ("03", "HARDEST_NC", "0"),
        ("05", "REDUCED", "maybe"),
    ],
)
def test_the_pipeline_refuses_a_bad_size_in_one_line_with_exit_2(capsys, tmp_path, notebook, name, value):
    argv = ["pipeline", "--notebooks", notebook, "--output-dir", str(tmp_path), "-p", name, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}=") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # no notebook ran


class FakeRun:
    def __init__(self, config: dict, val_acc: float):
        self.config, self.id, self.done, self.experiment = config, run_id(config), True, "sparse_fedavg"
        self.rows = pd.DataFrame({"round": [1], "val_acc": [val_acc], "test_acc": [0.0]})

    def metrics(self) -> pd.DataFrame:
        return self.rows.copy()


def test_the_sparse_arms_take_the_r_best_on_validation_at_the_hardest_nc(full, monkeypatch):
    score = {1: 0.2, 2: 0.1, 4: 0.3}  # R = 4 wins on validation
    grid = notebook_plan("05_federated_editing", "full", NOWHERE)["grid"]
    done = {run_id(c): FakeRun(c, score[c["calibration_rounds"]]) for c in grid}

    def finished(experiment, configs, root):
        return [done[run_id(c)] for c in configs] if all(run_id(c) in done for c in configs) else None

    monkeypatch.setattr(plans, "finished_runs", finished)
    plan = notebook_plan("05_federated_editing", "full", NOWHERE, REMEDIES=["fedprox"])
    assert plan.info["sparse_r"] == 4 and "sparse arm at R=4" in plan.describe()
    sparse = [c for c in plan["remedies"] + plan["extension"] if c["sparsity"] > 0]
    dense = [c for c in plan["remedies"] + plan["extension"] if c["sparsity"] == 0]
    assert sparse and {c["calibration_rounds"] for c in sparse} == {4}
    assert {c["calibration_rounds"] for c in dense} == {plan.info["base"]["calibration_rounds"]}
    score.update({2: 0.9})  # the choice follows validation
    done = {run_id(c): FakeRun(c, score[c["calibration_rounds"]]) for c in grid}
    assert notebook_plan("05_federated_editing", "full", NOWHERE, REMEDIES=["fedprox"]).info["sparse_r"] == 2
    score.update({1: 0.9, 4: 0.9})  # a tie: the fewest rounds (smoke's R = 1 and 2 tie)
    done = {run_id(c): FakeRun(c, score[c["calibration_rounds"]]) for c in grid}
    assert notebook_plan("05_federated_editing", "full", NOWHERE, REMEDIES=["fedprox"]).info["sparse_r"] == 1
    fixed = notebook_plan("05_federated_editing", "full", NOWHERE, REMEDIES=["fedprox"], REMEDY_CALIBRATION_ROUNDS=1)
    assert fixed.info["sparse_r"] == 1  # REMEDY_CALIBRATION_ROUNDS fixes it


def test_the_cost_prices_every_new_run(full):
    rows = {r["notebook"]: r for r in cost.notebook_table("full")}
    for name in ("02_fedavg_iid", "03_fedavg_noniid", "06_mask_strategies"):
        assert rows[name]["runs"] == len({run_id(c) for _, c in notebook_plan(name, "full", NOWHERE).runs})
    editing = notebook_plan("05_federated_editing", "full", NOWHERE)
    assert sum(rows[k]["runs"] for k in ("05_federated_editing", "05 tuning", "05 extension")) == len(
        {run_id(c) for _, c in editing.runs}
    )
    additions = {a["addition"]: a for a in cost.additions_table("full")}
    seeds = additions["3 seeds for the cells the conclusions rest on"]
    # 02: 2 more; 03: IID and Nc 1 at 3 J, 2 more each; 05: 7 algorithms x 2 Nc x 2 arms and TIES's 2 Nc x 2 arms,
    # 2 more seeds each (FedAvg's extension runs are the remedies'); 06: 5 rules and the control at 3 settings
    assert seeds["runs"] == 2 + 3 * 2 * 2 + (len(ALGORITHMS) * 2 * 2 + 2 * 2) * 2 + (len(MASK_RULES) + 1) * 3 * 2
    assert additions["05: sparsity x calibration rounds"]["runs"] == 3 * 3 * 3 - 3 * 1 * 2
    assert additions["06: the mask rules at the hardest Nc too"]["runs"] == len(MASK_RULES) + 1
    assert all(a["t4_hours"] > 0 for a in additions.values())
    reduced = sum(r["t4_hours"] for r in cost.notebook_table("full", reduced=True))
    assert reduced < sum(r["t4_hours"] for r in rows.values())
