"""Post-hoc task-vector scaling of a finished federated run: alpha = 1 is the run (its final validation and test
metrics), alpha = 0 its starting model (the seeded model; the step-0 model of a sparse run), alpha chosen on validation
and the test split evaluated there only."""

from __future__ import annotations

import math

import pytest
import torch
from smallrun import SMALL

from helpers.config.experiments import make_config
from helpers.data.datasets import load_data
from helpers.editing.scaling import scale_task_vector
from helpers.editing.sparse_runs import run_sparse_fedavg
from helpers.federated.rounds import run_fedavg
from helpers.training.loop import evaluate
from helpers.training.resumable import build_seeded_model

FED = dict(num_clients=6, participation=0.5, local_steps=2, rounds=2, lr=0.1)
SPARSE = dict(sparsity=0.9, calibration_rounds=1, calibration_samples=16, step0_epochs=1)


def check_the_endpoints(table, run, start: dict[str, float]) -> None:
    final = run.summary()
    one, zero = table[table["alpha"] == 1.0].iloc[0], table[table["alpha"] == 0.0].iloc[0]
    assert one["val_acc"] == final["val_acc"] and one["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert zero["val_acc"] == start["acc"] and zero["val_loss"] == pytest.approx(start["loss"], rel=1e-6)
    chosen = table[table["chosen"]]
    assert len(chosen) == 1 and chosen["val_acc"].iloc[0] == table["val_acc"].max()  # chosen on validation
    assert table.loc[~table["chosen"], "test_acc"].isna().all() and not math.isnan(chosen["test_acc"].iloc[0])
    if chosen["alpha"].iloc[0] == 1.0:  # the run itself: its own test result
        assert chosen["test_acc"].iloc[0] == final["test_acc"]
    assert (table["run_id"] == run.id).all() and (table["lr"] == run.config["lr"]).all()  # tidy: config columns


def test_scaling_a_dense_federated_run(tmp_path):
    config = make_config("fedavg", "smoke", **SMALL, **FED)
    run = run_fedavg(config, run_root=tmp_path, progress=False)
    table = scale_task_vector(run, alphas=(0.0, 0.5, 1.0, 2.0))
    data = load_data(config, torch.device("cpu"))
    start = evaluate(build_seeded_model(config, torch.device("cpu")), data.val_x, data.val_y, img_size=32)
    check_the_endpoints(table, run, start)
    assert table["val_acc"].nunique() > 1  # scaling changes the model


def test_scaling_a_sparse_federated_run_starts_from_its_step0_model(tmp_path):
    config = make_config("sparse_fedavg", "smoke", **SMALL, **FED, **SPARSE)
    run = run_sparse_fedavg(config, run_root=tmp_path, progress=False)
    table = scale_task_vector(run, alphas=(0.0, 1.0, 1.5))
    summary = run.summary()
    check_the_endpoints(table, run, {"acc": summary["step0_val_acc"], "loss": summary["step0_val_loss"]})


def test_an_unfinished_run_is_refused(tmp_path):
    from helpers.training.runs import open_run

    run = open_run("fedavg", make_config("fedavg", "smoke", **SMALL, **FED), tmp_path)
    with pytest.raises(RuntimeError, match="is not finished"):
        scale_task_vector(run)
