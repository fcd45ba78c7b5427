"""Models: DINO ViT-S/16 with a new linear head (full) and a tiny random-init ViT (smoke)."""

from __future__ import annotations

from collections.abc import Iterable

import timm
import torch
from torch import nn

from helpers.core.downloads import WeightsUnavailableError, cached_weights, fail_if_unreachable, missing_weights

DINO_VIT_S16 = "vit_small_patch16_224.dino"
TINY_VIT = "vit_tiny_smoke"
MODEL_NAMES = (DINO_VIT_S16, TINY_VIT)
# The shape of each model: timm's ViT-S/16 (which DINO uses) and the tiny smoke ViT that build_model makes from it.
VIT_SHAPES = {
    DINO_VIT_S16: dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    TINY_VIT: dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
}


def build_model(name: str, num_classes: int = 100, pretrained: bool = True, img_size: int = 224) -> nn.Module:
    """A timm ViT whose classifier is a fresh `num_classes` linear layer on the CLS token (`model.head`)."""
    if name == TINY_VIT:
        # Same timm class as DINO ViT-S/16, only smaller: every code path is shared with `full`.
        return timm.models.vision_transformer.VisionTransformer(
            img_size=img_size,
            **VIT_SHAPES[TINY_VIT],
            num_classes=num_classes,
            global_pool="token",
            class_token=True,
        )
    if name != DINO_VIT_S16:
        raise ValueError(f"model={name!r} is not supported; allowed: {', '.join(MODEL_NAMES)}")
    local = cached_weights(name) if pretrained else None
    if pretrained and local is None:
        fail_if_unreachable(missing_weights(name))
    # Cached weights load from the file: no hub request, no network retries when offline.
    overlay = {"pretrained_cfg_overlay": {"file": local}} if local else {}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, img_size=img_size, **overlay)
    except Exception as exc:  # hub/network errors come in many types; all mean the same to the user
        raise WeightsUnavailableError(
            f"could not load the DINO ViT-S/16 weights ({name}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {str(exc)[:200]}. The full profile needs internet on first use "
            "(the weights are then cached). To run offline use the smoke profile: FLME_PROFILE=smoke."
        ) from None


def forward_flops(name: str, img_size: int, num_classes: int = 100) -> int:
    """FLOPs of one image's forward pass (a multiply-add counts 2) from the model's shape alone: patch embedding; per
    block qkv, attention scores, attention-weighted sum, projection, MLP; the head on the class token. Norms, softmax,
    GELU and biases are left out, so the figure does not depend on which attention kernel a torch version runs."""
    if name not in VIT_SHAPES:
        raise ValueError(f"model={name!r} is not supported; allowed: {', '.join(MODEL_NAMES)}")
    shape = VIT_SHAPES[name]
    patch, dim = shape["patch_size"], shape["embed_dim"]
    patches = (img_size // patch) ** 2
    tokens = patches + 1  # the class token
    hidden = int(dim * shape["mlp_ratio"])
    embedding = patches * 3 * patch * patch * dim
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * hidden
    return 2 * (embedding + shape["depth"] * block + dim * num_classes)


def is_head(name: str) -> bool:
    """True for parameters of the classifier head (`head.weight`, `head.bias`)."""
    return name.startswith("head.")


def backbone_parameters(
    model: nn.Module, names: Iterable[str] | None = None, what: str = "names"
) -> dict[str, nn.Parameter]:
    """Every parameter except the head, by name (the part that model editing scores and masks), in model order;
    with `names`, only those, and a ValueError naming `what` if one is not a backbone parameter."""
    params = {n: p for n, p in model.named_parameters() if not is_head(n)}
    if names is None:
        return params
    names = set(names)
    unknown = sorted(names - set(params))
    if unknown:
        raise ValueError(f"{what}: {unknown[:5]} are not backbone parameters of the model")
    return {n: p for n, p in params.items() if n in names}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classifier head's parameters, by name."""
    return {n: p for n, p in model.named_parameters() if is_head(n)}


def set_trainable(model: nn.Module, part: str) -> list[nn.Parameter]:
    """Freeze all but `part` ('full' or 'head'); returns the trainable parameters in model order."""
    if part not in ("full", "head"):
        raise ValueError(f"train_mode={part!r} is not supported; allowed: full, head")
    for n, p in model.named_parameters():
        p.requires_grad_(part == "full" or is_head(n))
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def count_parameters(model: nn.Module) -> dict[str, int]:
    """Entry counts of backbone and head."""
    back = sum(p.numel() for p in backbone_parameters(model).values())
    head = sum(p.numel() for p in head_parameters(model).values())
    return {"backbone": back, "head": head, "total": back + head}
