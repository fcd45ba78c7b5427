"""Where a federated run evaluates: on the server (`evaluation=server`), or on the clients (`evaluation=clients`).

With `clients`, client k holds part k of the validation and test splits (contiguous, disjoint, covering the split),
evaluates it and sends (summed loss, correct, samples); the server adds them in client order. Sums add up to the
whole split: accuracy equals the server's exactly, loss up to float rounding. The sequential engine evaluates the
parts in turn; a RemoteEvaluation (helpers.flower.server.NodeEngine) asks the nodes, so the server needs no data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from helpers.config.experiments import setting
from helpers.data.datasets import Data, class_counts
from helpers.training.loop import evaluate, evaluation_sums

NAN = {"loss": math.nan, "acc": math.nan}


@runtime_checkable
class RemoteEvaluation(Protocol):
    """The clients' side of evaluation=clients: each client's sums on its part of a split, in client order."""

    def client_evaluations(self, model: nn.Module, config: dict, split: str) -> Iterator[tuple[float, int, int]]:
        """(summed loss, correct, samples) of every client k on part k of `split` (val or test), for `model`."""
        ...


def remote_evaluation(train_clients: object) -> RemoteEvaluation | None:
    """The engine's remote evaluation, or None when the splits are here."""
    return train_clients if isinstance(train_clients, RemoteEvaluation) else None


def eval_parts(n: int, num_clients: int) -> list[Tensor]:
    """Client k's positions in a split of n samples: contiguous, disjoint parts covering it (sizes differ by <= 1)."""
    return list(torch.tensor_split(torch.arange(n), num_clients))


def eval_part_sizes(config: dict, split: str) -> list[int]:
    """Every client's part size of `split` without the data (the split's size from its public class counts)."""
    return [len(p) for p in eval_parts(int(class_counts(config)[split].sum()), config["num_clients"])]


def split_tensors(data: Data, split: str) -> tuple[Tensor, Tensor]:
    """(images or features, labels) of the val or test split."""
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is invalid: must be one of val, test")
    return (data.val_x, data.val_y) if split == "val" else (data.test_x, data.test_y)


def part_sums(model: nn.Module, data: Data, split: str, part: Tensor, config: dict) -> tuple[float, int, int]:
    """Client-side evaluation: (summed loss, correct, samples) of `model` on `part` of `split`."""
    x, y = split_tensors(data, split)
    part = part.to(y.device)
    opts = dict(img_size=config["img_size"], batch_size=config["eval_batch_size"], amp=setting(config, "amp"))
    return evaluation_sums(model, x[part], y[part], **opts)


def evaluate_split(
    model: nn.Module, data: Data, split: str, config: dict, remote: RemoteEvaluation | None = None
) -> dict[str, float]:
    """Loss and accuracy of `model` on `split`, where the config's `evaluation` says: the server, or the clients'
    parts summed (asked of `remote`, else computed here in turn)."""
    if setting(config, "evaluation") == "server":
        x, y = split_tensors(data, split)
        return evaluate(model, x, y, img_size=config["img_size"], batch_size=config["eval_batch_size"],
                        amp=setting(config, "amp"))  # fmt: skip
    if remote is not None:
        sums = remote.client_evaluations(model, config, split)
    else:
        parts = eval_parts(len(split_tensors(data, split)[1]), config["num_clients"])
        sums = (part_sums(model, data, split, part, config) for part in parts)
    loss, correct, n = 0.0, 0, 0
    for part_loss, part_correct, part_n in sums:
        loss, correct, n = loss + part_loss, correct + part_correct, n + part_n
    n = max(1, n)
    return {"loss": loss / n, "acc": correct / n}


def round_evaluation(
    model: nn.Module, data: Data, rnd: int, config: dict, remote: RemoteEvaluation | None = None
) -> dict[str, float]:
    """The val/test columns of round `rnd`'s row (0-based): val every `eval_every` rounds and at the end, test at
    the end (and with val if `eval_test`); NaN when not due."""
    last, every = rnd + 1 == config["rounds"], config["eval_every"]
    due = {"val": (rnd + 1) % every == 0 or last, "test": last or (config["eval_test"] and (rnd + 1) % every == 0)}
    row = {}
    for split, now in due.items():
        m = evaluate_split(model, data, split, config, remote) if now else NAN
        row.update({f"{split}_loss": m["loss"], f"{split}_acc": m["acc"]})
    return row
