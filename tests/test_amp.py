"""Precision (`amp`) and `deterministic` on CPU: the T4's fp16 path (GradScaler, skipped steps, scaler state across
clients and checkpoints, SparseSGDM under a scaler) runs here, with fp16/bf16 autocast on the CPU."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from smallrun import CPU, SMALL

import helpers.federated.clients as fed_clients
from helpers.config.experiments import make_config
from helpers.core.models import build_model
from helpers.core.precision import amp_dtype, make_scaler, resolve_amp, use_deterministic
from helpers.core.torchfiles import load_torch
from helpers.data.datasets import make_synthetic, step_batches
from helpers.ops.runners import runner
from helpers.sparse.sgdm import SparseSGDM
from helpers.training.loop import train_steps
from helpers.training.runs import checkpoint_files, load_checkpoint, metrics_file, run_id

REPO = Path(__file__).resolve().parent.parent
FEDERATED = dict(num_clients=10, participation=0.3, local_steps=2, rounds=4)
JOBS = {"fedavg": {}, "sparse_fedavg": dict(sparsity=0.9, calibration_rounds=2)}
# Starts above the overflow point of the tiny ViT's fp16 gradients and grows after every good step: steps overflow
# (skipped, scale halved) and train in turn, whatever the exact gradient sizes.
SCALER = dict(init_scale=2.0**18, growth_interval=1)
DRIVER = """
import functools, os, signal, sys
import torch
torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, **{scaler!r})
import helpers.federated.rounds as fedavg
original, calls = fedavg.client_update, []
def killing(*args, **kwargs):
    if {kill} and args[3] == 1 and (kwargs.get("masks") is not None or {dense}):
        calls.append(1)
        if len(calls) == 2:  # round 2, its second client: mid-round, after a checkpoint with a scaler state
            os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
fedavg.client_update = killing
from helpers.ops.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(job: str, root: Path, kill: bool) -> subprocess.CompletedProcess:
    """`python -m helpers run JOB` with amp=fp16 in a subprocess; `kill`: SIGKILL in the middle of round 2."""
    values = {**SMALL, **FEDERATED, **JOBS[job], "amp": "fp16"}
    sets = [arg for name, value in values.items() for arg in ("--set", f"{name}={value}")]
    driver = textwrap.dedent(DRIVER).format(scaler=SCALER, kill=kill, dense=job == "fedavg")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLME_PROFILE": "smoke"}
    return subprocess.run(
        [sys.executable, "-c", driver, "run", job, *sets, "--run-root", str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def finished(root: Path, job: str) -> tuple[pd.DataFrame, dict, dict]:
    """(metrics without wall-clock, final checkpoint, done.json) of the one run under root."""
    folder = next((root / job).iterdir())
    metrics = pd.read_csv(metrics_file(folder), dtype={"clients": str}).drop(columns="elapsed_s")
    state = load_torch(checkpoint_files(folder)[0])
    return metrics, state, json.loads((folder / "done.json").read_text())


@pytest.mark.parametrize("job", sorted(JOBS))
def test_fp16_run_killed_mid_round_resumes_to_the_uninterrupted_result(job, tmp_path, monkeypatch):
    """The scaler state is in the checkpoint and each client starts from the round's: a SIGKILL mid-round and a
    resume give the same rows, weights and scaler state as a run that was never interrupted (run in this process,
    single-threaded like the subprocesses)."""
    killed = cli(job, tmp_path / "cut", kill=True)
    assert killed.returncode == -9, f"the kill did not fire: {killed.stderr[-800:]}"
    resumed = cli(job, tmp_path / "cut", kill=False)
    assert resumed.returncode == 0 and "[resume]" in resumed.stdout, resumed.stderr[-800:]
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, **SCALER))
    config = make_config(job, "smoke", **SMALL, **FEDERATED, **JOBS[job], amp="fp16")
    runner(job)(config, run_root=tmp_path / "ref", progress=False)
    (ref, ref_state, ref_done), (got, state, done) = finished(tmp_path / "ref", job), finished(tmp_path / "cut", job)
    pd.testing.assert_frame_equal(got, ref)
    assert all(torch.equal(state["model"][k], ref_state["model"][k]) for k in ref_state["model"])
    assert state["scaler"] == ref_state["scaler"] and state["precision"] == done["precision"] == "fp16"
    # the run did exercise the fp16 path: some steps overflowed (scale below its start), others trained
    # (without an overflow the scale would double at each of a client's steps in every round)
    steps = FEDERATED["rounds"] * FEDERATED["local_steps"]
    assert ref_state["scaler"]["scale"] < SCALER["init_scale"] * 2**steps and (ref["drift_norm"] > 0).any()
    auto = make_config(job, "smoke", **SMALL, **FEDERATED, **JOBS[job])
    assert done["run_id"] == ref_done["run_id"] != run_id(auto)  # fp16 is another run than amp=auto (fp32 here)


def tiny_setup(steps: int = 6, batch: int = 16):
    """The smoke ViT, CIFAR-shaped data and `steps` batches for train_steps."""
    x, y, _, _ = make_synthetic(200, 100)
    torch.manual_seed(0)
    model = build_model("vit_tiny_smoke", pretrained=False, img_size=32)
    batches = step_batches(torch.arange(len(y)), batch, steps, torch.Generator().manual_seed(1))
    return model, x, y, batches


def fit(model, optimizer, x, y, batches, amp: str, scaler=None) -> float:
    return train_steps(model, optimizer, x, y, batches, torch.Generator().manual_seed(2), img_size=32,
                       augment="crop", scaler=scaler, amp=amp)  # fmt: skip


def inf_gradient_once(param: torch.nn.Parameter) -> None:
    """The next backward gives `param` one inf gradient entry (an fp16 overflow), later ones are untouched."""

    def hook(grad):
        handle.remove()
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad

    handle = param.register_hook(hook)


@pytest.mark.parametrize("sparse", [False, True])
def test_overflowing_step_is_skipped_weights_bitwise_unchanged(sparse):
    model, x, y, batches = tiny_setup(steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    masks = {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) < 0.5 for p in params}
    opt = SparseSGDM(params, lr=0.1, momentum=0.9, masks=masks) if sparse else torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    inf_gradient_once(model.blocks[0].attn.qkv.weight)
    loss = fit(model, opt, x, y, batches, "fp16", scaler)
    assert math.isfinite(loss)  # the loss is fine; only a gradient overflowed
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scaler.get_scale() == 2.0**9 and not opt.state  # backed off; the optimizer never stepped


def test_sparse_sgdm_under_a_scaler_keeps_frozen_entries_through_overflows():
    """Over steps that overflow (a huge scale and an inf at a frozen entry) and steps that train, frozen entries
    are bitwise unchanged and keep zero momentum; trainable entries move."""
    model, x, y, batches = tiny_setup(steps=8)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    masks = {p: torch.rand(p.shape, generator=gen) < 0.3 for p in params.values()}
    target = model.blocks[0].attn.qkv.weight
    masks[target].view(-1)[0] = False  # the entry the inf lands on is frozen
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = SparseSGDM(params.values(), lr=0.1, momentum=0.9, weight_decay=5e-4, masks=masks)
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    scales = []
    for i, batch in enumerate(batches):
        if i == 5:
            inf_gradient_once(target)
        fit(model, opt, x, y, batch[None], "fp16", scaler)
        scales.append(scaler.get_scale())
    assert any(b < a for a, b in zip([SCALER["init_scale"], *scales], scales))  # steps were skipped
    for name, p in params.items():
        frozen = ~masks[p]
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
        assert not opt.state[p]["momentum_buffer"][frozen].any(), name
    assert any(not torch.equal(p, before[n]) for n, p in params.items())  # and some steps trained


def test_fp16_and_bf16_train_close_to_fp32():
    """Same start, batches and augmentation: the mixed-precision update is the fp32 update up to rounding (within
    5% of the update's size for fp16, 10 bits of mantissa; 15% for bf16, 7 bits), and the loss stays finite."""
    updates, losses = {}, {}
    for amp in ("fp32", "fp16", "bf16"):
        model, x, y, batches = tiny_setup(steps=6)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[amp] = fit(model, opt, x, y, batches, amp, make_scaler(CPU, amp))
        updates[amp] = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    for amp, tolerance in (("fp16", 0.05), ("bf16", 0.15)):
        assert math.isfinite(losses[amp]) and losses[amp] == pytest.approx(losses["fp32"], rel=0.01)
        distance = (updates[amp] - updates["fp32"]).norm() / updates["fp32"].norm()
        assert distance < tolerance, f"{amp}: update differs from fp32 by {distance:.3f} of its size"


def test_bf16_runs_without_a_scaler_and_autocasts():
    assert make_scaler(CPU, "bf16") is None and make_scaler(CPU, "fp32") is None
    assert isinstance(make_scaler(CPU, "fp16"), torch.amp.GradScaler)
    model, x, y, batches = tiny_setup(steps=1)
    seen = []
    model.head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batches, "bf16")
    assert seen == [torch.bfloat16]  # autocast really ran the head's matmul in bf16


def test_amp_rule(monkeypatch):
    """auto: fp32 on CPU, fp16 below sm_80 (T4), bf16 from sm_80; an explicit amp is the same on every device."""
    cuda = torch.device("cuda")
    assert resolve_amp("auto", CPU) == "fp32" and amp_dtype(CPU) is None
    for capability, expected in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert resolve_amp("auto", cuda) == expected
        assert all(resolve_amp(amp, device) == amp for amp in ("fp16", "bf16", "fp32") for device in (CPU, cuda))
    with pytest.raises(ValueError, match="amp='fp8' is invalid: must be one of auto, fp16, bf16, fp32"):
        resolve_amp("fp8", CPU)


def test_amp_auto_keeps_run_ids_and_explicit_fp32_equals_it_on_cpu(tmp_path):
    """amp=auto is left out of the config (run ids, config.json, CSV columns as before amp existed); fp32 on CPU is
    another run id with the same numbers; precision is recorded in the checkpoint and done.json."""
    config = make_config("fedavg", "smoke", **SMALL, **{**FEDERATED, "rounds": 2})
    assert "amp" not in config and "deterministic" not in config
    explicit = make_config("fedavg", "smoke", **SMALL, **{**FEDERATED, "rounds": 2}, amp="fp32")
    assert run_id(explicit) != run_id(config)
    a = runner("fedavg")(config, run_root=tmp_path, progress=False)
    b = runner("fedavg")(explicit, run_root=tmp_path, progress=False)
    assert "amp" not in json.loads((a.dir / "config.json").read_text())
    pd.testing.assert_frame_equal(a.metrics().drop(columns="elapsed_s"), b.metrics().drop(columns="elapsed_s"))
    assert a.summary()["precision"] == load_checkpoint(a)["precision"] == "fp32"


def test_resume_under_another_precision_is_refused(tmp_path):
    """A checkpoint trained in fp16 (amp=auto on a T4) cannot be resumed where auto gives fp32: the error names amp
    and both precisions. A checkpoint from before precision was recorded resumes (as checkpoint.pt: a run from before
    checkpoints were named by their session)."""
    config = make_config("fedavg", "smoke", **SMALL, **{**FEDERATED, "rounds": 2}, checkpoint_every=1)
    run = runner("fedavg")(config, run_root=tmp_path, progress=False)
    state = load_checkpoint(run)
    (run.dir / "done.json").unlink()
    for path in checkpoint_files(run.dir):
        path.unlink()
    torch.save({**state, "round": 1, "precision": "fp16"}, run.dir / "checkpoint.pt")
    with pytest.raises(RuntimeError, match=r"trained in fp16 up to round 1, but amp='auto' gives fp32") as err:
        runner("fedavg")(config, run_root=tmp_path, progress=False)
    assert str(run.dir) in str(err.value)
    del state["precision"]
    torch.save({**state, "round": 1}, run.dir / "checkpoint.pt")
    assert checkpoint_files(run.dir) == [run.dir / "checkpoint.pt"]  # the refused run wrote no checkpoint
    assert runner("fedavg")(config, run_root=tmp_path, progress=False).summary()["precision"] == "fp32"


@pytest.fixture
def restore_determinism():
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    bench, env = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], bench
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if env is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_deterministic_same_run_id_same_metrics_flags_on_during_the_run(tmp_path, monkeypatch, restore_determinism):
    seen = []
    original = fed_clients.train_steps

    def recording(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return original(*args, **kwargs)

    monkeypatch.setattr(fed_clients, "train_steps", recording)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    small = dict(**SMALL, **{**FEDERATED, "rounds": 2})
    plain = runner("fedavg")(make_config("fedavg", "smoke", **small), run_root=tmp_path / "a", progress=False)
    assert set(seen) == {(False, False)}
    seen.clear()
    exact = runner("fedavg")(make_config("fedavg", "smoke", **small, deterministic=True), run_root=tmp_path / "b",
                             progress=False)  # fmt: skip
    assert set(seen) == {(True, True)} and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert exact.id == plain.id  # bookkeeping, like compile: the same run
    pd.testing.assert_frame_equal(plain.metrics().drop(columns="elapsed_s"), exact.metrics().drop(columns="elapsed_s"))
    use_deterministic(False)  # a later run without it switches the process-wide flags off again
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_bench_training_in_each_precision():
    """The benchmark's training step runs and reports the precision it used (what a GPU check calls per amp)."""
    from helpers.ops.bench import bench_training

    for amp in ("fp16", "bf16", "fp32"):
        config = make_config("fedavg", "smoke", device="cpu", amp=amp)
        out = bench_training(config, CPU, batch=8, steps=1)
        assert out["amp"] == amp and out["train_images_per_s"] > 0
