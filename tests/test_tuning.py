"""The remedies tuned alike (notebook 05): every method tunes its own hyperparameter over its grid with the same
number of runs and the same budget, on the validation split only, at the hardest heterogeneity; the comparison runs
each at the value chosen; bad tuning input stops before any compute."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers.algorithms.registry import ALGORITHMS, algorithm_class, algorithm_name
from helpers.ops import plans, tuning
from helpers.ops.cli import main
from helpers.ops.plans import notebook_plan, remedy_plan
from helpers.training.loop import NonFiniteLossError
from helpers.training.runs import run_id

THREE = ["fedavg", "fedprox", "fedadam"]


class FakeRun:
    """A finished run as the tuning reads it: its config and its metrics rows (val and test accuracy per round)."""

    experiment = "sparse_fedavg"

    def __init__(self, config: dict, val_acc: float, test_acc: float):
        self.config, self.id, self.done = config, run_id(config), True
        self.rows = pd.DataFrame({"round": [1, 2], "val_acc": [0.0, val_acc], "test_acc": [0.0, test_acc]})

    def metrics(self) -> pd.DataFrame:
        return self.rows.copy()

    def summary(self) -> dict:
        return {"val_acc": float(self.rows["val_acc"].iloc[-1])}


def test_every_method_gets_its_grid_with_the_same_count_and_budget():
    plan = notebook_plan(
        "05_federated_editing", "smoke", "/nonexistent", REMEDIES=THREE, REMEDY_NC=[5, 1], EXTENSION=False
    )  # its own tuning: tests/test_extension_study.py
    tuned = plan["tuning"]
    assert plan.waiting == ("remedies",)  # the comparison's values are not known before the tuning
    for algorithm in THREE:
        name, grid = algorithm_class(algorithm).tuning
        mine = [c for c in tuned if algorithm_name(c) == algorithm]
        assert [c[name] for c in mine] == list(grid) and len(grid) >= 3
    assert {(c["classes_per_client"], c["sparsity"], c["rounds"], c["local_steps"]) for c in tuned} == {
        (1, 0.0, max(1, -(-plan["remedies"][0]["rounds"] // 2)), 8)  # the hardest Nc, dense, half the rounds, J=8
    }
    assert len({c["algorithm"] if "algorithm" in c else "fedavg" for c in tuned}) == len(THREE)


def test_every_algorithm_declares_a_grid_of_its_own_parameter():
    for name in ALGORITHMS:
        param, grid = algorithm_class(name).tuning
        assert param in algorithm_class(name).params and len(grid) >= 3 and len(set(grid)) == len(grid)


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"TUNING_SPLIT": "test"}, r"^TUNING_SPLIT='test' is invalid: must be one of val"),
        ({"TUNING_GRIDS": {"fedprox": [0.1]}}, r"TUNING_GRIDS\['fedprox'\].*at least two values"),
        ({"TUNING_GRIDS": {"fedprox": [-1.0, 0.1]}}, r"TUNING_GRIDS\['fedprox'\]: prox_mu=-1.0 is invalid"),
        ({"TUNING_GRIDS": {"fedadam": [0.0, 1.0]}}, r"server_lr=0.0 is invalid: must be a number > 0"),
        ({"TUNING_GRIDS": {"fedyogi": [0.1, 1.0]}}, r"TUNING_GRIDS names \['fedyogi'\], which this comparison"),
        ({"TUNING_BUDGET": 0.0}, r"^TUNING_BUDGET=0.0 is invalid: must be a number in \(0, 1\]"),
    ],
)
def test_bad_tuning_input_stops_before_any_compute(parameters, message):
    with pytest.raises(ValueError, match=message):
        notebook_plan("05_federated_editing", "smoke", "/nonexistent", REMEDIES=THREE, **parameters)


def test_the_pipeline_refuses_bad_tuning_input_in_one_line_with_exit_2(capsys, tmp_path):
    argv = ["pipeline", "--notebooks", "05", "--output-dir", str(tmp_path), "-p", "TUNING_SPLIT", "test"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TUNING_SPLIT='test' is invalid") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # no notebook ran


def test_the_value_chosen_is_the_best_on_validation_never_on_test():
    plan = notebook_plan("05_federated_editing", "smoke", "/nonexistent", REMEDIES=["fedprox"])
    low, mid, high = plan["tuning"]  # mu 0.01, 0.1, 1
    runs = [FakeRun(low, val_acc=0.30, test_acc=0.90), FakeRun(mid, 0.50, 0.10), FakeRun(high, 0.40, 0.20)]
    assert tuning.chosen_values(runs) == {"fedprox": ("prox_mu", 0.1)}
    table = tuning.tuning_table(runs)
    assert table["chosen"].tolist() == [False, True, False] and table["val_acc"].tolist() == [0.30, 0.50, 0.40]


def test_a_diverging_candidate_is_recorded_and_never_chosen(tmp_path, monkeypatch):
    plan = notebook_plan("05_federated_editing", "smoke", tmp_path, REMEDIES=["fedprox"])
    low, mid, high = plan["tuning"]

    def train(config, run_root=None, progress=True):
        if config is high:  # the largest mu: its loss would become non-finite
            raise NonFiniteLossError("round 1, client 3: training loss became nan")
        return FakeRun(config, val_acc=0.2 if config is low else 0.1, test_acc=0.5)

    monkeypatch.setattr(tuning, "run_sparse_fedavg", train)
    runs = tuning.train_tuning([low, mid, high], tmp_path)
    assert tuning.diverged(runs[2]) and runs[2].summary()["error"].endswith("became nan")
    assert tuning.chosen_values(runs) == {"fedprox": ("prox_mu", 0.01)}
    assert tuning.tuning_table(runs)["diverged"].tolist() == [False, False, True]


def test_once_the_tuning_is_done_the_comparison_runs_each_method_at_its_chosen_value(monkeypatch):
    plan = notebook_plan("05_federated_editing", "smoke", "/nonexistent", REMEDIES=THREE, EXTENSION=False)
    scores = {0: 0.1, 1: 0.5, 2: 0.3}  # the middle value of every grid wins on validation
    fake = {run_id(c): FakeRun(c, scores[i % 3], 0.0) for i, c in enumerate(plan["tuning"])}
    monkeypatch.setattr(plans, "finished_runs", lambda e, configs, root: [fake[run_id(c)] for c in configs])
    # the sparse arm's R fixed (else it waits for the grid's runs, which this test does not fake)
    done = notebook_plan(
        "05_federated_editing", "smoke", "/nonexistent", REMEDIES=THREE, EXTENSION=False, REMEDY_CALIBRATION_ROUNDS=1
    )
    chosen = {a: (algorithm_class(a).tuning[0], algorithm_class(a).tuning[1][1]) for a in THREE}
    assert done.waiting == () and done.info["chosen"] == chosen
    assert done["remedies"] == remedy_plan(done.info["base"], THREE, [1, 5], 8, chosen)
    assert all(c[chosen[algorithm_name(c)][0]] == chosen[algorithm_name(c)][1] for c in done["remedies"])
