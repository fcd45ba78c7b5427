"""Offline with the full profile: one clear message, within seconds, naming what is missing and how to get it."""

import socket
import subprocess
import sys
import time
import types
import urllib.error
from pathlib import Path

import nbformat
import pytest
import timm
import torch
import torchvision.datasets
from safetensors.torch import save_file

from helpers.config.experiments import make_config
from helpers.core import models
from helpers.core.downloads import CIFAR_URL, PROBE_SECONDS, check_downloads
from helpers.core.models import WeightsUnavailableError, build_model
from helpers.data.datasets import DatasetUnavailableError, load_cifar100, load_data
from helpers.ops.cli import main


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


def _no_network(monkeypatch, tmp_path, delay: float = 0.0):
    """No internet as a machine sees it: name lookups fail (after `delay`: a black-holed DNS); empty HF cache."""
    import huggingface_hub.constants

    def lookup(*args, **kwargs):
        time.sleep(delay)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("FLME_PROFILE", raising=False)


@pytest.mark.parametrize("delay", [0.0, 60.0], ids=["dns-fails", "dns-hangs"])
def test_full_profile_offline_fails_within_seconds_naming_what_is_missing(monkeypatch, tmp_path, capsys, delay):
    _no_network(monkeypatch, tmp_path, delay)
    start = time.monotonic()
    code = main(["run", "fedavg", "--profile", "full", "--run-root", str(tmp_path / "runs"),
                 "--set", f"data_root={tmp_path / 'data'}"])  # fmt: skip
    seconds = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and seconds < PROBE_SECONDS + 2, (seconds, err)
    assert err.startswith("error: could not load CIFAR-100 and the DINO ViT-S/16 weights")
    for needed in (CIFAR_URL, str(tmp_path / "data" / "cifar-100-python"), "timm/vit_small_patch16_224.dino",
                   "HF_HOME", "FLME_PROFILE=smoke"):  # fmt: skip
        assert needed in err, needed


def test_full_profile_offline_names_only_what_is_missing(monkeypatch, tmp_path):
    _no_network(monkeypatch, tmp_path)
    data = tmp_path / "data" / "cifar-100-python"
    data.mkdir(parents=True)
    for name in ("train", "test"):
        (data / name).write_bytes(b"")
    config = make_config("centralized", "full", data_root=str(tmp_path / "data"))
    with pytest.raises(WeightsUnavailableError, match="^could not load the DINO ViT-S/16 weights: cannot reach") as err:
        load_data(config, torch.device("cpu"))
    assert "CIFAR-100" not in str(err.value)
    check_downloads({**config, "pretrained": False})  # the dataset is here and no weights are needed: no error


def test_cached_weights_load_from_the_file_without_network(monkeypatch, tmp_path):
    _no_network(monkeypatch, tmp_path)
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    snapshot = tmp_path / "hf" / "models--timm--vit_small_patch16_224.dino" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    model = build_model(models.DINO_VIT_S16, pretrained=True)  # no network: it must read the cached file
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone.state_dict().items())
    assert model.head.out_features == 100


def test_the_suite_resolves_no_outside_host():
    # conftest.py: a download probe or hub lookup that a test forgot to stub fails at once instead of reaching out
    with pytest.raises(socket.gaierror, match="tests resolve no outside host"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert socket.getaddrinfo("localhost", 80)  # loopback still works (Flower's SuperLink, kernels)
