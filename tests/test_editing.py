"""Model editing runs: masked entries and the head never move, exact density, federated step 0 without pooled
data, upload accounting, validation before any compute, exact resume without recalibration."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import centralized, editing, fedavg
from helpers.__main__ import main
from helpers.centralized import build_seeded_model
from helpers.config import make_config
from helpers.data import load_data
from helpers.editing import (
    EDITING_FILE,
    calibrate_federated,
    fit_head,
    fit_head_federated,
    load_masks,
    ridge_statistics,
    run_sparse_centralized,
    run_sparse_fedavg,
    solve_ridge,
)
from helpers.fedavg import client_shards
from helpers.models import backbone_parameters
from helpers.runs import load_artifact, load_checkpoint

CPU = torch.device("cpu")
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", calibration_batches=1)


def central_config(**overrides) -> dict:
    return make_config("sparse_centralized", "smoke", **{**SMALL, "epochs": 2, "calibration_rounds": 2, **overrides})


def federated_config(**overrides) -> dict:
    base = {**SMALL, "num_clients": 10, "participation": 0.3, "rounds": 2, "calibration_rounds": 2}
    return make_config("sparse_fedavg", "smoke", **{**base, **overrides})


class Interrupted(Exception):
    pass


def initial_weights(run) -> dict[str, torch.Tensor]:
    """The weights sparse fine-tuning starts from: the seeded backbone and the saved step-0 head."""
    model = build_seeded_model(run.config, CPU)
    model.head.load_state_dict(load_artifact(run, EDITING_FILE)["head"])
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_masked_entries_unchanged(weights: dict, start: dict, masks: dict) -> None:
    moved = 0
    for n, p in start.items():
        if n.startswith("head."):
            assert torch.equal(weights[n], p), f"head {n} changed after step 0"
            continue
        frozen = ~masks[n]
        assert torch.equal(weights[n][frozen], p[frozen]), f"frozen entries of {n} moved"
        moved += int((weights[n][masks[n]] != p[masks[n]]).sum())
    assert moved > 0, "no trainable entry moved: the test would prove nothing"


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    """One sparse FedAvg run (step 0 by FedAvg on the head), with the global weights after every round."""
    snapshots = []

    def spy(model, *args, **kwargs):
        row = real_round(model, *args, **kwargs)
        if kwargs.get("masks") is not None:  # not the step-0 head run
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return row

    real_round = fedavg.fedavg_round
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fedavg, "fedavg_round", spy)
        run = run_sparse_fedavg(federated_config(step0="sgd"), run_root=tmp_path_factory.mktemp("fed"), progress=False)
    return run, snapshots


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    return run_sparse_centralized(central_config(sparsity=0.95), run_root=tmp_path_factory.mktemp("c"), progress=False)


def test_federated_masked_entries_and_head_never_change(fed_run):
    run, snapshots = fed_run
    assert len(snapshots) == run.config["rounds"]
    start, masks = initial_weights(run), load_masks(run)
    assert not torch.equal(start["head.weight"], build_seeded_model(run.config, CPU).head.weight.detach())
    for weights in snapshots:
        assert_masked_entries_unchanged(weights, start, masks)


def test_upload_bytes_count_the_global_mask(fed_run):
    run, _ = fed_run
    nnz = sum(int(m.sum()) for m in load_masks(run).values())
    m = max(1, round(run.config["participation"] * run.config["num_clients"]))
    assert (run.metrics()["upload_bytes"] == 4 * nnz * m).all()
    summary = run.summary()
    assert summary["calibration_samples"] == 10 * 16 * 2  # K clients x one batch x R rounds
    assert summary["calibration_upload_bytes"] == 4 * summary["backbone_entries"] * 10 * 2


def test_centralized_masked_entries_unchanged_and_density_exact(central_run):
    run = central_run
    masks = load_masks(run)
    weights = load_checkpoint(run)["model"]
    assert_masked_entries_unchanged(weights, initial_weights(run), masks)
    total = sum(m.numel() for m in masks.values())
    nnz = sum(int(m.sum()) for m in masks.values())
    assert abs(nnz - (1 - 0.95) * total) <= len(masks)
    assert set(masks) == set(backbone_parameters(build_seeded_model(run.config, CPU)))
    assert run.summary()["calibration_samples"] == 16 * 2 and run.summary()["calibration_s"] >= 0


def test_ridge_from_summed_client_statistics_equals_pooled_ridge():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 12, generator=gen), torch.randint(0, 7, (300,), generator=gen)
    shards = torch.randperm(300, generator=gen).split([10, 90, 150, 50])
    stats = [ridge_statistics(x[s], y[s], num_classes=7) for s in shards]
    summed = solve_ridge(sum(a for a, _ in stats), sum(b for _, b in stats), lam=0.5)
    pooled = solve_ridge(*ridge_statistics(x, y, num_classes=7), lam=0.5)
    for a, b in zip(summed, pooled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The runners' own code paths: federated step 0 from client shards == centralized ridge on the train split.
    config = federated_config(step0="ridge")
    data = load_data(config, CPU)
    fed, pool = build_seeded_model(config, CPU), build_seeded_model(config, CPU)
    fit_head_federated(fed, data, client_shards(config, data), config)
    fit_head(pool, data, config)
    torch.testing.assert_close(fed.head.weight, pool.head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fed.head.bias, pool.head.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runner", [run_sparse_centralized, run_sparse_fedavg])
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sparsity": 1.0}, r"sparsity=1\.0 is invalid"),
        (
            {"calibration_rounds": 2, "mask_rule": "random"},
            r"calibration_rounds=2.*least_sensitive/most_sensitive",
        ),
        ({"mask_rule": "largest"}, r"mask_rule='largest' is invalid"),
    ],
)
def test_bad_parameters_rejected_before_any_data_or_weights(monkeypatch, tmp_path, runner, overrides, message):
    def loaded(*args, **kwargs):
        raise AssertionError("data or weights were loaded before validation")

    monkeypatch.setattr(editing, "run_inputs", loaded)
    with pytest.raises(ValueError, match=message):
        runner(run_root=tmp_path, progress=False, **SMALL, **overrides)
    assert not any(tmp_path.iterdir())


def test_cli_knows_sparse_experiments_and_reports_bad_values(capsys):
    assert main(["run", "sparse_fedavg", "--set", "sparsity=1"]) == 2
    assert "sparsity=1.0 is invalid" in capsys.readouterr().err


def _without_elapsed(run) -> pd.DataFrame:
    return run.metrics().drop(columns="elapsed_s")


def _interrupt_after_first_checkpoint(monkeypatch, module, experiment):
    real = module.save_checkpoint

    def save_then_stop(run, state):
        real(run, state)
        if run.experiment == experiment:
            raise Interrupted

    monkeypatch.setattr(module, "save_checkpoint", save_then_stop)


def _forbid_recalibration(monkeypatch):
    def again(*args, **kwargs):
        raise AssertionError("a resumed run must load step 0 and the masks, not recompute them")

    for name in ("calibrate_masks", "fit_head", "fit_head_federated"):
        monkeypatch.setattr(editing, name, again)


@pytest.mark.parametrize("kind", ["centralized", "federated"])
def test_interrupted_run_resumes_to_the_same_result(monkeypatch, tmp_path, kind, central_run, fed_run):
    reference = central_run if kind == "centralized" else fed_run[0]
    runner = run_sparse_centralized if kind == "centralized" else run_sparse_fedavg
    module = centralized if kind == "centralized" else fedavg
    with monkeypatch.context() as mp:
        _interrupt_after_first_checkpoint(mp, module, reference.experiment)
        with pytest.raises(Interrupted):
            runner(reference.config, run_root=tmp_path, progress=False)
    _forbid_recalibration(monkeypatch)
    resumed = runner(reference.config, run_root=tmp_path, progress=False)
    assert resumed.done and resumed.id == reference.id
    pd.testing.assert_frame_equal(_without_elapsed(resumed), _without_elapsed(reference))
    a, b = load_masks(resumed), load_masks(reference)
    assert all(torch.equal(a[n], b[n]) for n in b)
    same = {k: v for k, v in resumed.summary().items() if not k.endswith("_s")}
    assert same == {k: v for k, v in reference.summary().items() if not k.endswith("_s")}


def test_local_masks_one_per_client_and_one_shot_rules_score_nothing(tmp_path):
    config = federated_config(sharding="noniid", classes_per_client=10, mask_scope="local", calibration_rounds=1)
    run = run_sparse_fedavg(config, run_root=tmp_path, progress=False)
    masks = load_masks(run)
    assert len(masks) == 10 and not torch.equal(
        masks[0]["blocks.0.attn.qkv.weight"], masks[1]["blocks.0.attn.qkv.weight"]
    )
    first = run.metrics().iloc[0]
    nnz = [sum(int(m.sum()) for m in masks[int(k)].values()) for k in first["clients"].split()]
    assert first["upload_bytes"] == 4 * sum(nnz) and run.summary()["calibration_upload_bytes"] == 0
    magnitude = federated_config(mask_rule="lowest_magnitude", calibration_rounds=1)
    data = load_data(magnitude, CPU)
    _, cost = calibrate_federated(build_seeded_model(magnitude, CPU), data, client_shards(magnitude, data), magnitude)
    assert cost["calibration_samples"] == 0 and cost["calibration_upload_bytes"] == 0
