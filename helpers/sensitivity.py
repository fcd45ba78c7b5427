"""Parameter sensitivity (diagonal Fisher) scores, multi-round mask calibration and mask rules (§9)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from numbers import Real

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from helpers.models import backbone_parameters
from helpers.seeding import torch_generator

SCORE_METHODS = ("talos", "empirical", "batch")
MASK_RULES = ("least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude", "random")
SENSITIVITY_RULES = ("least_sensitive", "most_sensitive")
DAMPING = 0.1  # factor on frozen weights while scoring later rounds (TaLoS' mask value for frozen entries)
CHUNK_BYTES = 1 << 30  # memory budget for one chunk of per-sample gradients (fp32)
MAX_CHUNK = 64

Masks = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# Sensitivity scores


@contextlib.contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and timm's unfused attention (SDPA has no vmap batching rule); both restored after."""
    was_training = model.training
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    model.eval()
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in fused.items():
            m.fused_attn = flag
        model.train(was_training)


def default_chunk_size(model: nn.Module) -> int:
    """Samples per vmap chunk so that the per-sample backbone gradients fit in ~1 GiB."""
    n = sum(p.numel() for p in backbone_parameters(model).values())
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * max(n, 1))))


def compute_scores(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    method: str = "talos",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Sum over samples of squared gradients per backbone weight (the head is never scored).

    talos: d z_y / d theta for y ~ softmax(logits) (raw logit, labels drawn on CPU with `generator`);
    empirical: per-sample cross-entropy on the true label; batch: squared mean-loss gradient per batch.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(SCORE_METHODS)}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")
    chunk_size = chunk_size or default_chunk_size(model)
    if generator is None:  # a fixed default keeps scores reproducible when the caller passes none
        generator = torch_generator(0, "sensitivity", "talos_labels")

    backbone = {n: p.detach() for n, p in backbone_parameters(model).items()}
    # The head (and anything else outside the backbone) enters as a constant, never differentiated.
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in backbone}
    device = next(iter(backbone.values())).device
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in backbone.items()}

    def logits_of(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**params, **fixed}, (x,))

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = logits_of(params, x.unsqueeze(0))[0]
        if method == "talos":
            return logits.gather(0, y.unsqueeze(0)).squeeze(0)  # raw logit z_y, not log-softmax
        return F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    batch_grad = grad(lambda params, x, y: F.cross_entropy(logits_of(params, x), y))

    with _scoring_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device=device, dtype=torch.long)
            if method == "batch":
                for n, g in batch_grad(backbone, x, y).items():
                    scores[n].add_(g.float().square())
                continue
            if method == "talos":
                y = sample_labels(lambda xb: logits_of(backbone, xb), x, generator).to(device)
            for i in range(0, x.shape[0], chunk_size):
                grads = per_sample_grads(backbone, x[i : i + chunk_size], y[i : i + chunk_size])
                for n, g in grads.items():
                    # Out of place: autograd may return aliasing grads (cls_token is a view of pos_embed's).
                    scores[n].add_(g.float().square().sum(0))
    return scores


@torch.no_grad()
def sample_labels(forward: Callable[[Tensor], Tensor], x: Tensor, generator: torch.Generator) -> Tensor:
    """y ~ Categorical(softmax(forward(x))) per sample, drawn on CPU so the draw is device-independent."""
    probs = torch.softmax(forward(x).float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Mask calibration


def _check_calibration_args(sparsity: object, rounds: object, rule: object) -> None:
    """Validate before any compute, naming the parameter and the allowed values."""
    if rule not in MASK_RULES:
        raise ValueError(f"rule={rule!r} is not supported; allowed: {', '.join(MASK_RULES)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"sparsity={sparsity!r} must be a number in [0, 1) (fraction of backbone entries frozen)"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1")
    if rounds > 1 and rule not in SENSITIVITY_RULES:
        raise ValueError(
            f"rounds={rounds} with rule={rule!r}: rounds only apply to sensitivity rules "
            f"({', '.join(SENSITIVITY_RULES)}); {rule} is one-shot, use rounds=1"
        )


def _select(scores: Masks, trainable: Masks, keep: int, lowest: bool) -> Masks:
    """Keep exactly `keep` currently trainable entries with the lowest (or highest) scores, globally.

    Only currently trainable entries are candidates, i.e. frozen ones count as +inf for "lowest" and
    -inf for "highest" rules. Ties at the threshold go to the lower flat index (deterministic).
    """
    names = list(trainable)
    alive = torch.cat([trainable[n].flatten() for n in names])
    key = torch.cat([scores[n].detach().flatten().float().to(alive.device) for n in names])
    key = key if lowest else -key
    cand = alive.nonzero().squeeze(1)
    chosen = torch.zeros_like(alive)
    if keep > 0:
        k = key[cand]
        t = torch.kthvalue(k, keep).values  # the exact keep-th smallest, O(n) unlike a full sort
        below = k < t
        ties = (k == t).nonzero().squeeze(1)[: keep - int(below.sum())]
        pick = below
        pick[ties] = True
        chosen[cand[pick]] = True
    out, start = {}, 0
    for n in names:
        size = trainable[n].numel()
        out[n] = chosen[start : start + size].view_as(trainable[n]).clone()
        start += size
    return out


def _check_scores(scores: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    missing = [n for n in params if n not in scores]
    if missing:
        raise ValueError(f"score_fn: no scores for backbone parameters {missing[:5]}")
    for n, p in params.items():
        if scores[n].shape != p.shape:
            raise ValueError(
                f"score_fn: score {n} has shape {tuple(scores[n].shape)}, parameter {tuple(p.shape)}"
            )
        if torch.isnan(scores[n]).any():
            raise ValueError(f"score_fn: score {n} contains NaN")


def _rule_scores(params: Mapping[str, Tensor], rule: str, seed: int) -> Masks:
    """One-shot scores of the magnitude and random rules."""
    if rule in ("lowest_magnitude", "highest_magnitude"):
        return {n: p.detach().abs() for n, p in params.items()}
    gen = torch_generator(seed, "mask_random")  # CPU draws in model order: identical on every device
    return {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}


def calibrate_masks(
    model: nn.Module,
    score_fn: Callable[[nn.Module], Mapping[str, Tensor]],
    *,
    sparsity: float,
    rounds: int = 1,
    rule: str = "least_sensitive",
    seed: int = 0,
    history: list[Masks] | None = None,
) -> Masks:
    """Bool masks (True = trainable) over backbone parameter names with density 1 - sparsity, exactly.

    Sensitivity rules run R rounds: after round r a fraction density**(r/R) stays trainable (one global
    threshold), frozen entries never return and are damped x0.1 while later rounds score. Weights are
    restored bit-exactly. `history`, if given, receives a copy of the masks after every round.
    """
    _check_calibration_args(sparsity, rounds, rule)
    params = backbone_parameters(model)
    density = 1.0 - float(sparsity)
    total = sum(p.numel() for p in params.values())
    trainable = {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()}
    lowest = rule in ("least_sensitive", "lowest_magnitude", "random")

    if rule not in SENSITIVITY_RULES:
        trainable = _select(_rule_scores(params, rule, seed), trainable, round(density * total), lowest)
        if history is not None:
            history.append({n: m.clone() for n, m in trainable.items()})
        return trainable

    originals = {n: p.detach().clone() for n, p in params.items()} if rounds > 1 else {}
    try:
        for r in range(1, rounds + 1):
            if r > 1:
                with torch.no_grad():  # damp the frozen entries relative to the original weights
                    for n, p in params.items():
                        p.copy_(torch.where(trainable[n], originals[n], originals[n] * DAMPING))
            scores = score_fn(model)
            _check_scores(scores, params)
            fraction = density if r == rounds else density ** (r / rounds)
            trainable = _select(scores, trainable, round(fraction * total), lowest)
            if history is not None:
                history.append({n: m.clone() for n, m in trainable.items()})
    finally:
        with torch.no_grad():
            for n, p in params.items():
                if n in originals:
                    p.copy_(originals[n])
    return trainable


# ----------------------------------------------------------------------------------------------
# Mask statistics and plots


def mask_density_table(masks: Mapping[str, Tensor], model: nn.Module | None = None) -> pd.DataFrame:
    """Per-tensor name, entries, trainable, density; with `model`, in model order and checked against it."""
    names = list(masks)
    if model is not None:
        params = backbone_parameters(model)
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise ValueError(f"masks: {unknown[:5]} are not backbone parameters of the model")
        for n in masks:
            if masks[n].shape != params[n].shape:
                raise ValueError(
                    f"masks: {n} has shape {tuple(masks[n].shape)}, parameter {tuple(params[n].shape)}"
                )
        names = [n for n in params if n in masks]
    rows = []
    for n in names:
        entries, kept = masks[n].numel(), int(masks[n].count_nonzero())
        rows.append({"name": n, "entries": entries, "trainable": kept, "density": kept / max(entries, 1)})
    return pd.DataFrame(rows, columns=["name", "entries", "trainable", "density"])


def overall_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of all masked entries that are trainable."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.count_nonzero()) for m in masks.values()) / max(total, 1)


def mask_jaccard(masks_a: Mapping[str, Tensor], masks_b: Mapping[str, Tensor]) -> float:
    """|A & B| / |A | B| of the two trainable sets (1.0 when both are empty)."""
    if set(masks_a) != set(masks_b):
        raise ValueError("masks_a and masks_b must cover the same parameter names")
    inter = union = 0
    for n, a in masks_a.items():
        a, b = a.bool(), masks_b[n].bool().to(a.device)
        if a.shape != b.shape:
            raise ValueError(f"masks_a and masks_b differ in shape at {n}")
        inter += int((a & b).sum())
        union += int((a | b).sum())
    return inter / union if union else 1.0


def _layer_of(name: str) -> str:
    """'blocks.3.attn.qkv.weight' -> 'blocks.3'; 'patch_embed.proj.weight' -> 'patch_embed'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else parts[0]


def plot_mask_density(masks: Mapping[str, Tensor], by: str = "layer") -> Figure:
    """Bar chart of trainable fraction per layer (`by="layer"`) or per tensor (`by="tensor"`)."""
    if by not in ("layer", "tensor"):
        raise ValueError(f"by={by!r} is not supported; allowed: layer, tensor")
    table = mask_density_table(masks)
    if by == "layer":
        table["name"] = table["name"].map(_layer_of)
        table = table.groupby("name", sort=False)[["entries", "trainable"]].sum().reset_index()
        table["density"] = table["trainable"] / table["entries"].clip(lower=1)
    fig = Figure(figsize=(max(6.0, 0.25 * len(table) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(table)), table["density"], color="tab:blue")
    ax.axhline(overall_density(masks), color="tab:red", ls="--", lw=1, label="overall")
    ax.set_xticks(range(len(table)), table["name"], rotation=90, fontsize=7)
    ax.set_ylabel("trainable fraction")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    return fig
