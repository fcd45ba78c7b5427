"""The remedies' costs in the benchmark: each algorithm's round time relative to FedAvg's, SCAFFOLD's memory
at full size (control variates: the server's c in RAM, one file per client in the run folder), and the round time
with merge=ties and with the interference diagnostic on, with what TIES keeps in memory."""

from __future__ import annotations

import tempfile

import torch

from helpers.algorithms.registry import ALGORITHMS, make_algorithm
from helpers.config.experiments import make_config, setting
from helpers.core.models import DINO_VIT_S16, build_model, set_trainable
from helpers.core.precision import make_scaler
from helpers.data.datasets import load_data, pick_device
from helpers.federated.clients import client_shards, clients_per_round
from helpers.federated.interference import PROBE_IMAGES
from helpers.federated.rounds import fedavg_round
from helpers.ops.timing import clock
from helpers.sparse.masks import Masks
from helpers.training.resumable import build_seeded_model

BYTES = 4  # control variates stay fp32: the paper's math unchanged (a compact dtype would round c - c_i)


def bench_algorithms(config: dict, repeats: int = 3) -> dict:
    """Seconds per round of every algorithm, and its ratio to FedAvg's (same clients, batches; interleaved)."""
    device = pick_device(config["device"])
    data = load_data(config, device)
    shards, scaler = client_shards(config, data), make_scaler(device, setting(config, "amp"))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ALGORITHMS:
            algo_config = make_config("fedavg", **{**config, "algorithm": name})
            model = build_seeded_model(algo_config, device)
            set_trainable(model, algo_config["train_mode"])
            runs[name] = (model, algo_config, make_algorithm(algo_config, f"{tmp}/{name}"))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for rnd in range(repeats + 1):  # round 0 warms up
            for name, (model, algo_config, algorithm) in runs.items():
                step = lambda m=model, r=rnd, c=algo_config, a=algorithm: fedavg_round(
                    m, data, shards, r, c, scaler=scaler, algorithm=a
                )
                times[name].append(clock(step, device))
    best = {name: min(t[1:]) for name, t in times.items()}
    out = {f"round_s_{name}": s for name, s in best.items()}
    out.update({f"round_vs_fedavg_{name}": s / best["fedavg"] for name, s in best.items() if name != "fedavg"})
    return out


def scaffold_memory(model_name: str = DINO_VIT_S16, density: float = 0.1, clients: int = 100) -> dict:
    """SCAFFOLD's state for `model_name` (default: the full profile's) from its parameter count: dense, and under a
    mask of `density` on the backbone (sparse runs freeze the head). RAM: c, one client's c_i, its correction
    c - c_i and its Delta c_i (4 model-sized tensors); disk: one c_i per client, packed to its trainable entries."""
    with torch.device("meta"):  # shapes only: no weights, no memory
        model = build_model(model_name, pretrained=False)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    every = sum(p.numel() for p in model.parameters())
    masked = round(density * backbone)
    mb = 2**20
    return {
        "scaffold_params": every,
        "scaffold_ram_mb_dense": 4 * BYTES * every / mb,
        "scaffold_disk_mb_dense": clients * BYTES * every / mb,
        f"scaffold_ram_mb_density_{density:g}": 4 * BYTES * backbone / mb,  # c and friends stay dense in RAM
        f"scaffold_disk_mb_density_{density:g}": clients * BYTES * masked / mb,
    }


def measured_store_bytes(config: dict, density: float = 0.1) -> dict:
    """A SCAFFOLD round under a global mask of `density`: bytes of the control-variate files actually written,
    against 4 x trainable entries per client that trained (the formula scaffold_memory uses)."""
    device = pick_device(config["device"])
    config = make_config("fedavg", **{**config, "algorithm": "scaffold"})
    data = load_data(config, device)
    model = build_seeded_model(config, device)
    set_trainable(model, "full")
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters() if p.ndim > 1}
    with tempfile.TemporaryDirectory() as tmp:
        algorithm = make_algorithm(config, tmp)
        row = fedavg_round(model, data, client_shards(config, data), 0, config, masks=Masks(shared=mask),
                           algorithm=algorithm)  # fmt: skip
        written = algorithm.store.nbytes()
    dense = sum(p.numel() for n, p in model.named_parameters() if n not in mask)
    per_client = BYTES * (dense + sum(int(m.sum()) for m in mask.values()))
    return {"scaffold_store_bytes": written, "scaffold_store_formula_bytes": per_client * len(row["clients"].split())}


def bench_merging(config: dict, repeats: int = 3) -> dict:
    """Seconds per round with merge=ties and with interference on (PROBE_IMAGES per client), and their ratio to the
    plain FedAvg round (same clients and batches, interleaved); the round's trained weights TIES keeps (fp32), here
    and at full size (m = 10 clients of DINO ViT-S/16)."""
    device = pick_device(config["device"])
    data = load_data(config, device)
    shards, scaler = client_shards(config, data), make_scaler(device, setting(config, "amp"))
    variants = {"mean": {}, "ties": {"merge": "ties"}, "interference": {"interference_probe": PROBE_IMAGES}}
    runs = {}
    for name, extra in variants.items():
        variant = make_config("fedavg", **{**config, **extra})
        model = build_seeded_model(variant, device)
        runs[name] = (model, variant, set_trainable(model, variant["train_mode"]))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(repeats + 1):  # round 0 warms up
        for name, (model, variant, _) in runs.items():
            step = lambda m=model, r=rnd, c=variant: fedavg_round(m, data, shards, r, c, scaler=scaler)
            times[name].append(clock(step, device))
    best = {name: min(t[1:]) for name, t in times.items()}
    m = clients_per_round(config["num_clients"], config["participation"])
    with torch.device("meta"):  # shapes only
        full = sum(p.numel() for p in build_model(DINO_VIT_S16, pretrained=False).parameters())
    trainable = sum(p.numel() for p in runs["mean"][2])
    return {
        "round_s_merge_mean": best["mean"],
        "round_vs_mean_ties": best["ties"] / best["mean"],
        "round_vs_mean_interference": best["interference"] / best["mean"],
        "interference_probe_images": PROBE_IMAGES,
        "ties_kept_mb": m * BYTES * trainable / 2**20,
        "ties_kept_mb_full": 10 * BYTES * full / 2**20,
    }
