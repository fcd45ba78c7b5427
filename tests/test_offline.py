"""Offline with the full profile: one clear message for the dataset and one for the weights."""

import urllib.error

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
