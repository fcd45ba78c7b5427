"""The two TaLoS-reference options: a client-lr warmup in federated (editing) runs and sensitivity scored on
augmented images; both off by default, so existing run ids stay."""

from __future__ import annotations

import pytest
import torch
from smallrun import CPU, SMALL

from helpers.config.experiments import make_config
from helpers.data.datasets import load_data
from helpers.editing.calibration import Scorer
from helpers.editing.step0 import head_fedavg_config
from helpers.federated.clients import client_lr
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import run_id


@pytest.mark.parametrize("experiment", ["sparse_fedavg", "sparse_centralized"])
def test_defaults_leave_the_options_out(experiment):
    plain = make_config(experiment, "smoke")
    assert not {"warmup_rounds", "score_transform"} & set(plain)
    assert make_config(experiment, "smoke", score_transform="eval") == plain
    assert run_id(make_config(experiment, "smoke", score_transform="train")) != run_id(plain)
    # the dense control has no mask to score: one run id whatever the scoring says
    dense = make_config(experiment, "smoke", sparsity=0.0)
    assert make_config(experiment, "smoke", sparsity=0.0, score_transform="train") == dense


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_client_lr_warms_up_linearly_then_follows_its_schedule(schedule):
    plain = make_config("sparse_fedavg", "smoke", rounds=10, client_lr_schedule=schedule)
    warm = make_config("sparse_fedavg", "smoke", rounds=10, client_lr_schedule=schedule, warmup_rounds=4)
    for rnd in range(10):
        factor = (rnd + 1) / 4 if rnd < 4 else 1.0
        assert client_lr(warm, rnd) == pytest.approx(factor * client_lr(plain, rnd), rel=1e-12)
    assert "warmup_rounds" not in head_fedavg_config(warm)  # step 0 (the head) does not warm up
    with pytest.raises(ValueError, match=r"^warmup_rounds=-1 is invalid: must be an integer >= 0"):
        make_config("fedavg", "smoke", warmup_rounds=-1)


def test_scoring_under_the_training_transform_is_seeded_and_differs_from_eval():
    def scores(transform: str) -> dict:
        config = make_config("sparse_centralized", "smoke", **SMALL, calibration_samples=32, score_transform=transform)
        data = load_data(config, CPU)
        pool = torch.arange(len(data.train_y))
        return Scorer(data, [pool], [("all",)], config)(build_seeded_model(config, CPU))

    train, again, plain = scores("train"), scores("train"), scores("eval")
    assert all(torch.equal(train[n], again[n]) for n in train)
    assert any(not torch.allclose(train[n], plain[n]) for n in train)
