"""Offline with the full profile: one clear message for the dataset and one for the weights."""

import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import nbformat
import pytest
import timm
import torchvision.datasets

from helpers import models
from helpers.__main__ import main
from helpers.data import DatasetUnavailableError, load_cifar100
from helpers.models import WeightsUnavailableError, build_model


def test_dataset_download_failure_is_explained(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DatasetUnavailableError, match="CIFAR-100.*internet.*FLME_PROFILE=smoke"):
        load_cifar100(str(tmp_path))


def test_weights_download_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsUnavailableError, match="DINO ViT-S/16.*internet.*FLME_PROFILE=smoke"):
        build_model(models.DINO_VIT_S16, pretrained=True)
    with pytest.raises(ValueError, match="model='resnet50'.*allowed"):
        build_model("resnet50")


def test_cli_full_profile_offline_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FLME_PROFILE", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    code = main(
        [
            "run",
            "centralized",
            "--profile",
            "full",
            "--run-root",
            str(tmp_path),
            "--set",
            f"data_root={tmp_path}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: could not load CIFAR-100") and "\n" not in err


def _bootstrap_cells() -> dict[str, str]:
    cells = {}
    for path in sorted(Path(__file__).resolve().parent.parent.glob("notebooks/*.ipynb")):
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        cells[path.name] = code[0].source
    return cells


def test_colab_bootstrap_with_placeholder_url_is_explained(monkeypatch):
    # On Colab without a copy on Drive and with REPO_URL left as shipped: one clear error, no failed git clone.
    cells = _bootstrap_cells()
    assert len(set(cells.values())) == 1, "every notebook starts with the same bootstrap cell"
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda path: None)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delenv("FLME_REPO_URL", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    if Path("/content").exists():
        pytest.skip("a /content folder exists here")
    with pytest.raises(RuntimeError, match="REPO_URL.*placeholder.*MyDrive/fl-model-editing"):
        exec(next(iter(cells.values())), {})
