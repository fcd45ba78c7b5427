"""Every GPU check in one command: `python -m helpers.gpucheck` (CUDA; a few minutes on an H100/H200).

Checks one FedAvg round and one sparse round in fp32, bf16 and fp16 against the CPU's fp32 result, frozen entries
bitwise unchanged, vectorised per-sample scoring against a loop of single-sample backwards, a run killed mid-round
and resumed under `deterministic` against an uninterrupted one, every full-profile phase under a T4's 15 GiB
(`torch.cuda.set_per_process_memory_fraction`), then the benchmark figures. Prints a pass/fail table and writes
results/bench/<profile>-<device>-<date>.json. `--device cpu --profile smoke` runs the same checks on the CPU in
about a minute (tests/test_gpucheck.py), so the script cannot rot. Data are synthetic at the profile's shapes: a GPU
machine may have no internet for CIFAR-100 or the DINO weights, and a random-init model runs at the same speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from helpers.config.experiments import make_config, setting
from helpers.core.models import backbone_parameters, set_trainable
from helpers.core.precision import make_scaler
from helpers.core.seeding import torch_generator
from helpers.core.settings import REPO
from helpers.data.datasets import eval_batch, load_data, pick_device
from helpers.federated.clients import client_shards
from helpers.federated.rounds import fedavg_round
from helpers.ops import bench
from helpers.ops.memory import T4_BYTES, GiB, estimate_phases
from helpers.sparse.masks import Masks
from helpers.sparse.sensitivity import compute_scores
from helpers.sparse.sgdm import SparseSGDM, masks_by_parameter
from helpers.training.features import backbone_features
from helpers.training.loop import train_steps
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import metrics_file

# |w_device - w_cpu| / |w_cpu - w_start| after one round, against the CPU in fp32. fp32 on a GPU differs only by
# kernel summation order; bf16 keeps 8 mantissa bits, fp16 11 (tests/test_amp.py holds the CPU to the same bounds).
TOLERANCE = {"fp32": 1e-3, "bf16": 0.15, "fp16": 0.05}
SCORING_RTOL = 1e-3  # per tensor, relative L2: vectorised per-sample gradients vs one backward per sample (fp32)


def round_config(profile: str, device: torch.device, amp: str) -> dict:
    """A small federated round at the profile's model and image size, on synthetic data."""
    return make_config(
        "fedavg", profile, device=device.type, amp=amp, pretrained=False, dataset="synthetic", num_clients=4,
        participation=0.5, local_steps=2, rounds=1, batch_size=16,
    )  # fmt: skip


def random_masks(config: dict, density: float = 0.1) -> Masks:
    """A seeded random mask over the backbone (CPU draws, the same on every device)."""
    model = build_seeded_model(config, torch.device("cpu"))
    gen = torch_generator(config["seed"], "gpucheck_mask")
    return Masks(
        shared={n: torch.rand(p.shape, generator=gen) < density for n, p in backbone_parameters(model).items()}
    )


def one_round(config: dict, device: torch.device, masks: Masks | None) -> tuple[dict, dict]:
    """(start, after) weights on the CPU of one round on `device`; with masks, the step-0-style frozen head."""
    data = load_data(config, device)
    model = build_seeded_model(config, device)
    set_trainable(model, "full")
    if masks is not None:
        model.head.requires_grad_(False)
        masks = Masks(shared={n: m.to(device) for n, m in masks.shared.items()}, device=device)
    start = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    scaler = make_scaler(device, setting(config, "amp"))
    fedavg_round(model, data, client_shards(config, data), 0, config, masks=masks, scaler=scaler)
    return start, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def distance(after: dict, reference: dict, start: dict) -> float:
    """|after - reference| / |reference - start| over all parameters."""
    num = sum(float((after[n].double() - reference[n].double()).square().sum()) for n in reference)
    den = sum(float((reference[n].double() - start[n].double()).square().sum()) for n in reference)
    return (num / max(den, 1e-300)) ** 0.5


def check_rounds(profile: str, device: torch.device) -> list[dict]:
    """FedAvg and sparse rounds in every precision against the CPU's fp32 round; frozen entries bitwise unchanged."""
    rows, cpu = [], torch.device("cpu")
    masks = random_masks(round_config(profile, cpu, "fp32"))
    for sparse in (False, True):
        kind = "sparse round" if sparse else "FedAvg round"
        start, reference = one_round(round_config(profile, cpu, "fp32"), cpu, masks if sparse else None)
        for amp, tol in TOLERANCE.items():
            _, after = one_round(round_config(profile, device, amp), device, masks if sparse else None)
            rel = distance(after, reference, start)
            ok, detail = rel <= tol, f"distance to the CPU fp32 round {rel:.2e} (tolerance {tol:g})"
            if sparse:
                moved = sum(int((after[n][~m] != start[n][~m]).sum()) for n, m in masks.shared.items())
                ok, detail = ok and moved == 0, f"{detail}; frozen entries moved: {moved}"
            rows.append({"check": f"{kind} {amp}", "passed": ok, "detail": detail, "value": rel})
    return rows


def check_scoring(profile: str, device: torch.device, n: int = 6) -> dict:
    """compute_scores (one batched backward, per-sample gradients by einsum) vs one backward per sample, in fp32."""
    config = round_config(profile, device, "fp32")
    model = build_seeded_model(config, device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    x, y = eval_batch(x, img_size=config["img_size"]), torch.randint(0, 100, (n,), generator=gen).to(device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's convolution in true fp32 on both sides
    try:
        scores = compute_scores(model, [(x, y)], method="empirical")
        params = backbone_parameters(model)
        loop = {name: torch.zeros_like(p) for name, p in params.items()}
        for i in range(n):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
            for name, g in zip(params, grads, strict=True):
                loop[name].add_(g.square())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    worst = max(float((scores[k] - loop[k]).norm() / loop[k].norm().clamp_min(1e-30)) for k in loop)
    ok = worst <= SCORING_RTOL
    detail = f"worst per-tensor relative error {worst:.2e} (tolerance {SCORING_RTOL:g}), {n} samples"
    return {"check": "vectorised scoring = per-sample loop", "passed": ok, "detail": detail, "value": worst}


# A run as a separate process; KILL=1 makes client 1 of round 2 SIGKILL its own process (as a crash would).
DRIVER = """
import os, signal, sys
from helpers.federated import rounds
from helpers.ops.cli import main
original = rounds.client_update
def killing(*args, **kwargs):
    if os.environ.get("GPUCHECK_KILL") == "1" and args[3] == 1 and args[4] == rounds.sample_clients(0, 1, 4, 0.5)[-1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
rounds.client_update = killing
sys.exit(main(sys.argv[1:]))
"""


def run_process(profile: str, device: torch.device, root: Path, kill: bool) -> subprocess.CompletedProcess:
    """`python -m helpers run fedavg` (3 rounds, deterministic) in a subprocess; `kill`: SIGKILL mid-round 2."""
    sets = dict(device=device.type, deterministic="true", pretrained="false", dataset="synthetic", num_clients=4,
                participation=0.5, local_steps=2, rounds=3, batch_size=16, eval_every=1)  # fmt: skip
    args = ["run", "fedavg", "--profile", profile, "--run-root", str(root)]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "GPUCHECK_KILL": "1" if kill else "0", "PYTHONPATH": str(REPO)}
    code = textwrap.dedent(DRIVER)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=900)


def check_kill_resume(profile: str, device: torch.device) -> dict:
    """A deterministic run killed in the middle of round 2 and resumed equals an uninterrupted run, row for row."""
    with tempfile.TemporaryDirectory() as tmp:
        whole = run_process(profile, device, Path(tmp) / "whole", kill=False)
        killed = run_process(profile, device, Path(tmp) / "cut", kill=True)
        resumed = run_process(profile, device, Path(tmp) / "cut", kill=False)
        if whole.returncode or resumed.returncode or killed.returncode != -9:
            codes = f"exit codes {whole.returncode}, {killed.returncode} (killed), {resumed.returncode}"
            return {"check": "kill and resume", "passed": False, "detail": f"{codes}: {resumed.stderr[-300:]}"}
        metrics = [pd.read_csv(metrics_file(next(Path(tmp, run).glob("fedavg/*")))) for run in ("whole", "cut")]
    a, b = (m.drop(columns=[c for c in m if c.endswith("_s")]) for m in metrics)
    same = a.equals(b)
    return {"check": "kill and resume (deterministic)", "passed": same,
            "detail": f"{len(a)} rounds, metrics {'identical' if same else 'DIFFER'}"}  # fmt: skip


def measure_peak(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated GiB while fn runs."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GiB


def check_memory(device: torch.device) -> list[dict]:
    """Every full-profile phase at its default sizes under a T4's 15 GiB, against helpers.ops.memory's estimate."""
    if device.type != "cuda":
        return [{"check": "full-profile phases under 15 GiB", "passed": None, "detail": "needs CUDA"}]
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total), device)
    config = make_config("fedavg", "full", device="cuda", pretrained=False, dataset="synthetic", amp="fp16")
    estimates = {p.name.split(" (")[0]: p.total / GiB for p in estimate_phases(config)}
    model = build_seeded_model(config, device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 100, (512,), generator=gen).to(device)
    batches = torch.arange(config["batch_size"]).repeat(2, 1)  # two steps at the default batch

    def train(sparse: bool) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        masks = masks_by_parameter(model, random_masks(config).shared) if sparse else None
        opt = (SparseSGDM(params, lr=1e-3, momentum=0.9, masks={p: m.to(device) for p, m in masks.items()})
               if sparse else torch.optim.SGD(params, lr=1e-3, momentum=0.9))  # fmt: skip
        train_steps(model, opt, images, labels, batches, gen, img_size=224, scaler=make_scaler(device, "fp16"),
                    amp="fp16")  # fmt: skip

    def score() -> None:
        compute_scores(model, [(eval_batch(images[:64], img_size=224), labels[:64])], method="talos")

    def features() -> None:
        backbone_features(model, images, img_size=224, batch_size=config["eval_batch_size"], amp="fp16")

    phases = {"dense fine-tuning": lambda: train(False), "sparse fine-tuning": lambda: train(True),
              "sensitivity scoring": score, "feature caching": features}  # fmt: skip
    rows = []
    for name, fn in phases.items():
        try:
            peak, ok = measure_peak(fn, device), True
        except torch.OutOfMemoryError:
            peak, ok = float("nan"), False
        estimate = next((v for k, v in estimates.items() if k.startswith(name)), float("nan"))
        detail = f"peak {peak:.2f} GiB allocated (estimate {estimate:.2f} GiB incl. context) under a 15 GiB cap"
        rows.append({"check": f"memory: {name}", "passed": ok, "detail": detail, "value": peak})
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return rows


def figures(profile: str, device: torch.device) -> dict:
    """The benchmark figures: training MFU per precision, scoring speedup, augmentation share, FedAvg overhead,
    evaluation throughput, and (CUDA) the compile speedup."""
    out: dict = {}
    big, cuda = profile == "full", device.type == "cuda"
    base = dict(device=device.type, pretrained=False, dataset="synthetic")
    for amp in ("bf16", "fp16"):
        config = make_config("fedavg", profile, amp=amp, **base)
        batch = 256 if big and cuda else (4 if big else 64)
        measured = bench.bench_training(config, device, batch, steps=4 if cuda else 2, compile=cuda)
        out.update({f"{k} {amp}": v for k, v in measured.items()})
    config = make_config("fedavg", profile, **base)
    out.update(bench.bench_scoring(config, device, n=32 if cuda else 4))
    if not big or cuda:  # a full-size FedAvg round on a CPU takes minutes
        out.update(bench.bench_fedavg(make_config("fedavg", profile, rounds=3, **base), repeats=2))
    return out


def run_checks(profile: str = "full", device: str = "auto") -> dict:
    """Every check and figure; returns the JSON-ready result."""
    dev = pick_device(device)
    t0 = time.perf_counter()
    rows = check_rounds(profile, dev) + [check_scoring(profile, dev), check_kill_resume(profile, dev)]
    rows += check_memory(dev)
    return {
        "profile": profile,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else bench.cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "checks": rows,
        "figures": figures(profile, dev),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile",
        choices=("smoke", "full"),
        default="full",
        help="the shapes checked: full (ViT-S/16 at 224 px, default) or smoke (tiny ViT)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cuda",
        help="where the checks run (default cuda; cpu with --profile smoke: the CPU run of the tests)",
    )
    parser.add_argument("--out", default=str(REPO / "results" / "bench"), help="folder for the JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu --profile smoke for the CPU run")
    result = run_checks(args.profile, args.device)
    for row in result["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "skip"}[row["passed"]]
        print(f"{mark}  {row['check']:<40} {row['detail']}")
    for key, value in result["figures"].items():
        print(f"      {key:<40} {value:.4g}" if isinstance(value, float) else f"      {key:<40} {value}")
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    path = Path(args.out) / f"{args.profile}-{slug}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    failed = [r["check"] for r in result["checks"] if r["passed"] is False]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} in {result['seconds']} s; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
