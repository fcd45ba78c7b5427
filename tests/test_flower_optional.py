"""Flower is optional: every module but helpers.flower.app, flower_ops and flower_node imports without flwr, the Flower
entry points say what to install, and the sequential runners refuse a run labelled engine="flower"."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config.experiments import make_config
from helpers.editing.sparse_runs import run_sparse_fedavg
from helpers.federated.rounds import run_fedavg
from helpers.ops.cli import main

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", num_clients=10)
WITHOUT_FLWR = """
import importlib, pkgutil, sys
sys.modules["flwr"] = None  # as if not installed
import helpers
for m in pkgutil.iter_modules(helpers.__path__):
    if m.name not in ("flower", "flower_ops", "flower_node", "credentials"):  # credentials needs cryptography
        importlib.import_module(f"helpers.{m.name}")
for name in ("helpers.flower.server", "helpers.flower.node", "helpers.flower.app"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        print(exc)
"""


def test_helpers_import_without_flwr():
    out = subprocess.run([sys.executable, "-c", WITHOUT_FLWR], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(
        x.startswith("Flower is not installed: pip install -r requirements-flower.txt") for x in lines
    )


def test_flower_entry_points_without_flwr_say_what_to_install(monkeypatch, capsys, tmp_path):
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")] + ["flwr"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "helpers.flower.app", raising=False)
    for argv in (["flower", "--profile", "smoke"], ["run", "fedavg", "--profile", "smoke", "--set", "engine=flower"]):
        assert main([*argv, "--run-root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: Flower is not installed: pip install -r requirements-flower.txt")
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("runner, experiment", [(run_fedavg, "fedavg"), (run_sparse_fedavg, "sparse_fedavg")])
def test_sequential_runners_refuse_engine_flower(runner, experiment, tmp_path):
    config = make_config(experiment, "smoke", **SMALL, engine="flower")
    with pytest.raises(ValueError, match=r"^engine='flower' runs train on Flower nodes"):
        runner(config, run_root=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
