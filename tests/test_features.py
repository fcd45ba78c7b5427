"""Cached backbone features: head-only training on them equals training through the frozen backbone, the cache
is keyed by what the features depend on, survives the process (disk), and a bad cache file is only a miss."""

from __future__ import annotations

import pytest
import torch

from helpers.config.experiments import make_config, train_split_size
from helpers.core import caches
from helpers.data.datasets import load_data
from helpers.federated.rounds import run_fedavg
from helpers.training import features
from helpers.training.centralized import run_centralized
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import load_checkpoint

CPU = torch.device("cpu")
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", train_mode="head")


@pytest.fixture(autouse=True)
def empty_memory_cache():
    caches.FEATURES.clear()
    yield
    caches.FEATURES.clear()


def final_state(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(run, map_location=CPU)["model"]


@pytest.mark.parametrize("experiment", ["centralized", "fedavg"])
def test_cached_head_training_equals_training_through_the_backbone(tmp_path, experiment):
    run_fn, extra = (
        (run_centralized, {"epochs": 2, "eval_test": True})
        if experiment == "centralized"
        else (run_fedavg, {"num_clients": 10, "participation": 0.3, "rounds": 3})
    )
    cached = make_config(experiment, "smoke", **SMALL, **extra)
    through = make_config(experiment, "smoke", **SMALL, **extra, head_features="backbone", augment="none")
    assert cached["augment"] == "none" and cached["head_features"] == "cached"
    a, b = run_fn(cached, run_root=tmp_path, progress=False), run_fn(through, run_root=tmp_path, progress=False)
    assert a.id != b.id
    wa, wb = final_state(a), final_state(b)
    for name in wa:
        tol = 1e-4 if name.startswith("head.") else 0.0  # backbone: frozen, bit-identical
        torch.testing.assert_close(wa[name], wb[name], atol=tol, rtol=tol, msg=name)
    ma, mb = a.metrics(), b.metrics()
    for column in ("val_acc", "test_acc"):  # the heads agree to 1e-4: a prediction at a tie may flip
        assert (ma[column] - mb[column]).abs().max() <= 1 / (600 - train_split_size(cached)) + 1e-9
    for column in ("train_loss", "val_loss", "test_loss"):
        torch.testing.assert_close(
            torch.tensor(ma[column].to_numpy()),
            torch.tensor(mb[column].to_numpy()),
            atol=1e-4,
            rtol=1e-4,
            equal_nan=True,
        )
    assert list((tmp_path / "features").glob("*.pt")), "features were not stored under the run root"


def test_features_persist_on_disk_and_are_reused(tmp_path, monkeypatch):
    config = make_config("centralized", "smoke", **SMALL)
    data, model = load_data(config, CPU), build_seeded_model(config, CPU)
    first = features.split_features(model, data, "val", config, tmp_path)
    expected = features.backbone_features(model, data.val_x, img_size=config["img_size"])
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    caches.FEATURES.clear()  # a new process: only the file is left

    def no_compute(*args, **kwargs):
        raise AssertionError("features recomputed although cached on disk")

    monkeypatch.setattr(features, "backbone_features", no_compute)
    assert torch.equal(features.split_features(model, data, "val", config, tmp_path), first)


def test_key_follows_backbone_weights_split_and_size_not_the_head():
    config = make_config("centralized", "smoke", **SMALL)
    model = build_seeded_model(config, CPU)
    key = features.feature_key(model, config, "train", CPU)
    assert features.feature_key(model, config, "val", CPU) != key
    assert features.feature_key(model, {**config, "img_size": 48}, "train", CPU) != key
    with torch.no_grad():
        model.head.weight.add_(1.0)
        assert features.feature_key(model, config, "train", CPU) == key  # the head does not change features
        model.blocks[0].mlp.fc1.weight[0, 0] += 1e-3
    assert features.feature_key(model, config, "train", CPU) != key


def test_unreadable_cache_file_is_recomputed_with_a_warning(tmp_path):
    config = make_config("centralized", "smoke", **SMALL)
    data, model = load_data(config, CPU), build_seeded_model(config, CPU)
    good = features.split_features(model, data, "test", config, tmp_path)
    (path,) = (tmp_path / "features").glob("test-*.pt")
    path.write_bytes(b"torn")
    caches.FEATURES.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        again = features.split_features(model, data, "test", config, tmp_path)
    assert torch.equal(again, good)
    assert torch.equal(torch.load(path, weights_only=True), good)  # the file was replaced


def test_head_only_config_rules():
    assert make_config("centralized", "smoke", train_mode="head")["augment"] == "none"
    assert make_config("centralized", "smoke", train_mode="head", head_features="backbone")["augment"] == "crop"
    assert make_config("centralized", "smoke")["augment"] == "crop"  # full fine-tuning keeps its augmentation
    with pytest.raises(ValueError, match="augment='crop' is invalid with train_mode='head'.*head_features"):
        make_config("fedavg", "smoke", train_mode="head", augment="crop")
    with pytest.raises(ValueError, match="split='bogus'"):
        features.split_features(None, None, "bogus", {})


def test_head_view_only_for_cached_head_runs(tmp_path):
    config = make_config("centralized", "smoke", **SMALL)
    data, model = load_data(config, CPU), build_seeded_model(config, CPU)
    net, inputs = features.head_view(model, data, config, tmp_path)
    assert net is model.head and inputs.train_x.shape == (len(data.train_y), model.num_features)
    assert inputs.train_x.is_floating_point() and inputs.train_y is data.train_y
    for other in ({**config, "train_mode": "full"}, {**config, "head_features": "backbone"}):
        assert features.head_view(model, data, other, tmp_path) == (model, data)
