"""Planted files never run: a pickle whose __reduce__ would create a marker file, put where the project loads torch
files (checkpoints, editing.pt, SCAFFOLD's c_i, the feature cache), is refused without running, and the run recovers
as from a corrupt file: the previous checkpoint, a fresh start, a recomputed file, or an error naming the file."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers.config.experiments import make_config
from helpers.core import caches
from helpers.core.torchfiles import UnreadableFile, load_torch, save_torch, torch_bytes
from helpers.data.datasets import load_data
from helpers.editing.calibration import EDITING_FILE, load_masks
from helpers.editing.sparse_runs import run_sparse_centralized
from helpers.federated import rounds as fedavg
from helpers.training import features
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import checkpoint_files, load_checkpoint

CPU = torch.device("cpu")
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu")
FEDERATED = dict(num_clients=10, participation=0.3, local_steps=2, rounds=3, checkpoint_every=1)


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


class Killed(Exception):
    pass


def fedavg_config(**overrides) -> dict:
    return make_config("fedavg", "smoke", **{**SMALL, **FEDERATED, **overrides})


def interrupted_after(rounds: int, config: dict, root: Path, monkeypatch) -> Path:
    """The run folder of `config` killed at the start of round `rounds` (0-based): `rounds` checkpoints on disk."""
    original = fedavg.fedavg_round

    def killed(model, data, shards, rnd, config, **kwargs):
        if rnd == rounds:
            raise Killed
        return original(model, data, shards, rnd, config, **kwargs)

    monkeypatch.setattr(fedavg, "fedavg_round", killed)
    with pytest.raises(Killed):
        fedavg.run_fedavg(config, run_root=root, progress=False)
    monkeypatch.setattr(fedavg, "fedavg_round", original)
    (folder,) = (root / "fedavg").iterdir()
    return folder


def assert_same_run(run, reference) -> None:
    """Same metrics (wall-clock aside) and final weights as the uninterrupted reference run."""
    got, want = (r.metrics().drop(columns="elapsed_s") for r in (run, reference))
    pd.testing.assert_frame_equal(got, want)
    weights, reference_weights = load_checkpoint(run)["model"], load_checkpoint(reference)["model"]
    assert all(torch.equal(weights[n], t) for n, t in reference_weights.items())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fedavg.run_fedavg(fedavg_config(), run_root=tmp_path_factory.mktemp("reference"), progress=False)


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


def test_a_planted_checkpoint_never_runs_and_the_run_resumes_from_the_previous_one(tmp_path, reference, monkeypatch):
    folder = interrupted_after(2, fedavg_config(), tmp_path, monkeypatch)
    newest, previous = checkpoint_files(folder)
    marker = tmp_path / "marker"
    plant(newest, marker)
    with pytest.warns(UserWarning, match=rf"{newest.name} was refused .*resuming from {previous.name}"):
        run = fedavg.run_fedavg(fedavg_config(), run_root=tmp_path, progress=False)
    assert not marker.exists() and run.done
    assert_same_run(run, reference)


def test_a_run_whose_every_checkpoint_is_planted_starts_over(tmp_path, reference, monkeypatch, capsys):
    folder = interrupted_after(2, fedavg_config(), tmp_path, monkeypatch)
    marker = tmp_path / "marker"
    for path in checkpoint_files(folder):
        plant(path, marker, as_torch_file=path.name.endswith("2.pt"))
    with pytest.warns(UserWarning, match="no readable checkpoint .*refused.*starts over"):
        run = fedavg.run_fedavg(fedavg_config(), run_root=tmp_path, progress=False)
    assert not marker.exists() and "[start]" in capsys.readouterr().out
    assert_same_run(run, reference)


def test_a_planted_editing_file_is_made_again(tmp_path):
    config = make_config("sparse_centralized", "smoke", **SMALL, epochs=1, calibration_rounds=2, calibration_samples=16)
    clean = run_sparse_centralized(config, run_root=tmp_path / "clean", progress=False)
    want = load_masks(clean)
    run = run_sparse_centralized(config, run_root=tmp_path / "planted", progress=False)
    marker = tmp_path / "marker"
    plant(run.dir / EDITING_FILE, marker)
    with pytest.raises(ValueError, match=f"no readable {EDITING_FILE}"), pytest.warns(UserWarning, match="refused"):
        load_masks(run)  # a done run's masks: not there any more, said so
    (run.dir / "done.json").unlink()  # as if interrupted after calibration: starting again calibrates anew
    with pytest.warns(UserWarning, match=rf"{EDITING_FILE} was refused .*treated as missing"):
        run = run_sparse_centralized(config, run_root=tmp_path / "planted", progress=False)
    assert not marker.exists() and run.done
    got = load_masks(run)
    assert all(torch.equal(got.shared[n], m) for n, m in want.shared.items())


def test_a_planted_control_variate_is_an_error_naming_it(tmp_path, monkeypatch):
    config = fedavg_config(algorithm="scaffold", rounds=6)
    folder = interrupted_after(2, config, tmp_path, monkeypatch)
    marker = tmp_path / "marker"
    for path in (folder / "control_variates").glob("*.pt"):
        plant(path, marker)
    with pytest.raises(RuntimeError, match=r"control variate: .*control_variates/\d+_\d+\.pt was refused"):
        fedavg.run_fedavg(config, run_root=tmp_path, progress=False)
    assert not marker.exists()


def test_a_planted_feature_cache_is_recomputed(tmp_path):
    config = make_config("centralized", "smoke", **SMALL)
    data, model = load_data(config, CPU), build_seeded_model(config, CPU)
    caches.FEATURES.clear()  # another test of this process may hold these features in memory: no file then
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
