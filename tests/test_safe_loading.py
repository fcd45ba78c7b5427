"""Planted files never run: a pickle whose __reduce__ would create a marker file, put where the project loads torch
files, is refused without running, and the run recovers as from a corrupt file."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from helpers.config.experiments import make_config
from helpers.core import caches
from helpers.core.torchfiles import UnreadableFile, load_torch, save_torch, torch_bytes
from helpers.data.datasets import load_data
from helpers.training import features
from helpers.training.resumable import build_seeded_model

CPU = torch.device("cpu")
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu")


class Payload:
    """What an attacker plants: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(path: Path, marker: Path, as_torch_file: bool = True) -> None:
    """Replace `path` with a payload: a torch zip file holding it (as torch.save writes), or a bare pickle."""
    if as_torch_file:
        buffer = io.BytesIO()
        torch.save({"model": Payload(marker), "round": 99}, buffer)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(pickle.dumps([Payload(marker)]))


@pytest.mark.parametrize("as_torch_file", [True, False], ids=["torch-zip", "bare-pickle"])
def test_the_one_loader_refuses_a_planted_pickle_naming_the_file(as_torch_file, tmp_path):
    path, marker = tmp_path / "checkpoint-x-3.pt", tmp_path / "marker"
    plant(path, marker, as_torch_file)
    with pytest.raises(UnreadableFile, match=rf"{path}.*(refused \(it names .*open|unreadable)") as error:
        load_torch(path)
    assert not marker.exists()
    if as_torch_file:
        assert "a file that could run code is never unpickled" in str(error.value)
    save_torch(path, {"model": {"w": torch.ones(2)}, "loss": torch.tensor(1.0).numpy()[()], "rows": [{"a": 1}]})
    assert load_torch(path)["loss"] == 1.0  # the writer stores plain numbers: every file it writes loads safely


def test_a_planted_feature_cache_is_recomputed(tmp_path):
    config = make_config("centralized", "smoke", **SMALL)
    data, model = load_data(config, CPU), build_seeded_model(config, CPU)
    good = features.split_features(model, data, "test", config, tmp_path)
    (path,) = (tmp_path / "features").glob("test-*.pt")
    marker = tmp_path / "marker"
    plant(path, marker)
    caches.FEATURES.clear()
    with pytest.warns(UserWarning, match="feature cache: .* was refused"):
        again = features.split_features(model, data, "test", config, tmp_path)
    assert not marker.exists() and torch.equal(again, good)
    path.write_bytes(torch_bytes(torch.zeros(3, 2)))  # plain, but not this split's features
    caches.FEATURES.clear()
    with pytest.warns(UserWarning, match="does not hold 100 rows"):
        assert torch.equal(features.split_features(model, data, "test", config, tmp_path), good)
