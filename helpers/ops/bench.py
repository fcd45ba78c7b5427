"""Benchmark: `python -m helpers.bench [--profile smoke|full] [--device cpu|cuda]` prints a table and writes JSON.

Random weights and synthetic images run at the same speed as DINO on CIFAR-100, so `full` sizes need no download.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers.config.experiments import make_config, setting
from helpers.core.models import build_model, forward_flops, set_trainable
from helpers.core.precision import AMP_CHOICES, make_scaler, resolve_amp
from helpers.data.datasets import Data, augment_batch, eval_batch, load_data, pick_device, step_batches
from helpers.editing.calibration import Scorer
from helpers.federated.clients import client_optimizer, client_shards, local_train, sample_clients
from helpers.federated.rounds import fedavg_round
from helpers.ops.bench_remedies import bench_algorithms, bench_merging, measured_store_bytes, scaffold_memory
from helpers.ops.memory import LABEL, GiB, estimate_phases
from helpers.ops.timing import clock, peak_flops, timed
from helpers.sparse.sensitivity import compute_scores
from helpers.training.features import backbone_features
from helpers.training.loop import evaluate, train_steps
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import Run, checkpoint_files, load_checkpoint, save_checkpoint


def fake_images(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x.to(device), torch.randint(0, 100, (n,), generator=g).to(device)


def bench_training(config: dict, device: torch.device, batch: int, steps: int, compile: bool = False) -> dict:
    """Training and evaluation throughput (images/s) and model FLOP utilisation of the training step.

    With `compile`, the same steps again after torch.compile (its compile time is the untimed warm-up).
    """
    torch.manual_seed(0)
    model = build_model(config["model"], pretrained=False, img_size=config["img_size"]).to(device)
    x, y = fake_images(batch * steps, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = setting(config, "amp")
    opts = dict(img_size=config["img_size"], scaler=make_scaler(device, amp), amp=amp)
    gen = torch.Generator().manual_seed(0)
    batches = step_batches(torch.arange(len(y)), batch, steps, gen)
    train_s = timed(lambda: train_steps(model, opt, x, y, batches, gen, **opts), device)
    eval_s = timed(lambda: evaluate(model, x, y, img_size=config["img_size"], batch_size=batch, amp=amp), device)
    aug_s = timed(lambda: [augment_batch(x[b.to(device)], gen, img_size=config["img_size"]) for b in batches], device)
    flops = forward_flops(config["model"], config["img_size"])
    train_ips = batch * steps / train_s
    peak = peak_flops(device)
    out = {}
    if compile:
        model.compile()
        compiled_s = timed(lambda: train_steps(model, opt, x, y, batches, gen, **opts), device)
        out = {"train_images_per_s_compiled": batch * steps / compiled_s}
        out["train_mfu_compiled"] = 3 * flops * out["train_images_per_s_compiled"] / peak if peak else None
    return {
        **out,
        "train_images_per_s": train_ips,
        "eval_images_per_s": len(y) / eval_s,
        "forward_gflops_per_image": flops / 1e9,
        "train_mfu": 3 * flops * train_ips / peak if peak else None,  # backward ~ 2x forward
        "augment_share_of_step": aug_s / train_s,
        "batch_size": batch,
        "amp": resolve_amp(amp, device),
    }


def bench_augmentation(img_size: int, device: torch.device, n: int = 2048, batch: int = 256) -> dict:
    """On-device batched augmentation vs torchvision/PIL per image with 2 DataLoader workers (Colab)."""
    import torchvision.transforms as T
    from PIL import Image

    x, y = fake_images(n, device)
    gen = torch.Generator().manual_seed(0)
    ours = timed(lambda: [augment_batch(x[i : i + batch], gen, img_size=img_size) for i in range(0, n, batch)], device)
    pictures = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in x]
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.Resize(img_size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    dataset = [(p, int(t)) for p, t in zip(pictures, y.cpu())]
    loader = torch.utils.data.DataLoader(_Mapped(dataset, transform), batch_size=batch, num_workers=2)
    pil = timed(lambda: [b[0].to(device) for b in loader], device, repeats=1)
    return {
        "augment_ours_images_per_s": n / ours,
        "augment_pil_2workers_images_per_s": n / pil,
        "augment_speedup": pil / ours,
    }


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        picture, label = self.items[i]
        return self.transform(picture), label


def bench_scoring(config: dict, device: torch.device, n: int) -> dict:
    """Vectorised per-sample sensitivity scores vs one backward per sample on the same n images.

    scoring_batched_backward_s is one forward+backward of all n (summed losses): exact per-sample scores
    cost at least that, so loop / batched is the ceiling of scoring_speedup.
    """
    torch.manual_seed(0)
    model = build_model(config["model"], pretrained=False, img_size=config["img_size"]).to(device).eval()
    x, y = fake_images(n, device)
    batches = [(eval_batch(x, img_size=config["img_size"]), y)]
    vec = timed(lambda: compute_scores(model, batches, method="empirical"), device, repeats=2)
    params = [p for name, p in model.named_parameters() if not name.startswith("head.")]

    def loop():
        total = [torch.zeros_like(p) for p in params]
        for i in range(n):
            loss = F.cross_entropy(model(batches[0][0][i : i + 1]), y[i : i + 1])
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t.add_(g.square())

    def batched():
        torch.autograd.grad(F.cross_entropy(model(batches[0][0]), y, reduction="sum"), params)

    per_sample = timed(loop, device, repeats=1)
    bound = timed(batched, device, repeats=2)
    return {
        "scoring_vectorised_s": vec,
        "scoring_loop_s": per_sample,
        "scoring_speedup": per_sample / vec,
        "scoring_batched_backward_s": bound,
        "scoring_samples": n,
    }


def bench_calibration(profile: str, device: torch.device, scale: int = 1) -> dict:
    """One calibration round (talos scores, fresh labels) at the profile's default sample counts, through the runs'
    own Scorer: centralized (one pool of the train split) and federated (K client pools, the per-client count each).

    scale > 1 scores 1/scale of the samples (at least one per pool) and extrapolates the round's time: full sizes
    on a CPU would take many minutes; the JSON says whether the figures are extrapolated.
    """

    out = {"calibration_extrapolated": scale > 1}
    for kind in ("centralized", "federated"):
        config = make_config(f"sparse_{'fedavg' if kind == 'federated' else kind}", profile, device=device.type,
                             pretrained=False)  # fmt: skip
        pools = config["num_clients"] if kind == "federated" else 1
        per_pool = max(1, config["calibration_samples"] // scale)
        x, y = fake_images(pools * per_pool, device)
        data = Data(x, y, x[:1], y[:1], x[:1], y[:1])
        torch.manual_seed(0)
        model = build_model(config["model"], pretrained=False, img_size=config["img_size"]).to(device)
        keys = [("client", k) for k in range(pools)]
        scorer = Scorer(data, list(torch.arange(pools * per_pool).split(per_pool)), keys, config)
        seconds = clock(functools.partial(scorer, model), device)
        total = pools * config["calibration_samples"]
        out[f"calibration_{kind}_samples"] = total
        out[f"calibration_{kind}_round_s"] = seconds * total / (pools * per_pool)
    return out


def bench_head(config: dict, device: torch.device, batch: int, steps: int) -> dict:
    """Head-only training (linear probe, step 0): cached features vs the frozen backbone at every step.

    Both do the same `steps` optimizer steps of `batch` images; the one-off feature extraction is timed apart.
    """

    torch.manual_seed(0)
    model = build_model(config["model"], pretrained=False, img_size=config["img_size"]).to(device)
    params = set_trainable(model, "head")
    x, y = fake_images(batch * steps, device)
    gen = torch.Generator().manual_seed(0)
    batches = step_batches(torch.arange(len(y)), batch, steps, gen)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    amp = setting(config, "amp")
    opts = dict(img_size=config["img_size"], augment="none", scaler=make_scaler(device, amp), amp=amp)
    extract = dict(img_size=config["img_size"], batch_size=batch, amp=amp)
    backbone_s = timed(lambda: train_steps(model, opt, x, y, batches, gen, **opts), device)
    extract_s = timed(lambda: backbone_features(model, x, **extract), device)
    features = backbone_features(model, x, **extract)
    cached_s = timed(lambda: train_steps(model.head, opt, features, y, batches, gen, **opts), device)
    return {
        "head_steps_backbone_s": backbone_s,
        "head_steps_cached_s": cached_s,
        "head_cached_speedup": backbone_s / cached_s,
        "feature_extraction_images_per_s": len(y) / extract_s,
    }


def bench_checkpoint(config: dict, device: torch.device) -> dict:
    """Atomic checkpoint save and load time of model + SGD momentum."""
    model = build_model(config["model"], pretrained=False, img_size=config["img_size"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run("bench", config, "bench", Path(tmp))
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        save_s = timed(lambda: save_checkpoint(run, state), device)
        load_s = timed(lambda: load_checkpoint(run, map_location=device), device)
        size = checkpoint_files(Path(tmp))[0].stat().st_size
    return {"checkpoint_save_s": save_s, "checkpoint_load_s": load_s, "checkpoint_mb": size / 2**20}


def bench_fedavg(config: dict, repeats: int = 3) -> dict:
    """FedAvg round time / the same optimizer steps on one model with the same batches (target <= 1.10).

    The difference is what FedAvg adds: weight copies, fresh optimizers, aggregation, drift statistics.
    """

    device = pick_device(config["device"])
    data = load_data(config, device)
    model = build_seeded_model(config, device)
    set_trainable(model, config["train_mode"])
    shards, scaler = client_shards(config, data), make_scaler(device, setting(config, "amp"))

    def plain(rnd: int) -> None:  # one optimizer, no weight copies, no aggregation
        optimizer = client_optimizer(model, config["lr"], config)
        for k in sample_clients(config["seed"], rnd, len(shards), config["participation"]):
            local_train(model, optimizer, data, shards[k], rnd, k, config, scaler)

    fed_s, plain_s = [], []
    for rnd in range(repeats + 1):  # interleaved so load changes hit both alike; round 0 is a warm-up
        plain_s.append(clock(lambda r=rnd: plain(r), device))
        fed_s.append(clock(lambda r=rnd: fedavg_round(model, data, shards, r, config, scaler=scaler), device))
    round_s, steps_s = min(fed_s[1:]), min(plain_s[1:])
    return {"fedavg_round_s": round_s, "fedavg_steps_s": steps_s, "fedavg_overhead_ratio": round_s / steps_s}


def bench_gpu_memory(config: dict, device: torch.device) -> dict:
    """Peak GPU memory of the training benchmark at the profile's default batch size: the T4 (15 GB) fit check.

    bf16 (H100/H200) and fp16 (T4) activations take the same bytes, so the peak measured here carries over.
    """
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    bench_training(config, device, config["batch_size"], steps=3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {"peak_gpu_mb_default_batch": peak, "default_batch_size": config["batch_size"]}


def cpu_name() -> str:
    """The processor's model name (Linux), else the architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def run_bench(
    profile: str = "smoke",
    device: str = "auto",
    quick: bool = False,
    compile: bool = False,
    amp: str = "auto",
    flower: bool = False,
) -> dict:
    """Every measurement for `profile` on `device` in precision `amp` (`flower`: also Flower's per-round overhead);
    returns the results with hardware, versions and date."""
    dev = pick_device(device)
    config = make_config("fedavg", profile, device=str(dev.type), pretrained=False, amp=amp)
    big = profile == "full"
    batch = 256 if big and dev.type == "cuda" else (8 if big else 64)
    out = {
        "profile": profile,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
    }
    out.update(bench_training(config, dev, batch, steps=2 if quick else 8, compile=compile))
    out.update(bench_augmentation(config["img_size"], dev, n=512 if quick else 2048))
    out.update(bench_scoring(config, dev, n=8 if (quick or (big and dev.type == "cpu")) else 64))
    out.update(bench_head(config, dev, batch, steps=2 if quick or (big and dev.type == "cpu") else 16))
    out.update(bench_calibration(profile, dev, scale=64 if big and dev.type == "cpu" else 1))
    out.update(bench_checkpoint(config, dev))
    if not big or dev.type == "cuda":
        out.update(
            bench_fedavg(
                make_config(
                    "fedavg", profile, device=str(dev.type), pretrained=False, amp=amp, rounds=4 if quick else 8
                )
            )
        )

        remedies = make_config("fedavg", profile, device=str(dev.type), pretrained=False)
        out.update(bench_algorithms(remedies, repeats=1 if quick else 3))
        out.update(bench_merging(remedies, repeats=1 if quick else 3))
        out.update({**measured_store_bytes(config), **scaffold_memory()})
    if flower:
        from helpers.ops.bench_federation import bench_federation  # lazy: Flower is optional
        from helpers.ops.bench_flower import bench_flower  # lazy: Flower is optional (requirements-flower.txt)

        fed = dict(num_clients=10, participation=0.3, rounds=3 if quick else 6)
        out.update(bench_flower(make_config("fedavg", profile, device=str(dev.type), pretrained=False, **fed)))
        real = dict(num_clients=2, participation=1.0, rounds=4 if quick else 5)  # 2 SuperNodes on this machine
        real_config = make_config("fedavg", "smoke", device="cpu", pretrained=False, **real)
        out.update(bench_federation(real_config, repeats=1 if quick else 2))
    if dev.type == "cuda":  # the whole benchmark's peak (batch 256), before the default-batch measurement resets it
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    out.update(bench_gpu_memory(config, dev))
    phases = estimate_phases(config)  # on the CPU whatever the device: the T4 fit check before any GPU measures it
    out.update({f"est_peak_gib {p.name}": p.total / GiB for p in phases}, est_peak_label=LABEL)
    out["peak_host_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__)
    parser.add_argument(
        "--profile",
        choices=("smoke", "full"),
        default="smoke",
        help="the shapes measured: smoke (tiny ViT, default) or full (ViT-S/16 at 224 px)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where it runs (default auto: CUDA if present, else the CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a sanity run)")
    parser.add_argument("--compile", action="store_true", help="also measure training after torch.compile")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="precision (the `amp` parameter)")
    parser.add_argument("--flower", action="store_true", help="also Flower's per-round overhead: its simulation, and"
                        " a real round's parts on a local federation before/after issue 37 (needs flwr)")  # fmt: skip
    parser.add_argument("--out", default="results/bench", help="folder for the JSON file")
    args = parser.parse_args(argv)
    result = run_bench(args.profile, args.device, args.quick, args.compile, args.amp, args.flower)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.flower:  # a real round's parts (helpers.ops.bench_federation), as docs/flower.md shows them
        from helpers.ops.bench_federation import breakdown_table  # lazy: Flower is optional

        print(breakdown_table(result))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if "cuda" in str(pick_device(args.device)) else "cpu"
    path = folder / f"{args.profile}-{tag}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
