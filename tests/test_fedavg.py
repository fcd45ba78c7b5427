"""FedAvg: equivalence with plain training, server aggregation, sampling, exact resume, validation, drift."""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from smallrun import CPU, SMALL, fresh_model, small_config

from helpers.config import experiments as config_module
from helpers.config.experiments import make_config
from helpers.data.datasets import augment_generator, load_data, step_batches
from helpers.federated import clients as fed_clients
from helpers.federated import rounds
from helpers.sparse.masks import Masks
from helpers.training import resumable
from helpers.training.loop import NonFiniteLossError, train_steps
from helpers.training.runs import Run, load_checkpoint, metrics_file

REPO = Path(__file__).resolve().parent.parent


def client_sgd(model: torch.nn.Module, config: dict) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = {k: config[k] for k in ("lr", "momentum", "weight_decay")}
    return torch.optim.SGD(params, **hyper)


def train_reference(model, data, shard, config, rnd: int, client: int) -> None:
    """What one client must do: fresh SGD, J steps of train_steps on its own batches and generator."""
    gen = augment_generator(config["seed"], "client", rnd, client)
    batches = step_batches(shard, config["batch_size"], config["local_steps"], gen)
    train_steps(model, client_sgd(model, config), data.train_x, data.train_y, batches, gen,
                img_size=config["img_size"], augment=config["augment"])  # fmt: skip


def test_one_client_with_all_data_equals_plain_training():
    config = small_config(num_clients=1, participation=1.0, server_lr=1.0, local_steps=3)
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    assert torch.equal(shards[0], torch.arange(len(data.train_y)))
    model, ref = fresh_model(config), fresh_model(config)
    row = rounds.fedavg_round(model, data, shards, 0, config)
    train_reference(ref, data, shards[0], config, 0, 0)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert row["clients"] == "0" and math.isnan(row["drift_cos"])


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_server_applies_size_weighted_average(server_lr):
    config = small_config(num_clients=3, participation=1.0, server_lr=server_lr, local_steps=2)
    data = load_data(config, CPU)
    shards = [torch.arange(0, 40), torch.arange(40, 140), torch.arange(140, 400)]  # unequal sizes
    model = fresh_model(config)
    start = copy.deepcopy(model.state_dict())
    rounds.fedavg_round(model, data, shards, 0, config)
    sizes = torch.tensor([len(s) for s in shards], dtype=torch.float64)
    clients = []
    for k, shard in enumerate(shards):
        ref = fresh_model(config)
        ref.load_state_dict(start)
        train_reference(ref, data, shard, config, 0, k)
        clients.append(copy.deepcopy(ref.state_dict()))
    for name, got in model.state_dict().items():
        avg = sum(w / sizes.sum() * c[name].double() for w, c in zip(sizes, clients, strict=True))
        want = start[name].double() + server_lr * (avg - start[name].double())
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("scope", ["global", "local"])
def test_entries_no_client_trains_stay_bit_exact(scope):
    # Unequal shard weights make the mean of identical values round off by an ulp unless frozen entries are kept.
    config = small_config(num_clients=3, participation=1.0, local_steps=2, lr=0.2)
    data = load_data(config, CPU)
    shards = [torch.arange(0, 70), torch.arange(70, 170), torch.arange(170, 400)]
    model = fresh_model(config)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    names = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    per_client = [{n: torch.rand(start[n].shape, generator=gen) < 0.3 for n in names} for _ in shards]
    masks = Masks(shared=per_client[0]) if scope == "global" else Masks.per_client(per_client)
    trained = per_client[:1] if scope == "global" else per_client
    rounds.fedavg_round(model, data, shards, 0, config, masks=masks)
    moved = 0
    for n in names:
        frozen = ~functools.reduce(torch.logical_or, [m[n] for m in trained])
        got = dict(model.named_parameters())[n].detach()
        assert torch.equal(got[frozen], start[n][frozen]), f"frozen entries of {n} moved"
        moved += int((got[~frozen] != start[n][~frozen]).sum())
    assert moved > 0


def test_rounds_sample_m_distinct_clients_and_clients_use_only_their_shard(tmp_path, monkeypatch):
    config = small_config(num_clients=10, participation=0.3, local_steps=2, rounds=4, eval_every=2)
    seen = []

    def recording_train_steps(model, optimizer, images, labels, batches, *args, **kwargs):
        seen.append(set(batches.flatten().tolist()))
        return train_steps(model, optimizer, images, labels, batches, *args, **kwargs)

    monkeypatch.setattr(fed_clients, "train_steps", recording_train_steps)
    metrics = rounds.run_fedavg(config, run_root=tmp_path, progress=False).metrics()
    shards = fed_clients.client_shards(config, load_data(config, CPU))
    calls = iter(seen)
    assert list(metrics["round"]) == [1, 2, 3, 4]
    for rnd, text in enumerate(metrics["clients"].astype(str)):
        clients = [int(c) for c in text.split()]
        assert len(clients) == len(set(clients)) == 3 and all(0 <= c < 10 for c in clients)
        assert clients == fed_clients.sample_clients(config["seed"], rnd, 10, 0.3)  # a pure function of the round
        for k in clients:
            assert next(calls) <= set(shards[k].tolist()), f"round {rnd + 1}, client {k} left its shard"
    assert next(calls, None) is None
    assert metrics["val_acc"].isna().tolist() == [True, False, True, False]
    assert metrics["test_acc"].isna().tolist() == [True, True, True, False]
    assert (metrics["upload_bytes"] == 3 * 4 * sum(p.numel() for p in fresh_model(config).parameters())).all()


def test_sample_clients_count():
    assert len(fed_clients.sample_clients(0, 0, 10, 0.01)) == 1
    ids = fed_clients.sample_clients(0, 5, 100, 0.1)
    assert len(set(ids)) == 10 and ids == sorted(ids)
    assert fed_clients.sample_clients(0, 5, 100, 0.1) != fed_clients.sample_clients(0, 6, 100, 0.1)


def test_rounds_for_budget_keeps_total_steps():
    assert [rounds.rounds_for_budget(2000, j) for j in (4, 8, 16)] == [500, 250, 125]
    assert rounds.rounds_for_budget(10, 4) == 3
    with pytest.raises(ValueError, match="local_steps"):
        rounds.rounds_for_budget(10, 0)


@pytest.mark.parametrize("idle", [None, 2])
def test_drift_and_aggregation_match_explicit_formulas(monkeypatch, idle):
    """Clients replaced by known updates: drift_norm, drift_cos and the new weights are checked exactly.

    A client whose update is zero (`idle`) has no direction: the cosine is the mean over the other clients' pairs.
    """
    config = small_config(num_clients=4, participation=1.0, server_lr=1.0)
    data = load_data(config, CPU)
    shards = [torch.arange(0, 10), torch.arange(10, 30), torch.arange(30, 60), torch.arange(60, 100)]
    model = fresh_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    deltas = [[torch.randn(p.shape, generator=gen) * (k + 1) * (k != idle) for p in params] for k in range(4)]
    calls = iter(deltas)

    def fake_train_steps(model, *args, **kwargs):
        with torch.no_grad():
            torch._foreach_add_(params, next(calls))
        return 1.0

    monkeypatch.setattr(fed_clients, "train_steps", fake_train_steps)
    row = rounds.fedavg_round(model, data, shards, 0, config)
    flat = [torch.cat([d.flatten() for d in delta]).double() for delta in deltas]
    moving = [f for k, f in enumerate(flat) if k != idle]
    cos = [torch.dot(a, b) / (a.norm() * b.norm()) for i, a in enumerate(moving) for b in moving[i + 1 :]]
    assert row["drift_norm"] == pytest.approx(float(torch.stack([f.norm() for f in flat]).mean()), rel=1e-5)
    assert row["drift_cos"] == pytest.approx(float(torch.stack(cos).mean()), abs=1e-5)
    weights = [len(s) / 100 for s in shards]
    for i, p in enumerate(params):
        want = start[i] + sum(w * d[i] for w, d in zip(weights, deltas, strict=True))
        assert torch.allclose(p, want, atol=1e-5)


def test_noniid_clients_drift_further_than_iid():
    # drift_cos does not separate IID from Nc=1 robustly on random-init smoke models (both ~0);
    # the update norm does: single-class batches all pull the same way.
    def drift(sharding: str) -> float:
        config = small_config(num_clients=100, participation=0.1, local_steps=4, sharding=sharding,
                              classes_per_client=1, synthetic_train_size=1000)  # fmt: skip
        data = load_data(config, CPU)
        row = rounds.fedavg_round(fresh_model(config), data, fed_clients.client_shards(config, data), 0, config)
        assert -1 <= row["drift_cos"] <= 1
        return row["drift_norm"]

    assert drift("noniid") > 1.5 * drift("iid")


def test_sparse_masks_plug_into_the_same_engine():
    """A global mask: masked entries never move, upload counts nnz; per-client masks: each uploads its own nnz."""
    config = small_config(num_clients=4, participation=0.5, local_steps=2)
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    model = fresh_model(config)
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    masks = {n: (torch.rand(p.shape, generator=gen) < 0.3).float() for n, p in named.items() if p.ndim == 2}
    before = {n: p.detach().clone() for n, p in named.items()}
    row = rounds.fedavg_round(model, data, shards, 0, config, masks=Masks(shared=masks))
    dense = sum(p.numel() for n, p in named.items() if n not in masks)
    assert row["upload_bytes"] == 2 * 4 * (dense + sum(int(m.sum()) for m in masks.values()))
    for n, m in masks.items():
        assert torch.equal(named[n][m == 0], before[n][m == 0]), n
        assert not torch.equal(named[n], before[n]), n
    # client k trains a fraction k/8 of the masked entries: the upload names which clients' masks were used
    own = [{n: torch.rand(m.shape, generator=gen) < k / 8 for n, m in masks.items()} for k in range(4)]
    row = rounds.fedavg_round(model, data, shards, 1, config, masks=Masks.per_client(own))
    nnz = [sum(int(m.sum()) for m in own[int(k)].values()) for k in row["clients"].split()]
    assert len(set(sum(int(m.sum()) for m in o.values()) for o in own)) == 4
    assert row["upload_bytes"] == 4 * (2 * dense + sum(nnz))


def test_head_mode_trains_and_uploads_only_the_head(tmp_path):
    config = small_config(train_mode="head", num_clients=5, participation=0.4, local_steps=1, rounds=1)
    run = rounds.run_fedavg(config, run_root=tmp_path, progress=False)
    head = sum(p.numel() for n, p in fresh_model(config).named_parameters() if n.startswith("head."))
    assert run.metrics()["upload_bytes"].tolist() == [2 * 4 * head]
    final = load_checkpoint(run)["model"]
    init = fresh_model(config).state_dict()
    moved = {n for n in init if not torch.equal(final[n], init[n])}
    assert moved == {"head.weight", "head.bias"}


def test_nonfinite_loss_names_round_and_client_and_keeps_no_checkpoint(tmp_path):
    config = small_config(lr=1e30, num_clients=5, participation=0.4, local_steps=2, rounds=2)
    with pytest.raises(NonFiniteLossError, match=r"round 1, client \d"):
        rounds.run_fedavg(config, run_root=tmp_path, progress=False)
    assert not list(tmp_path.rglob("checkpoint*.pt"))


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"participation": 0.0}, "participation"),
        ({"participation": 1.5}, "participation"),
        ({"local_steps": 0}, "local_steps"),
        ({"num_clients": 501}, "num_clients"),  # the train split holds 500 samples
        ({"sharding": "pathological"}, "sharding"),
        ({"sharding": "noniid", "classes_per_client": 101}, "classes_per_client"),
        ({"sharding": "noniid", "classes_per_client": 5, "num_clients": 10}, "classes_per_client"),
        ({"sharding": "noniid", "classes_per_client": 60, "num_clients": 10}, "classes_per_client"),
    ],
)
def test_bad_parameters_fail_before_compute(overrides, name, tmp_path, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("data or model loaded before validation")

    monkeypatch.setattr(resumable, "run_inputs", no_compute)
    with pytest.raises(ValueError, match=f"^{name}="):
        rounds.run_fedavg(run_root=tmp_path, progress=False, **{**SMALL, **overrides})
    assert not any(tmp_path.iterdir())  # no run folder for an invalid config


def test_train_split_size_mirrors_the_data_split(monkeypatch):
    config = small_config(synthetic_train_size=777, val_fraction=0.15)
    data = load_data(config, CPU)
    assert config_module.train_split_size(config) == len(data.train_y)
    assert np.array_equal(config_module.train_class_counts(config), np.bincount(data.train_y.numpy(), minlength=100))
    monkeypatch.delenv("FLME_PROFILE", raising=False)  # it would override the profile asked for
    assert config_module.train_split_size(make_config("fedavg", "full")) == 45_000


def cli(*args: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("FLME_PROFILE", None)
    cmd = [sys.executable, "-m", "helpers", "run", "fedavg", "--profile", "smoke", *args, "--run-root", root]
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_cli_rejects_bad_parameters_with_one_line(tmp_path):
    for setting, name in (("participation=1.5", "participation"), ("num_clients=100000", "num_clients")):
        proc = cli("--set", setting, root=tmp_path)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert err.startswith(f"error: {name}=") and err.count("\n") == 1 and "Traceback" not in err


RESUME_SETS = (
    "num_clients=10 participation=0.3 local_steps=2 rounds=20 synthetic_train_size=600 "
    "synthetic_test_size=100 batch_size=16 checkpoint_every=1 eval_every=3 device=cpu"
).split()


def test_killed_cli_run_resumes_bit_identically(tmp_path):
    args = [a for s in RESUME_SETS for a in ("--set", s)]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = cli(*args, root=killed)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = list(killed.glob("fedavg/*/metrics-*.csv"))
        rounds = len(metrics[0].read_text().splitlines()) - 1 if metrics else 0
        if rounds >= 2 and list(killed.glob("fedavg/*/checkpoint-*.pt")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-run"
    (run_dir,) = killed.glob("fedavg/*")
    assert not (run_dir / "done.json").exists()
    saved = load_checkpoint(Run("fedavg", {}, run_dir.name, run_dir))
    for root in (killed, clean):
        proc = cli(*args, root=root)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    (clean_dir,) = clean.glob("fedavg/*")
    assert clean_dir.name == run_dir.name
    final, want = (load_checkpoint(Run("fedavg", {}, d.name, d)) for d in (run_dir, clean_dir))
    assert final["round"] == want["round"] == 20
    for name, tensor in want["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    got, ref = (pd.read_csv(metrics_file(d)).drop(columns="elapsed_s") for d in (run_dir, clean_dir))
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    # The rows before the kill come from the checkpoint (their timings kept): it resumed, not restarted.
    resumed = pd.read_csv(metrics_file(run_dir))["elapsed_s"].tolist()
    assert resumed[: saved["round"]] == [row["elapsed_s"] for row in saved["metrics"]]


def test_round_plots_accept_runs_and_frames(tmp_path):
    from helpers.reporting.plots import plot_drift, plot_rounds

    configs = [
        small_config(num_clients=5, participation=0.4, local_steps=1, rounds=2, sharding=s)
        for s in ("iid", "dirichlet")
    ]
    runs = [rounds.run_fedavg(c, run_root=tmp_path, progress=False) for c in configs]
    fig = plot_drift(runs, hue="sharding")
    assert len(fig.axes) == 2 and all(ax.lines for ax in fig.axes)
    fig = plot_rounds(runs[0].metrics(), metrics=("val_acc", "test_acc"), reference=0.5)
    assert any(line.get_linestyle() == "--" for line in fig.axes[0].lines)
    fig.savefig(tmp_path / "rounds.png")


def test_models_with_buffers_are_rejected_before_any_client_trains():
    config = small_config(num_clients=2, participation=1.0)
    data = load_data(config, CPU)
    model = fresh_model(config)
    model.register_buffer("running_mean", torch.zeros(3))  # what a BatchNorm would hold
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="buffers.*running_mean"):
        rounds.fedavg_round(model, data, fed_clients.client_shards(config, data), 0, config)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_client_does_not_depend_on_the_client_before_it(monkeypatch):
    """fp16 GradScaler: every client starts from the round's scaler state, so client 1 trains the same weights
    whether or not client 0 (whose first steps overflow and lower the scale) ran before it in the round."""
    config = small_config(num_clients=2, participation=1.0, local_steps=6, lr=0.1)
    data = load_data(config, CPU)
    shards = fed_clients.client_shards(config, data)
    real_update = fed_clients.client_update

    def round_with(clients: list[int]) -> tuple[dict, torch.amp.GradScaler]:
        trained = {}

        def recording(model, data, shard, rnd, client, config, **kwargs):
            loss = real_update(model, data, shard, rnd, client, config, **kwargs)
            trained[client] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
            return loss

        monkeypatch.setattr(rounds, "sample_clients", lambda *args: clients)
        monkeypatch.setattr(rounds, "client_update", recording)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # overflows until the scale has halved a few times
        rounds.fedavg_round(fresh_model(config), data, shards, 0, config, scaler=scaler)
        return trained, scaler

    both, scaler = round_with([0, 1])
    alone, _ = round_with([1])
    assert scaler.get_scale() < 2.0**126  # steps did overflow: a shared scaler would hand client 1 a lower scale
    start = [p for p in fresh_model(config).parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(both[1], start, strict=True))  # client 1 did train
    assert all(torch.equal(a, b) for a, b in zip(both[1], alone[1], strict=True))
