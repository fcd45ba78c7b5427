"""The extension in notebook 05's plan (issue 36's study): at the remedies' settings (Nc in REMEDY_NC, J = REMEDY_J,
the same step budget), FedAvg's mean and TIES, each dense (step-0 head) and with the sparse mask, interference on;
TIES's merge_density tuned like every remedy's parameter (its grid, dense, the hardest Nc, TUNING_BUDGET of the
rounds, validation only); EXTENSION=False leaves the plain study as it was. And its results view."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers.algorithms.merging import MERGE_TUNING
from helpers.federated.interference import PROBE_IMAGES
from helpers.ops import plans
from helpers.ops.plans import notebook_plan
from helpers.reporting.extension import extension_rows, extension_summary
from helpers.training.runs import run_id

NB = "05_federated_editing"
THREE = ["fedavg", "fedprox", "fedadam"]


class FakeRun:
    """A finished tuning run: its config and final validation/test accuracy."""

    experiment = "sparse_fedavg"

    def __init__(self, config: dict, val_acc: float, test_acc: float):
        self.config, self.id, self.done = config, run_id(config), True
        self.rows = pd.DataFrame({"round": [1, 2], "val_acc": [0.0, val_acc], "test_acc": [0.0, test_acc]})

    def metrics(self) -> pd.DataFrame:
        return self.rows.copy()

    def summary(self) -> dict:
        return {"val_acc": float(self.rows["val_acc"].iloc[-1])}


def test_the_extension_runs_at_the_remedies_settings_with_ties_tuned_like_a_remedy():
    plan = notebook_plan(NB, "smoke", "/nonexistent", REMEDIES=THREE, REMEDY_NC=[5, 1])
    remedies, tuning, ties, extension = (plan[g] for g in ("remedies", "tuning", "extension_tuning", "extension"))
    assert plan.waiting == ("remedies", "extension")  # neither the remedies' values nor TIES's density known yet
    # TIES's tuning: the same count and budget as a remedy's, dense, at the hardest Nc, its own grid
    assert [c["merge_density"] for c in ties] == list(MERGE_TUNING[1]) and len(ties) == len(tuning) // len(THREE)
    key = lambda c: (c["classes_per_client"], c["sparsity"], c["rounds"], c["local_steps"])  # noqa: E731
    assert {key(c) for c in ties} == {key(c) for c in tuning} == {(1, 0.0, tuning[0]["rounds"], 8)}
    assert all(c["merge"] == "ties" and "algorithm" not in c and c["server_lr"] == 1.0 for c in ties)
    # the comparison: per Nc, mean and TIES, dense and sparse, FedAvg's server step, the remedies' budget
    sparse = plan.info["base"]["sparsity"]
    cells = [(c["classes_per_client"], c.get("merge", "mean"), c["sparsity"]) for c in extension]
    assert cells == [(nc, m, s) for nc in (5, 1) for m in ("mean", "ties") for s in (0.0, sparse)]
    fedavg = [c for c in remedies if "algorithm" not in c]
    for c in extension:
        assert "algorithm" not in c and c["server_lr"] == 1.0 and c["interference_probe"] == PROBE_IMAGES
        assert (c["rounds"], c["local_steps"], c["mask_rule"]) == (remedies[0]["rounds"], 8, remedies[0]["mask_rule"])
    # FedAvg's remedies runs (server_lr 1 until tuned) are the extension's mean runs: planned with the diagnostic on
    means = {run_id(c): c for c in extension if c.get("merge", "mean") == "mean"}
    assert {run_id(c) for c in fedavg} == set(means) and all(means[run_id(c)] == c for c in fedavg)


def test_ties_enters_at_the_density_best_on_validation_never_on_test(monkeypatch):
    plan = notebook_plan(NB, "smoke", "/nonexistent", REMEDIES=["fedprox"])
    val = dict(zip(MERGE_TUNING[1], (0.3, 0.5, 0.4)))  # the middle density wins on validation
    test = dict(zip(MERGE_TUNING[1], (0.9, 0.1, 0.2)))  # the first would win on test
    fake = {run_id(c): FakeRun(c, val[c["merge_density"]], test[c["merge_density"]]) for c in plan["extension_tuning"]}
    fake |= {run_id(c): FakeRun(c, 0.5, 0.5) for c in plan["tuning"]}
    monkeypatch.setattr(plans, "finished_runs", lambda e, configs, root: [fake[run_id(c)] for c in configs])
    done = notebook_plan(
        NB, "smoke", "/nonexistent", REMEDIES=["fedprox"], REMEDY_CALIBRATION_ROUNDS=1
    )  # R fixed: no grid to fake
    assert done.waiting == () and done.info["merge_chosen"] == {"ties": ("merge_density", MERGE_TUNING[1][1])}
    ties = [c for c in done["extension"] if c.get("merge") == "ties"]
    assert ties and all(c["merge_density"] == MERGE_TUNING[1][1] for c in ties)
    assert "merge_density=0.2" in done.describe()


def test_without_the_extension_the_plain_study_is_planned_as_before():
    on = notebook_plan(NB, "smoke", "/nonexistent")
    off = notebook_plan(NB, "smoke", "/nonexistent", EXTENSION=False)
    assert off["extension_tuning"] == off["extension"] == [] and "extension" not in off.waiting
    assert all("interference_probe" not in c and "merge" not in c for _, c in off.runs)
    for group in ("grid", "controls", "tuning", "remedies"):  # the same runs: only the shared ones measure more
        assert [run_id(c) for c in on[group]] == [run_id(c) for c in off[group]]
    assert "extension" not in off.describe() and "extension:" in on.describe()


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"TUNING_GRIDS": {"ties": [0.2]}}, r"TUNING_GRIDS\['ties'\].*at least two values of merge_density"),
        ({"TUNING_GRIDS": {"ties": [0.0, 0.5]}}, r"TUNING_GRIDS\['ties'\]: merge_density=0.0 is invalid"),
        ({"TUNING_GRIDS": {"ties": [0.1, 0.5]}, "EXTENSION": False}, r"TUNING_GRIDS names \['ties'\]"),
        ({"REMEDIES": [], "REMEDY_NC": []}, r"REMEDY_NC=\[\] is invalid .*EXTENSION=True"),
    ],
)
def test_bad_extension_input_stops_before_any_compute(parameters, message):
    with pytest.raises(ValueError, match=message):
        notebook_plan(NB, "smoke", "/nonexistent", **parameters)


def test_a_ties_grid_of_the_notebook_replaces_its_own():
    plan = notebook_plan(NB, "smoke", "/nonexistent", TUNING_GRIDS={"ties": [0.05, 1.0]})
    assert [c["merge_density"] for c in plan["extension_tuning"]] == [0.05, 1.0]


def rows(run: str, nc: int, sparsity: float, merge: str, density: float | None, interference: list) -> list[dict]:
    base = {"run_id": run, "experiment": "sparse_fedavg", "classes_per_client": nc, "sparsity": sparsity,
            "merge": merge, "merge_density": density}  # fmt: skip
    return [{**base, "round": r + 1, "val_acc": 0.1 * (r + 1), "test_acc": 0.05 * (r + 1), "interference": i}
            for r, i in enumerate(interference)]  # fmt: skip


def test_the_results_view_names_each_variant_and_averages_interference_over_the_rounds():
    table = pd.DataFrame([
        *rows("m0", 1, 0.0, "mean", None, [0.4, 0.2]), *rows("m9", 1, 0.9, "mean", None, [0.3, 0.1]),
        *rows("t0", 1, 0.0, "ties", 0.2, [0.2, 0.2]), *rows("t9", 1, 0.9, "ties", 0.2, [float("nan"), float("nan")]),
        {"run_id": "step0-x", "experiment": "step0", "round": 0, "val_acc": 0.3, "sparsity": None},
    ])  # fmt: skip
    part = extension_rows(table)
    assert "step0-x" not in set(part["run_id"])
    variants = dict(zip(part["run_id"], part["variant"]))
    assert variants == {"m0": "dense, FedAvg mean", "m9": "sparse, FedAvg mean", "t0": "dense, TIES d=0.2",
                        "t9": "sparse, TIES d=0.2"}  # fmt: skip
    summary = extension_summary(table).set_index("variant")
    assert summary["mean_interference"].iloc[:3].tolist() == pytest.approx([0.3, 0.2, 0.2])
    assert summary.loc["dense, FedAvg mean", "last_interference"] == pytest.approx(0.2)
    assert pd.isna(summary.loc["sparse, TIES d=0.2", "mean_interference"])  # trained without the diagnostic
