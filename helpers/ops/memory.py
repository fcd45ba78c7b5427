"""Estimated peak GPU memory of every phase of a profile's runs, measured on the CPU: does it fit a T4?

Weights, gradients, optimizer and server state are counted from the model. Activations are the bytes autograd saves
for backward in one real forward and backward on this CPU, at batch 1 and 2 under the phase's precision (fp16
autocast for training, fp32 for per-sample scoring), extrapolated linearly to the phase's batch; evaluation keeps no
graph, so its activations are the largest module's input and output at the eval batch. Per-sample scoring is bounded
by an fp32 training forward at its chunk size. The CUDA context is a stated
constant. An ESTIMATE until a GPU measures it (`python -m helpers.gpucheck`; the bench's peak_gpu_mb_default_batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers.algorithms.registry import algorithm_class, algorithm_name
from helpers.config.experiments import setting, split_sizes
from helpers.core.models import backbone_parameters, build_model
from helpers.core.precision import DTYPES
from helpers.data.datasets import NUM_CLASSES
from helpers.federated.clients import clients_per_round
from helpers.sparse.sensitivity import default_chunk_size

GiB = 2**30
T4_BYTES = 15 * GiB  # what Colab reports for a T4 (15360 MiB)
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context, cuBLAS/cuDNN workspaces and allocator slack: an assumption, not measured
FITS_FRACTION = 0.9  # a phase "fits" below 90% of the card: fragmentation needs some room
LABEL = "estimated on the CPU (not measured on a GPU)"


@dataclass(frozen=True)
class Phase:
    """One phase's estimated peak, in bytes, by part."""

    name: str
    weights: int  # parameters, and for training their gradients and optimizer state
    state: int  # what the phase keeps beside the model: server buffers, masks, score sums, cached features
    activations: int  # measured on the CPU and scaled to the phase's batch
    data: int  # the uint8 splits on the device (helpers.data.datasets keeps them there)

    @property
    def total(self) -> int:
        return self.weights + self.state + self.activations + self.data + CUDA_CONTEXT_BYTES

    def fits(self, capacity: int = T4_BYTES) -> bool:
        return self.total <= FITS_FRACTION * capacity


def saved_bytes(step: Callable[[], None], model: nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while `step` runs, the model's own parameters excepted."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def per_batch(measure: Callable[[int], int], batch: int) -> int:
    """measure(1) + (measure(2) - measure(1)) * (batch - 1): activations grow linearly with the batch."""
    one, two = measure(1), measure(2)
    return one + max(two - one, 0) * (batch - 1)


def training_activations(model: nn.Module, img_size: int, batch: int, dtype: torch.dtype | None) -> int:
    """Activations saved for backward by one training forward at `batch` under autocast `dtype` (None: fp32).

    The forward alone is measured: autograd saves everything during it, and the backward only frees."""

    def measure(b: int) -> int:
        x, y = torch.randn(b, 3, img_size, img_size), torch.randint(0, NUM_CLASSES, (b,))

        def forward() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                F.cross_entropy(model(x), y)

        return saved_bytes(forward, model)

    return per_batch(measure, batch)


def scoring_activations(model: nn.Module, img_size: int, chunk: int) -> int:
    """Per-sample scoring of one chunk (fp32): at most what an fp32 training forward saves (compute_scores keeps
    each layer's input and differentiates no weight), plus the per-sample gradients of the largest layer (one layer
    at a time: chunk x entries x 4 bytes)."""
    largest = max(p.numel() for p in backbone_parameters(model).values())
    return training_activations(model, img_size, chunk, None) + 4 * chunk * largest


@torch.no_grad()
def evaluation_activations(model: nn.Module, img_size: int, batch: int, dtype: torch.dtype | None) -> int:
    """The largest input + output of any module in one eval forward at batch 1, times `batch` (no graph is kept)."""
    largest = 0

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal largest
        tensors = [t for t in (*args, output) if isinstance(t, torch.Tensor)]
        largest = max(largest, sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model.eval()(torch.randn(1, 3, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
        model.train()
    return largest * batch


def estimate_phases(config: dict) -> list[Phase]:
    """Every phase of the config's profile on one GPU: dense and sparse FedAvg rounds at batch_size (centralized
    training needs less: no server buffers), per-sample scoring at its chunk size, evaluation and feature caching
    at eval_batch_size; for a random-init model of the config's shape, in the config's `amp` on a T4 (auto: fp16)."""
    amp = setting(config, "amp")
    amp = DTYPES["fp16" if amp == "auto" else amp]  # auto on a T4 (sm_75) is fp16
    torch.manual_seed(0)
    model = build_model(config["model"], num_classes=NUM_CLASSES, pretrained=False, img_size=config["img_size"])
    size = config["img_size"]
    params = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in backbone_parameters(model).values())
    n_train, n_val, n_test = split_sizes(config)
    data = (n_train + n_val + n_test) * (3 * 32 * 32 + 8)  # uint8 images and int64 labels
    half = 2 if amp is not None else 4
    train = training_activations(model, size, config["batch_size"], amp)
    chunk = default_chunk_size(model)
    scoring = scoring_activations(model, size, chunk)
    evaluation = evaluation_activations(model, size, config["eval_batch_size"], amp)
    weights, cast = 4 * params, half * params  # fp32 weights; autocast's low-precision copies during evaluation
    # RoundSum (the round's start weights, the running average, the unit-update sum) and the algorithm's own state;
    # merge=ties keeps the round's trained weights too (m copies)
    algorithm = algorithm_class(algorithm_name(config))
    ties = setting(config, "merge") == "ties"
    kept = clients_per_round(config["num_clients"], config["participation"]) if ties else 0
    server = (3 + algorithm.memory_copies + kept) * 4 * params
    features = 4 * model.num_features * n_train  # the cached pre-logit features (fp32)
    return [
        Phase(f"dense fine-tuning (a {algorithm.name} round)", 3 * weights, server, train, data),
        Phase(f"sparse fine-tuning (a {algorithm.name} round)", 3 * weights, server + backbone, train, data),
        Phase(f"sensitivity scoring (chunk {chunk}, fp32)", weights, 4 * backbone, scoring, data),
        Phase("evaluation", weights + cast, 0, evaluation, data),
        Phase("feature caching", weights + cast, features, evaluation, data),
    ]


def memory_table(phases: list[Phase], capacity: int = T4_BYTES) -> str:
    """The phases as text: GiB by part, the total against `capacity`, and the label that says it is an estimate."""
    lines = [f"peak GPU memory per phase, {LABEL}; CUDA context {CUDA_CONTEXT_BYTES / GiB:.1f} GiB assumed:"]
    for p in phases:
        parts = " + ".join(
            f"{k} {v / GiB:.2f}"
            for k, v in (("weights", p.weights), ("state", p.state), ("activations", p.activations), ("data", p.data))
        )
        verdict = "fits" if p.fits(capacity) else "DOES NOT FIT"
        lines.append(f"  {p.name:<38} {p.total / GiB:5.2f} GiB vs a T4's {capacity / GiB:.0f} GiB: {verdict} ({parts})")
    return "\n".join(lines)
