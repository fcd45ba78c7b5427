"""Parameter sensitivity (diagonal Fisher) scores and multi-round mask calibration (§9).

The mask rules and the mask type are sparse.masks'; statistics and plots of masks are sparse.mask_stats'.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from helpers.core.models import backbone_parameters
from helpers.core.params import DEFAULT_MASK_RULE
from helpers.core.seeding import torch_generator
from helpers.sparse.masks import MASK_RULES, TensorMasks, mask_rule

SCORE_METHODS = ("talos", "empirical", "batch")
DAMPING = 0.1  # factor on frozen weights while scoring later rounds (TaLoS' mask value for frozen entries)
CHUNK_BYTES = 1 << 30  # memory budget for one layer's per-sample gradients in a chunk (fp32)
MAX_CHUNK = 64  # samples per forward/backward: bounds the activations (~70 MiB/sample, ViT-S/16 at 224, fp32)


# ----------------------------------------------------------------------------------------------
# Sensitivity scores
#
# Per-sample gradients come from ONE batched forward and backward per chunk: in eval mode the samples
# of a ViT are independent (LayerNorm per token, attention within a sample), so a layer's per-sample
# weight gradient is its output gradient times its input, contracted per sample (einsum). Forward hooks
# keep the inputs; a hook on each output gradient turns it into per-sample gradients as the backward
# reaches it, squares and sums them, and frees the input. Handlers return fresh tensors (never views of
# their inputs), so squaring in place is safe.


@contextlib.contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, grad enabled, requires_grad off on every parameter (no weight .grad work); all restored."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _contract(equation: str, a: Tensor, b: Tensor, per_sample: bool) -> Tensor:
    """einsum that keeps the leading sample dimension n only when `per_sample` (else sums over it)."""
    return torch.einsum(equation if per_sample else equation.replace("->n", "->"), a, b)


def _sum_tokens(g: Tensor, per_sample: bool) -> Tensor:
    """(n, tokens, d) -> (n, d), or (d,) summed over samples too."""
    return g.sum(1) if per_sample else g.sum((0, 1))


def _scale_grads(g: Tensor, x: Tensor, per_sample: bool) -> Tensor:
    """Gradient of an elementwise scale applied to x: sum over tokens of g * x (cheaper than einsum here)."""
    return _sum_tokens(g * x, per_sample)


def _tokens(t: Tensor) -> Tensor:
    """(n, ..., d) -> (n, tokens, d): every position before the last dimension is a token."""
    return t.float().reshape(t.shape[0], -1, t.shape[-1])


def _linear_grads(m: nn.Linear, a: Tensor, g: Tensor, per_sample: bool) -> dict[str, Tensor]:
    a, g = _tokens(a), _tokens(g)
    out = {"weight": _contract("nto,nti->noi", g, a, per_sample=per_sample)}
    if m.bias is not None:
        out["bias"] = _sum_tokens(g, per_sample)
    return out


def _layer_norm_grads(m: nn.LayerNorm, a: Tensor, g: Tensor, per_sample: bool) -> dict[str, Tensor]:
    shape, n = m.normalized_shape, a.shape[0]
    xhat = F.layer_norm(a.float(), shape, eps=m.eps).reshape(n, -1, m.weight.numel())
    g = g.float().reshape(n, -1, m.weight.numel())
    out = {"weight": _scale_grads(g, xhat, per_sample).unflatten(-1, shape)}
    if m.bias is not None:
        out["bias"] = _sum_tokens(g, per_sample).unflatten(-1, shape)
    return out


def _conv_grads(m: nn.Conv2d, a: Tensor, g: Tensor, per_sample: bool) -> dict[str, Tensor]:
    # A groups=1 convolution is a Linear on the unfolded patches (channel-major, like the weight).
    cols = F.unfold(a.float(), m.kernel_size, m.dilation, m.padding, m.stride)
    g = g.float().flatten(2)
    weight = _contract("nol,nil->noi", g, cols, per_sample=per_sample)
    out = {"weight": weight.unflatten(-1, m.weight.shape[1:])}
    if m.bias is not None:
        out["bias"] = _sum_tokens(g.transpose(1, 2), per_sample)
    return out


def _layer_scale_grads(m: LayerScale, a: Tensor, g: Tensor, per_sample: bool) -> dict[str, Tensor]:
    return {"gamma": _scale_grads(_tokens(g), _tokens(a), per_sample)}


def _position_grads(m: VisionTransformer, _: Tensor, g: Tensor, per_sample: bool) -> dict[str, Tensor]:
    # g is the gradient of timm's _pos_embed output: [cls, reg..., patches] (+ pos_embed on all or patches).
    g = g.float()
    parts, start = {}, 0
    if m.cls_token is not None:
        parts["cls_token"], start = g[:, :1], 1
    if m.reg_token is not None:
        parts["reg_token"] = g[:, start : start + m.reg_token.shape[1]]
    if m.pos_embed is not None:
        parts["pos_embed"] = g[:, m.num_prefix_tokens :] if m.no_embed_class else g
    return {k: v.unsqueeze(1).clone() if per_sample else v.sum(0, keepdim=True) for k, v in parts.items()}


Handler = Callable[[nn.Module, Tensor, Tensor, bool], dict[str, Tensor]]


@dataclass(frozen=True)
class _Tap:
    """Where a module's parameter gradients come from: `site`'s output gradient (and input) via `handler`."""

    prefix: str  # "blocks.0.attn.qkv." ("" for the model's own parameters)
    owner: nn.Module
    site: nn.Module
    handler: Handler


def _standard_vit(m: nn.Module) -> bool:
    """timm's own VisionTransformer with a fixed-size position embedding: its _pos_embed then ends in pos_drop."""
    return (
        type(m) is VisionTransformer
        and m.pos_embed is not None
        and not m.dynamic_img_size
        and type(m.pos_drop) in (nn.Dropout, nn.Identity)
    )


def _handler(m: nn.Module) -> tuple[nn.Module, Handler] | None:
    """(site, handler) for a supported module, or None. Exact types: a subclass may compute differently."""
    if type(m) is nn.Linear:
        return m, _linear_grads
    if type(m) in (nn.LayerNorm, TimmLayerNorm):
        return m, _layer_norm_grads
    if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return m, _conv_grads
    if type(m) is LayerScale and not m.inplace:
        return m, _layer_scale_grads
    if _standard_vit(m):
        return m.pos_drop, _position_grads
    return None


def _find_taps(model: nn.Module, names: Iterable[str]) -> list[_Tap]:
    """One tap per module holding backbone parameters; a clear error for anything not supported."""
    names = set(names)
    shared = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    taps, unsupported = [], []
    for prefix, m in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False)]
        if not any(n in names for n in own):
            continue
        found = _handler(m)
        if found is None or shared & set(own):
            unsupported.append(f"{prefix or '<model>'} ({type(m).__name__})")
        else:
            taps.append(_Tap(f"{prefix}." if prefix else "", m, *found))
    if unsupported:
        raise NotImplementedError(
            "compute_scores: per-sample gradients are implemented for nn.Linear, LayerNorm, groups=1 Conv2d, "
            "timm LayerScale and timm VisionTransformer tokens, each used once per forward with its own "
            f"parameters; not for {', '.join(unsupported)}"
        )
    return taps


def default_chunk_size(model: nn.Module) -> int:
    """Samples per forward/backward so that one layer's per-sample gradients fit in ~1 GiB (at most 64)."""
    n = max((p.numel() for p in backbone_parameters(model).values()), default=1)
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * n)))


def _backward_grads(
    model: nn.Module, taps: list[_Tap], x: Tensor, loss_of: Callable[[Tensor], Tensor], emit: Callable
) -> None:
    """Forward x and backward loss_of(logits) once; emit(tap, input, output gradient) as each one arrives."""
    inputs: dict[int, Tensor] = {}
    roots: list[Tensor] = []  # outputs of taps that see no differentiable input: where the backward stops
    watched: list[tuple[Tensor, int]] = []  # tensors whose in-place change would make the hooks wrong
    fired: set[int] = set()

    def on_grad(i: int, g: Tensor) -> None:
        emit(taps[i], inputs.pop(i), g)

    def on_forward(i: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if i in fired:
            raise RuntimeError(f"compute_scores: {taps[i].prefix or 'the model'} ran twice in one forward")
        fired.add(i)
        if not output.requires_grad:  # e.g. the patch embedding: no backward below it (image grads are slow)
            output = output.detach().requires_grad_()
            roots.append(output)
        inputs[i] = args[0]
        watched.extend((t, t._version) for t in (args[0], output))
        output.register_hook(functools.partial(on_grad, i))
        return output

    handles = [tap.site.register_forward_hook(functools.partial(on_forward, i)) for i, tap in enumerate(taps)]
    try:
        logits = model(x.detach())  # nothing but the roots requires grad (see _scoring_mode)
    finally:
        for h in handles:
            h.remove()
    missed = [taps[i].prefix or "the model" for i in range(len(taps)) if i not in fired]
    if missed or any(t._version != v for t, v in watched):
        raise RuntimeError(f"compute_scores: backbone modules not called once, or changed in place: {missed}")
    if roots:
        torch.autograd.grad(loss_of(logits), roots, allow_unused=True)


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
    `chunk_size` samples go through one forward/backward (default: default_chunk_size).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(SCORE_METHODS)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")
    chunk_size = chunk_size or default_chunk_size(model)
    if generator is None:  # a fixed default keeps scores reproducible when the caller passes none
        generator = torch_generator(0, "sensitivity", "talos_labels")
    backbone = backbone_parameters(model)
    taps = _find_taps(model, backbone)  # fails before any compute
    device = next(iter(backbone.values())).device
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in backbone.items()}
    with _scoring_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device=device, dtype=torch.long)
            _score_batch(model, taps, x, y, method, generator, chunk_size, scores)
    return scores


def _score_batch(
    model: nn.Module,
    taps: list[_Tap],
    x: Tensor,
    y: Tensor,
    method: str,
    generator: torch.Generator,
    chunk_size: int,
    scores: dict[str, Tensor],
) -> None:
    """Add one batch's scores, `chunk_size` samples per forward/backward."""
    per_sample = method != "batch"
    sums = scores if per_sample else {n: torch.zeros_like(s) for n, s in scores.items()}
    # talos draws all labels of a batch at once; a single chunk draws them from its own forward's logits.
    one_chunk = len(x) <= chunk_size
    if method == "talos" and not one_chunk:
        y = sample_labels(model, x, generator).to(y.device)

    def loss_of(logits: Tensor, y: Tensor) -> Tensor:
        if method == "talos":
            y = _draw_labels(logits, generator).to(y.device) if one_chunk else y
            return logits.gather(1, y.unsqueeze(1)).sum()  # raw logits z_y, not log-softmax
        loss = F.cross_entropy(logits, y, reduction="sum")
        return loss if per_sample else loss / len(x)

    def emit(tap: _Tap, a: Tensor, g_out: Tensor) -> None:
        for name, g in tap.handler(tap.owner, a, g_out, per_sample).items():
            sums[tap.prefix + name].add_(g.mul_(g).sum(0) if per_sample else g)  # g is fresh: in place

    for i in range(0, len(x), chunk_size):
        yc = y[i : i + chunk_size]
        _backward_grads(model, taps, x[i : i + chunk_size], lambda logits, yc=yc: loss_of(logits, yc), emit)
    if not per_sample:
        for n, s in sums.items():
            scores[n].add_(s.square())


def _draw_labels(logits: Tensor, generator: torch.Generator) -> Tensor:
    """y ~ Categorical(softmax(logits)) per row, drawn on CPU so the draw is device-independent."""
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_labels(forward: Callable[[Tensor], Tensor], x: Tensor, generator: torch.Generator) -> Tensor:
    """y ~ Categorical(softmax(forward(x))) per sample, drawn on CPU so the draw is device-independent."""
    return _draw_labels(forward(x), generator)


# ----------------------------------------------------------------------------------------------
# Mask calibration


def _check_calibration_args(sparsity: object, rounds: object, rule: object) -> None:
    """Validate before any compute, naming the parameter and the allowed values."""
    if not isinstance(rule, str) or rule not in MASK_RULES:
        raise ValueError(f"rule={rule!r} is not supported; allowed: {', '.join(MASK_RULES)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1) (fraction of backbone entries frozen)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1")
    if rounds > 1 and mask_rule(rule).one_shot:
        sensitivity = [n for n, r in MASK_RULES.items() if not r.one_shot]
        raise ValueError(
            f"rounds={rounds} with rule={rule!r}: rounds only apply to sensitivity rules "
            f"({', '.join(sensitivity)}); {rule} is one-shot, use rounds=1"
        )


def _select(scores: TensorMasks, trainable: TensorMasks, keep: int, lowest: bool) -> TensorMasks:
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
            raise ValueError(f"score_fn: score {n} has shape {tuple(scores[n].shape)}, parameter {tuple(p.shape)}")
        if torch.isnan(scores[n]).any():
            raise ValueError(f"score_fn: score {n} contains NaN")


def calibrate_masks(
    model: nn.Module,
    score_fn: Callable[[nn.Module], Mapping[str, Tensor]],
    *,
    sparsity: float,
    rounds: int = 1,
    rule: str = DEFAULT_MASK_RULE,
    seed: int = 0,
    history: list[TensorMasks] | None = None,
    names: Iterable[str] | None = None,
) -> TensorMasks:
    """Bool masks (True = trainable) over backbone parameter names with density 1 - sparsity, exactly.

    Sensitivity rules run R rounds: after round r a fraction density**(r/R) stays trainable (one global
    threshold), frozen entries never return and are damped x0.1 while later rounds score. Weights are
    restored bit-exactly. `history`, if given, receives a copy of the masks after every round. `names`
    limits the mask to those backbone parameters (default: all; in model order either way); sparsity 0 scores nothing.
    """
    _check_calibration_args(sparsity, rounds, rule)
    params = backbone_parameters(model, names)
    density = 1.0 - float(sparsity)
    total = sum(p.numel() for p in params.values())
    trainable = {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()}
    chosen = mask_rule(rule)

    if density == 1.0:  # nothing to freeze: no scores needed
        if history is not None:
            history.append({n: m.clone() for n, m in trainable.items()})
        return trainable
    if chosen.one_shot:
        trainable = _select(chosen.scores(params, seed), trainable, round(density * total), chosen.keep_lowest)
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
            trainable = _select(scores, trainable, round(fraction * total), chosen.keep_lowest)
            if history is not None:
                history.append({n: m.clone() for n, m in trainable.items()})
    finally:
        with torch.no_grad():
            for n, p in params.items():
                if n in originals:
                    p.copy_(originals[n])
    return trainable
