"""The one local-training loop (centralized epochs, FedAvg clients, sparse fine-tuning) and the one evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from helpers.core.precision import autocast
from helpers.data.datasets import augment_batch, eval_batch

SCHEDULERS = ("cosine", "step", "constant", "warmup_cosine")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss: the learning rate is usually too high."""


def _inputs(batch: torch.Tensor, preprocess) -> torch.Tensor:
    """Model inputs: uint8 images go through `preprocess`; floating-point rows are cached features already."""
    return batch if batch.is_floating_point() else preprocess(batch)


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    scheduler: str = "constant",
    warmup_steps: int = 0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> float:
    """Learning rate at optimizer step `step` (0-based); a pure function, so resume needs no scheduler state."""
    if scheduler == "constant":
        return base_lr
    if scheduler == "step":
        return base_lr * gamma ** (step // step_size)
    if scheduler == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if scheduler == "warmup_cosine":
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    raise ValueError(f"scheduler={scheduler!r} is invalid: must be one of {', '.join(SCHEDULERS)}")


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batches: torch.Tensor,
    generator: torch.Generator,
    *,
    img_size: int,
    augment: str = "crop",
    lrs: list[float] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: str = "auto",
    correct: Callable[[], None] | None = None,
) -> float:
    """One optimizer step per row of `batches` (index tensor) under the config's `amp`; returns the mean loss.

    uint8 images are augmented on their device; float inputs (cached features, see helpers.training.features) go to
    `model` as they are. The loss is summed on the device and read once at the end. `correct` changes the
    (unscaled) gradients before each step: a federated algorithm's client correction (helpers.algorithms.fedavg).
    """
    device = images.device
    model.train()
    total = torch.zeros((), device=device)
    for i, idx in enumerate(batches):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[i]
        idx = idx.to(device, non_blocking=True)
        x = _inputs(images[idx], lambda b: augment_batch(b, generator, img_size=img_size, mode=augment))
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if correct is not None:
                scaler.unscale_(optimizer)  # the correction adds to true gradients; step() then skips unscaling
                correct()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if correct is not None:
                correct()
            optimizer.step()
        total += loss.detach().float()
    mean = total.item() / max(1, len(batches))
    if not math.isfinite(mean):
        raise NonFiniteLossError(
            f"training loss became {mean} over {len(batches)} steps (lr={optimizer.param_groups[0]['lr']:g}); "
            "lower the learning rate. The last good checkpoint was kept."
        )
    return mean


@torch.no_grad()
def evaluation_sums(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    img_size: int,
    batch_size: int = 256,
    amp: str = "auto",
) -> tuple[float, int, int]:
    """(summed cross-entropy, correct predictions, samples) over `images` (eval mode, no augmentation, `amp`):
    sums, so that parts of a split evaluated apart add up to the whole (helpers.federated.evaluation)."""
    was_training = model.training
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, len(images), batch_size):
        x = _inputs(images[start : start + batch_size], lambda b: eval_batch(b, img_size=img_size))
        y = labels[start : start + batch_size]
        with autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return loss_sum.item(), int(correct.item()), len(images)


@torch.no_grad()
def predictions(
    model: nn.Module, images: torch.Tensor, *, img_size: int, batch_size: int = 256, amp: str = "auto"
) -> torch.Tensor:
    """The predicted class of every image (eval mode, no augmentation, `amp`), as evaluation_sums predicts it."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = _inputs(images[start : start + batch_size], lambda b: eval_batch(b, img_size=img_size))
        with autocast(images.device, amp):
            out.append(model(x).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=images.device)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    img_size: int,
    batch_size: int = 256,
    amp: str = "auto",
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a whole split (eval mode, no augmentation, the config's `amp`)."""
    loss_sum, correct, n = evaluation_sums(model, images, labels, img_size=img_size, batch_size=batch_size, amp=amp)
    n = max(1, n)
    return {"loss": loss_sum / n, "acc": correct / n}
