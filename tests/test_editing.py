"""Model editing runs: masked entries and the head never move, exact density, federated step 0 without pooled
data, upload accounting, validation before any compute, exact resume without recalibration."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers.config.experiments import make_config, train_split_size
from helpers.core.models import backbone_parameters
from helpers.data.datasets import load_data
from helpers.editing import calibration, sparse_runs
from helpers.editing.calibration import EDITING_FILE, Scorer, calibrate_centralized, calibrate_federated, load_masks
from helpers.editing.sample_counts import sample_count_study
from helpers.editing.sparse_runs import run_sparse_centralized, run_sparse_fedavg
from helpers.editing.step0 import fit_head, fit_head_federated, head_fedavg_config, ridge_statistics, solve_ridge
from helpers.federated import rounds
from helpers.federated.clients import client_shards, sample_clients
from helpers.ops.cli import main
from helpers.reporting.labels import with_labels
from helpers.reporting.results import dense_fedavg_reference, step0_rows, summary_table
from helpers.sparse.mask_stats import mask_jaccard
from helpers.training import centralized, resumable
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import load_artifact, load_checkpoint

CPU = torch.device("cpu")
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", calibration_samples=16)


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

    real_round = rounds.fedavg_round
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rounds, "fedavg_round", spy)
        run = run_sparse_fedavg(federated_config(step0="sgd"), run_root=tmp_path_factory.mktemp("fed"), progress=False)
    return run, snapshots


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    return run_sparse_centralized(central_config(sparsity=0.95), run_root=tmp_path_factory.mktemp("c"), progress=False)


def test_federated_masked_entries_and_head_never_change(fed_run):
    run, snapshots = fed_run
    assert len(snapshots) == run.config["rounds"]
    start, masks = initial_weights(run), load_masks(run).shared
    assert not torch.equal(start["head.weight"], build_seeded_model(run.config, CPU).head.weight.detach())
    for weights in snapshots:
        assert_masked_entries_unchanged(weights, start, masks)


def test_upload_bytes_count_the_global_mask(fed_run):
    run, _ = fed_run
    nnz = sum(int(m.sum()) for m in load_masks(run).shared.values())
    m = max(1, round(run.config["participation"] * run.config["num_clients"]))
    assert (run.metrics()["upload_bytes"] == 4 * nnz * m).all()
    summary = run.summary()
    assert summary["calibration_scored"] == 10 * 16 * 2  # K clients x one batch x R rounds
    assert summary["calibration_upload_bytes"] == 4 * summary["backbone_entries"] * 10 * 2


def test_centralized_masked_entries_unchanged_and_density_exact(central_run):
    run = central_run
    masks = load_masks(run).shared
    weights = load_checkpoint(run)["model"]
    assert_masked_entries_unchanged(weights, initial_weights(run), masks)
    total = sum(m.numel() for m in masks.values())
    nnz = sum(int(m.sum()) for m in masks.values())
    assert abs(nnz - (1 - 0.95) * total) <= len(masks)
    assert set(masks) == set(backbone_parameters(build_seeded_model(run.config, CPU)))
    assert run.summary()["calibration_scored"] == 16 * 2 and run.summary()["calibration_s"] >= 0


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


def test_step0_head_run_makes_step0_epochs_passes_with_the_clients_fedavg_samples():
    """The head run's rounds come from the m that FedAvg samples: C*K = 2.5 gives 3 clients (rounded half up)."""
    config = federated_config(num_clients=100, participation=0.025)
    head = head_fedavg_config(config)
    m = len(sample_clients(head["seed"], 0, head["num_clients"], head["participation"]))
    per_round, need = m * head["local_steps"] * head["batch_size"], config["step0_epochs"] * train_split_size(config)
    assert m == 3 and per_round * head["rounds"] >= need > per_round * (head["rounds"] - 1)


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

    monkeypatch.setattr(resumable, "run_inputs", loaded)
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

    monkeypatch.setattr(calibration, "calibrate_masks", again)
    for name in ("fit_head", "fit_head_federated"):
        monkeypatch.setattr(sparse_runs, name, again)


@pytest.mark.parametrize("kind", ["centralized", "federated"])
def test_interrupted_run_resumes_to_the_same_result(monkeypatch, tmp_path, kind, central_run, fed_run):
    reference = central_run if kind == "centralized" else fed_run[0]
    runner = run_sparse_centralized if kind == "centralized" else run_sparse_fedavg
    with monkeypatch.context() as mp:
        _interrupt_after_first_checkpoint(mp, resumable, reference.experiment)
        with pytest.raises(Interrupted):
            runner(reference.config, run_root=tmp_path, progress=False)
    _forbid_recalibration(monkeypatch)
    resumed = runner(reference.config, run_root=tmp_path, progress=False)
    assert resumed.done and resumed.id == reference.id
    pd.testing.assert_frame_equal(_without_elapsed(resumed), _without_elapsed(reference))
    a, b = load_masks(resumed).shared, load_masks(reference).shared
    assert all(torch.equal(a[n], b[n]) for n in b)
    same = {k: v for k, v in resumed.summary().items() if not k.endswith("_s")}
    assert same == {k: v for k, v in reference.summary().items() if not k.endswith("_s")}


def test_local_masks_one_per_client_and_one_shot_rules_score_nothing(tmp_path):
    config = federated_config(sharding="noniid", classes_per_client=10, mask_scope="local", calibration_rounds=1)
    run = run_sparse_fedavg(config, run_root=tmp_path, progress=False)
    local = load_masks(run)
    masks = [local.of_client(k) for k in range(len(local.packed_clients))]
    assert (
        local.local
        and len(masks) == 10
        and not torch.equal(masks[0]["blocks.0.attn.qkv.weight"], masks[1]["blocks.0.attn.qkv.weight"])
    )
    first = run.metrics().iloc[0]
    nnz = [sum(int(m.sum()) for m in masks[int(k)].values()) for k in first["clients"].split()]
    assert first["upload_bytes"] == 4 * sum(nnz) and run.summary()["calibration_upload_bytes"] == 0
    magnitude = federated_config(mask_rule="lowest_magnitude", calibration_rounds=1)
    data = load_data(magnitude, CPU)
    _, cost = calibrate_federated(build_seeded_model(magnitude, CPU), data, client_shards(magnitude, data), magnitude)
    assert cost["calibration_scored"] == 0 and cost["calibration_upload_bytes"] == 0


# ----------------------------------------------------------------------------- calibration data and masked set


def test_every_calibration_round_draws_fresh_labels():
    """Scoring the same weights twice: talos scores change (new labels), the true-label scores do not."""
    config = central_config()
    data = load_data(config, CPU)
    model = build_seeded_model(config, CPU)
    scores = {}
    for method in ("talos", "empirical"):
        scorer = Scorer(data, [torch.arange(len(data.train_y))], [("pool",)], {**config, "score_method": method})
        scores[method] = [scorer(model), scorer(model)]
        assert scorer.samples == 2 * config["calibration_samples"]
    first, second = scores["talos"]
    assert any(not torch.equal(first[n], second[n]) for n in first)
    first, second = scores["empirical"]
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_sample_count_is_per_round_and_capped_by_the_pool(monkeypatch):
    config = federated_config(calibration_samples=40)  # smoke shards hold 54 samples: 40 fit, 100 do not
    data = load_data(config, CPU)
    shards = client_shards(config, data)
    model = build_seeded_model(config, CPU)
    for n, per_pool in ((40, [40] * 10), (100, [len(s) for s in shards])):
        scorer = Scorer(data, shards, [("client", k) for k in range(10)], {**config, "calibration_samples": n})
        scorer(model)
        assert scorer.samples == sum(per_pool)
    monkeypatch.delenv("FLME_PROFILE", raising=False)  # it would override the profile asked for
    default = make_config("sparse_fedavg", "full", num_clients=40)
    assert default["calibration_samples"] * 40 >= 5000 and (default["calibration_samples"] - 1) * 40 < 5000
    assert make_config("sparse_centralized", "full")["calibration_samples"] == 5000


def test_dense_embeddings_train_densely_and_the_rest_stays_masked(tmp_path):
    run = run_sparse_centralized(central_config(sparsity=0.95, embeddings="dense"), run_root=tmp_path, progress=False)
    masks, start = load_masks(run).shared, initial_weights(run)
    weights = load_checkpoint(run)["model"]
    assert not {"cls_token", "pos_embed"} & set(masks)
    assert set(masks) | {"cls_token", "pos_embed"} == set(backbone_parameters(build_seeded_model(run.config, CPU)))
    for name in ("cls_token", "pos_embed"):  # dense: every entry free to move, and they do
        assert (weights[name] != start[name]).float().mean() > 0.9, name
    kept = lambda weights: {n: w for n, w in weights.items() if n in masks or n.startswith("head.")}  # noqa: E731
    assert_masked_entries_unchanged(kept(weights), kept(start), masks)
    nnz, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert abs(nnz - 0.05 * total) <= len(masks)  # the density is over the masked tensors


@pytest.mark.parametrize("runner, config", [(run_sparse_centralized, central_config),
                                            (run_sparse_fedavg, federated_config)])  # fmt: skip
def test_masks_missing_a_parameter_are_refused_before_training(monkeypatch, tmp_path, runner, config):
    real = calibration.calibrate_masks

    def drops_one(*args, **kwargs):
        masks = real(*args, **kwargs)
        del masks["blocks.0.attn.qkv.weight"]
        return masks

    monkeypatch.setattr(calibration, "calibrate_masks", drops_one)
    trained = []
    monkeypatch.setattr(centralized, "train_steps", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=r"no mask for \['blocks\.0\.attn\.qkv\.weight'\].*train densely"):
        runner(config(sparsity=0.9, step0="ridge"), run_root=tmp_path, progress=False)
    assert not trained


# ----------------------------------------------------------------------------- controls


def test_dense_control_is_one_canonical_run_through_the_same_engine(tmp_path):
    """Sparsity 0: no calibration (nothing scored), every backbone entry trainable, the step-0 head frozen; the
    mask settings do not matter, so every notebook's control with the same step 0 and budget is the same run."""
    a = central_config(sparsity=0.0, calibration_rounds=4, mask_rule="most_sensitive", calibration_samples=99)
    b = central_config(sparsity=0.0, calibration_rounds=1, mask_rule="random", embeddings="dense")
    assert a == b and a["calibration_rounds"] == 1
    run = run_sparse_centralized(a, run_root=tmp_path, progress=False)
    summary, start, weights = run.summary(), initial_weights(run), load_checkpoint(run)["model"]
    assert summary["calibration_scored"] == 0 and summary["mask_density"] == 1.0
    assert all(bool(m.all()) for m in load_masks(run).shared.values())
    for name, w in start.items():
        assert torch.equal(weights[name], w) == name.startswith("head."), name


def test_step0_rows_give_one_control_row_per_step0_model(tmp_path):
    runs = [run_sparse_centralized(central_config(sparsity=s, epochs=1), run_root=tmp_path, progress=False)
            for s in (0.9, 0.0)] + [run_sparse_centralized(central_config(sparsity=0.9, epochs=1, seed=1),
                                                           run_root=tmp_path, progress=False)]  # fmt: skip
    rows = step0_rows(runs)
    assert len(rows) == 2 and set(rows["experiment"]) == {"step0"} and (rows["epoch"] == 0).all()
    for _, row in rows.iterrows():
        summary = next(r.summary() for r in runs if r.config["seed"] == row["seed"])
        assert row["test_acc"] == summary["step0_test_acc"] and row["val_loss"] == summary["step0_val_loss"]
        assert pd.isna(row.get("sparsity"))
    labels = with_labels(pd.concat([summary_table(runs), rows]))
    assert list(labels["method"]) == ["sparse s=0.9 R=2", "dense, step-0 head", "sparse s=0.9 R=2", "step-0 model",
                                      "step-0 model"]  # fmt: skip


def test_sample_count_study_compares_prefixes_with_the_largest(tmp_path):
    config = central_config(sparsity=0.9, calibration_rounds=1)
    data = load_data(config, CPU)
    model = build_seeded_model(config, CPU)
    fit_head(model, data, config)
    table, _ = sample_count_study(model, data, config, [64, 16, 32])
    assert list(table["calibration_samples"]) == [16, 32, 64] and table["jaccard_vs_largest"].iloc[-1] == 1.0
    assert (table["jaccard_vs_largest"].iloc[:-1] < 1).all()
    masks = calibrate_centralized(model, data, {**config, "calibration_samples": 32})[0].shared
    direct = mask_jaccard(masks, calibrate_centralized(model, data, {**config, "calibration_samples": 64})[0].shared)
    assert table["jaccard_vs_largest"].iloc[1] == pytest.approx(direct)


def test_dense_reference_keeps_only_the_matching_runs_and_settings(monkeypatch, tmp_path):
    """05/06 compare against 02/03's dense runs of their own shardings only: 03 may have run other Nc."""
    monkeypatch.setenv("FLME_RESULTS_ROOT", str(tmp_path))
    (tmp_path / "smoke").mkdir()
    rows = [("iid", None, 0.01), ("noniid", 1, 0.01), ("noniid", 5, 0.01), ("noniid", 10, 0.01), ("noniid", 1, 0.1)]
    table = pd.DataFrame(
        [
            {"run_id": f"r{i}", "round": r, "sharding": sh, "classes_per_client": nc, "lr": lr, "train_mode": "full"}
            for i, (sh, nc, lr) in enumerate(rows)
            for r in (1, 2)
        ]
    )
    table[table["sharding"] == "iid"].to_csv(tmp_path / "smoke" / "fedavg_iid.csv", index=False)
    table[table["sharding"] != "iid"].to_csv(tmp_path / "smoke" / "fedavg_noniid.csv", index=False)
    picked = dense_fedavg_reference("smoke", [("noniid", 1), ("iid", None), ("noniid", 50)], lr=0.01)
    assert sorted(set(picked["run_id"])) == ["r0", "r1"] and len(picked) == 4
    assert sorted(set(dense_fedavg_reference("smoke", lr=0.01)["run_id"])) == ["r0", "r1", "r2", "r3"]
    assert dense_fedavg_reference("full", [("iid", None)]).empty
