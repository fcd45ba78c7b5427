"""Data: CIFAR-100 or synthetic CIFAR-shaped images kept on the device as uint8; batched on-device augmentation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from helpers.core import caches
from helpers.core.downloads import OFFLINE_HINT, DatasetUnavailableError, check_downloads
from helpers.core.seeding import numpy_rng, torch_generator
from helpers.core.settings import no_train_data
from helpers.data.sharding import config_shards

NUM_CLASSES = 100  # CIFAR-100 and its synthetic stand-in
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("crop", "rrc", "none")
# Set on a federation's server: it must never hold the clients' training data (val and test are allowed).
NO_TRAIN_DATA_ENV = "FLME_NO_TRAIN_DATA"  # read by helpers.core.settings.no_train_data


class TrainDataWithheldError(RuntimeError):
    """Code on a server without the training split (FLME_NO_TRAIN_DATA=1) tried to use it."""


class Withheld:
    """Data that lives on the clients, not here: its size (if known) and nothing else; any other use raises."""

    def __init__(self, what: str, size: int | None = None, why: str | None = None):
        self.what, self.size = what, size
        self.why = why or f"{NO_TRAIN_DATA_ENV}=1: a federation's server holds no training data"

    def __len__(self) -> int:
        if self.size is None:
            self.refuse("its size")
        return self.size

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("what", "size", "why"):
            raise AttributeError(name)
        self.refuse(name)

    def __getitem__(self, index):
        self.refuse("its entries")

    def refuse(self, use: str):
        raise TrainDataWithheldError(
            f"{self.what} is not on this machine ({self.why}), yet the code asked for {use}: this step must run on "
            "the clients (helpers.flower.server)"
        )


def train_data_withheld() -> bool:
    """True in a process started with FLME_NO_TRAIN_DATA=1 (a Flower server); values other than 1, 0, "" raise."""
    return no_train_data()


@dataclass
class Data:
    """The three splits as uint8 images (N, 3, 32, 32) and int64 labels, all on one device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = NUM_CLASSES


def load_cifar100(root: str, download: bool = True) -> tuple[torch.Tensor, ...]:
    """CIFAR-100 train and test sets through torchvision, as (train_x, train_y, test_x, test_y) uint8/int64."""
    from torchvision.datasets import CIFAR100

    try:
        sets = [CIFAR100(root, train=train, download=download) for train in (True, False)]
    except Exception as exc:  # URLError, RuntimeError("Dataset not found"), SSL errors...
        raise DatasetUnavailableError(
            f"could not load CIFAR-100 from {root!r} ({type(exc).__name__}: {str(exc)[:200]}). "
            "The full profile downloads it with torchvision on first use, which needs internet. " + OFFLINE_HINT
        ) from None
    out = []
    for ds in sets:
        out.append(torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))))
        out.append(torch.as_tensor(ds.targets, dtype=torch.int64))
    return tuple(out)


def make_synthetic(num_train: int, num_test: int, num_classes: int = NUM_CLASSES, seed: int = 0):
    """CIFAR-shaped uint8 images with learnable classes: a per-class colour pattern, shifted, jittered, noisy."""
    rng = numpy_rng(seed, "synthetic")
    # Each class is a smooth random 4x4 colour pattern upsampled to 32x32: learnable yet not trivial.
    low = torch.from_numpy(rng.uniform(0, 255, (num_classes, 3, 4, 4)).astype(np.float32))
    protos = F.interpolate(low, size=32, mode="bilinear", align_corners=False)

    def draw(n: int, key: str):
        r = numpy_rng(seed, "synthetic", key)
        y = np.arange(n) % num_classes  # balanced, then shuffled
        r.shuffle(y)
        x = protos[y].numpy()
        shifts = r.integers(-3, 4, (n, 2))
        x = np.stack([np.roll(img, tuple(s), axis=(1, 2)) for img, s in zip(x, shifts)])
        x = x * r.uniform(0.7, 1.3, (n, 1, 1, 1)) + r.normal(0, 30, x.shape)
        return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    return (*draw(num_train, "train"), *draw(num_test, "test"))


CIFAR100_PER_CLASS = {"train": 500, "test": 100}  # the published dataset: 50,000 train and 10,000 test images


def class_counts(config: dict) -> dict[str, np.ndarray]:
    """Images per class in the train, val and test splits, from public facts only (CIFAR-100's published counts,
    the synthetic set's balanced labels, stratified_split's rounding): what a server without the data knows."""
    if config["dataset"] == "cifar100":
        file, test = (np.full(NUM_CLASSES, CIFAR100_PER_CLASS[part]) for part in ("train", "test"))
    else:  # make_synthetic: labels arange(n) % classes, shuffled
        file, test = (np.bincount(np.arange(config[f"synthetic_{part}_size"]) % NUM_CLASSES, minlength=NUM_CLASSES)
                      for part in ("train", "test"))  # fmt: skip
    val = np.array([int(round(config["val_fraction"] * n)) for n in file], dtype=np.int64)
    return {"train": file - val, "val": val, "test": test}


def expected_shard_sizes(config: dict) -> list[int]:
    """Every client's n_k without the data: the sharders' sizes depend on the class counts and the seed only, not
    on where each image sits, so sharding labels sorted by class gives them (a Flower server checks its nodes)."""
    counts = class_counts(config)["train"]
    return [len(s) for s in config_shards(config, np.repeat(np.arange(len(counts)), counts))]


def stratified_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (train, val) holding val_fraction of every class in val."""
    labels = np.asarray(labels)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be a number in (0, 1)")
    rng = numpy_rng(seed, "split")
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; asking for cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' is invalid here: no CUDA GPU is visible; allowed: auto, cpu")
    return torch.device(device)


def load_data(config: dict, device: torch.device, *, holder: bool = False) -> Data:
    """The train/val/test splits for a config, on `device` (kept in caches.DATA: grids reuse them).

    Under FLME_NO_TRAIN_DATA=1 the train split is Withheld (any use raises), unless `holder`: a client (a Flower
    node) that holds its own training data."""
    check_downloads(config)  # offline with `full`: one message in seconds, before any library retries
    key = ("dataset", "data_root", "synthetic_train_size", "synthetic_test_size", "val_fraction", "data_seed")
    values = (*(config[k] for k in key), not holder and train_data_withheld())
    return caches.DATA.get((values, str(device)), lambda: _load_data(values, str(device)))


def _load_data(key: tuple, device: str) -> Data:
    dataset, root, n_train, n_test, val_fraction, data_seed, withheld = key
    if dataset == "cifar100":
        x, y, test_x, test_y = load_cifar100(root)
    else:
        x, y, test_x, test_y = make_synthetic(n_train, n_test, seed=data_seed)
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, data_seed)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    parts = (x[train_idx], y[train_idx], x[val_idx], y[val_idx], test_x, test_y)
    if withheld:  # val is carved from the train file: only its rows stay
        return Data(Withheld("the training split"), Withheld("the training labels"), *(t.to(device) for t in parts[2:]))
    return Data(*(t.to(device) for t in parts))


def no_data(why: str) -> Data:
    """A server's Data when every split is on the clients (`why`): any use of a split raises."""
    names = ("training split", "training labels", "validation split", "validation labels", "test split", "test labels")
    return Data(*(Withheld(f"the {name}", why=why) for name in names))


def step_batches(pool: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch_size) indices drawn from `pool` without replacement, reshuffled when exhausted."""
    pool = torch.as_tensor(pool).cpu()
    need = steps * batch_size
    perms = [pool[torch.randperm(len(pool), generator=generator)] for _ in range(math.ceil(need / len(pool)))]
    return torch.cat(perms)[:need].view(steps, batch_size)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to ImageNet-normalised float32 (a new tensor), with the /255 folded into mean and std."""
    mean, std = caches.NORMALIZATION.get(x.device, lambda: _mean_std(x.device))
    return x.to(torch.float32, copy=True).sub_(mean).div_(std)


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device (caches.NORMALIZATION): at 32 px, making them costs as much as normalising a batch.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    return mean, torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255


def _resize(x: torch.Tensor, img_size: int) -> torch.Tensor:
    # Bilinear weights sum to one, so normalising first (at 32 px) and resizing after gives the same pixels as
    # resize-then-normalise, with the per-pixel arithmetic done on 49x fewer pixels at 224.
    if x.shape[-1] == img_size and x.shape[-2] == img_size:
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)


def _shift_flip(images: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-sample integer-pixel crop of the zero-padded images, mirrored where `flip`; an index, no resampling.

    offsets (B, 2) in [-padding, padding] shift the (x, y) window, exactly RandomCrop(side, padding) followed by
    RandomHorizontalFlip. A mirrored crop is the crop of the mirrored padded image at the mirrored offset.
    """
    n, c, side, _ = images.shape
    padded = F.pad(images, (padding,) * 4)
    windows = torch.stack([padded, padded.flip(-1)]).unfold(3, side, 1).unfold(4, side, 1)  # (2, B, C, y, x, s, s)
    x0 = torch.where(flip, -offsets[:, 0], offsets[:, 0]) + padding
    batch = torch.arange(n, device=images.device)
    return windows[flip.long(), batch, :, offsets[:, 1] + padding, x0]


def _resample(x: torch.Tensor, params: torch.Tensor, img_size: int) -> torch.Tensor:
    """Random-resized-crop + flip + resize of every (normalised) image in one grid_sample.

    params (B, 5) per sample, in normalised [-1, 1] input coordinates: x scale (negative = flip), x shift,
    y scale, y shift, and the window's width in input pixels. Output pixel centres are clamped to the window's
    outer pixel centres, so upsampling matches crop-then-resize (F.interpolate, align_corners=False).
    """
    p = params.to(x.device, torch.float32)
    u = (torch.arange(img_size, device=x.device, dtype=torch.float32) * 2 + 1) / img_size - 1

    def axis(scale, shift, width):
        limit = (1 - 1 / width.clamp(min=1))[:, None]
        return scale[:, None] * torch.minimum(u.abs()[None], limit) * u.sign()[None] + shift[:, None]

    gx = axis(p[:, 0], p[:, 1], p[:, 4])
    gy = axis(p[:, 2], p[:, 3], p[:, 4] * p[:, 2].abs() / p[:, 0].abs())
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    # Windows lie inside the image and the clamp keeps every sample point on a pixel centre's hull: no padding read.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, *, img_size: int, mode: str = "crop", padding: int = 4
) -> torch.Tensor:
    """Per-sample random crop (padding 4) or random-resized-crop, horizontal flip, resize, normalise."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment={mode!r} is invalid: must be one of {', '.join(AUGMENTATIONS)}")
    if mode == "none":
        return eval_batch(images, img_size=img_size)
    n, side = len(images), images.shape[-1]
    # Random numbers come from a CPU generator: identical on every device, pure function of the seed keys.
    flip = torch.rand(n, generator=generator) < 0.5
    if mode == "crop":
        # Integer pixel offsets in [-padding, padding] of a side-sized window, as RandomCrop(32, padding=4). The
        # crop runs on uint8 at the source size (black padding), so only the final resize touches img_size pixels.
        offsets = torch.randint(-padding, padding + 1, (n, 2), generator=generator)
        x = _shift_flip(images, offsets.to(images.device), flip.to(images.device), padding)
        return _resize(_normalize(x), img_size)
    # RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)); sides clamped to the image instead of retries.
    area = torch.empty(n).uniform_(0.08, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    params = torch.stack([torch.where(flip, -w, w), tx, h, ty, w * side], 1)
    return _resample(_normalize(images), params, img_size)


def eval_batch(images: torch.Tensor, *, img_size: int) -> torch.Tensor:
    """Deterministic preprocessing: normalise and resize to img_size."""
    return _resize(_normalize(images), img_size)


def augment_generator(seed: int, *keys: object) -> torch.Generator:
    """The generator for one epoch's (or one client-round's) batch order and augmentation."""
    return torch_generator(seed, "train", *keys)
