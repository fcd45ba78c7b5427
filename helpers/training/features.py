"""Cached backbone features for head-only training: the linear probe, FedAvg with train_mode="head", step 0.

A frozen backbone in eval mode maps an image to the same feature every time, so a head-only phase computes the
features once per (backbone weights, img_size, data, split), keeps them in memory and under
<run root>/features/, and trains the head on them: an epoch costs a matrix product instead of a ViT forward.
Features are un-augmented (eval preprocessing): augmenting would need the backbone at every step, which is what
the cache avoids. `head_features="backbone"` keeps the per-step backbone path, with augmentation.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from helpers.config.experiments import setting
from helpers.core import caches
from helpers.core.models import backbone_parameters
from helpers.core.precision import amp_dtype, autocast
from helpers.core.settings import default_run_root
from helpers.core.torchfiles import UnreadableFile, load_torch, save_torch
from helpers.data.datasets import Data, Withheld, eval_batch

SPLITS = ("train", "val", "test")
_DATA_KEYS = ("dataset", "synthetic_train_size", "synthetic_test_size", "val_fraction", "data_seed")


@torch.no_grad()
def backbone_features(
    model: nn.Module, images: Tensor, *, img_size: int, batch_size: int = 256, amp: str = "auto"
) -> Tensor:
    """Pre-logit features (what model.head sees) of uint8 images: eval mode, no augmentation, float32 out (computed
    under the config's `amp`)."""
    was_training, device = model.training, images.device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_batch(images[start : start + batch_size], img_size=img_size)
        with autocast(device, amp):
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def fingerprint(model: nn.Module, head: bool = False) -> tuple[float, ...]:
    """Per-tensor sums, plain and index-weighted, of the backbone (and head): tells weight states apart."""
    params = dict(model.named_parameters()) if head else backbone_parameters(model)
    sums = []
    for p in params.values():
        flat = p.detach().double().flatten()
        sums += [
            flat.sum(),
            (flat * torch.arange(1, len(flat) + 1, device=flat.device, dtype=flat.dtype)).sum(),
        ]
    return tuple(torch.stack(sums).tolist())


def feature_key(model: nn.Module, config: dict, split: str, device: torch.device) -> str:
    """Hash of what the features depend on: data, split, model name and weights, img_size, precision."""
    items = {k: config[k] for k in _DATA_KEYS} | {"model": config["model"], "img_size": config["img_size"]}
    precision = str(amp_dtype(device, setting(config, "amp")))  # "None" for fp32, as keys were before `amp` existed
    items |= {"split": split, "precision": precision, "weights": fingerprint(model)}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def split_features(
    model: nn.Module, data: Data, split: str, config: dict, run_root: str | Path | None = None
) -> Tensor:
    """Features of one split (train, val or test): from memory (caches.FEATURES), else <run_root>/features/,
    else computed."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: must be one of {', '.join(SPLITS)}")
    images = getattr(data, f"{split}_x")
    if isinstance(images, Withheld):  # on a server without training data: the clients featurise their own
        return images
    key = feature_key(model, config, split, images.device)
    return caches.FEATURES.get(key, lambda: _read_or_compute(model, images, config, f"{split}-{key}.pt", run_root))


def _read_or_compute(model: nn.Module, images: Tensor, config: dict, name: str, run_root: str | Path | None) -> Tensor:
    """The features stored as <run_root>/features/<name>, else computed from `images` and stored there."""
    path = Path(run_root if run_root is not None else default_run_root()) / "features" / name
    features = _read(path, images.device, len(images))
    if features is None:
        features = backbone_features(model, images, img_size=config["img_size"], batch_size=config["eval_batch_size"],
                                     amp=setting(config, "amp"))  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch(path, features.cpu())
    return features


def _read(path: Path, device: torch.device, rows: int) -> Tensor | None:
    """A cached feature file, or None if absent, unreadable, refused (never unpickled as code) or not a float32
    (rows, dim) tensor: it is then recomputed and replaced."""
    if not path.exists():
        return None
    try:
        features = load_torch(path, map_location=device)
    except UnreadableFile as exc:  # a torn or foreign file is only a cache miss
        warnings.warn(f"feature cache: {exc}; recomputing it", stacklevel=3)
        return None
    if isinstance(features, Tensor) and features.dtype == torch.float32 and features.shape[:1] == (rows,):
        return features
    warnings.warn(f"feature cache {path} does not hold {rows} rows of float32 features; recomputing it", stacklevel=3)
    return None


def feature_data(model: nn.Module, data: Data, config: dict, run_root: str | Path | None = None) -> Data:
    """`data` with every split's images replaced by their cached backbone features (labels unchanged)."""
    x = {split: split_features(model, data, split, config, run_root) for split in SPLITS}
    return Data(x["train"], data.train_y, x["val"], data.val_y, x["test"], data.test_y)


def uses_cached_features(config: dict) -> bool:
    """True for head-only runs that train on cached features (train_mode="head", head_features="cached")."""
    return config.get("train_mode") == "head" and config.get("head_features") == "cached"


def head_view(model: nn.Module, data: Data, config: dict, run_root: str | Path | None = None) -> tuple[nn.Module, Data]:
    """What the training loop sees: (model.head, features) for cached head-only runs, else (model, images)."""
    if not uses_cached_features(config):
        return model, data
    return model.head, feature_data(model, data, config, run_root)
