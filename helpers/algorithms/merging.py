"""Merge rules for the round (`merge`): how the server combines the clients' trained weights w_k into the point
`avg` that its algorithm's server step moves towards (FedAvg: w <- w + server_lr (avg - w)). A new rule is one
function with MERGE_RULES' signature and one line in MERGE_RULES; `merge` takes its values from there.

- mean: FedAvg's size-weighted average, avg = sum_k n_k/n w_k. The round engine streams it
  (helpers.federated.rounds.RoundSum adds each client as it comes: memory does not grow with m).
- ties: TIES-merging (Yadav et al., NeurIPS 2023) of the round's updates tau_k = w_k - w: trim, elect, disjoint
  mean. The engine keeps the round's trained weights for it: m x trainable entries in fp32 beside FedAvg's state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# (global weights w, each client's trained weights w_k, its share n_k/n, merge_density) -> avg, shaped like w
MergeRule = Callable[[list[Tensor], list[list[Tensor]], list[float], float], list[Tensor]]
STREAMED = "mean"  # the rule RoundSum computes on the fly (the same operations as weighted_mean)
DEFAULT_MERGE_DENSITY = 0.2  # the authors' `topk20` (github.com/prateeky2806/ties-merging, README)
# merge_density's tuning grid, chosen on validation like every remedy's parameter (docs/remedies.md)
MERGE_TUNING = ("merge_density", (0.1, 0.2, 0.5))


@torch.no_grad()
def weighted_mean(
    start: list[Tensor], weights: list[list[Tensor]], shares: list[float], density: float
) -> list[Tensor]:
    """FedAvg: avg = sum_k share_k w_k, added in client order as RoundSum streams it (`density` does not apply)."""
    avg = [torch.zeros_like(w) for w in start]
    for w_k, share in zip(weights, shares, strict=True):
        torch._foreach_add_(avg, w_k, alpha=share)
    return avg


@torch.no_grad()
def trim_threshold(update: list[Tensor], density: float) -> Tensor:
    """The magnitude a client's update keeps from (|tau| >= it): its k-th largest over all its tensors together,
    k = max(1, round(density x its moved entries)); entries a mask froze did not move and never count. Ties at the
    threshold are all kept, as in the authors' code (kthvalue, then >=)."""
    magnitudes = torch.cat([t.abs().flatten() for t in update])
    moved = magnitudes[magnitudes > 0]
    if moved.numel() == 0:  # nothing moved: nothing to keep
        return torch.tensor(torch.inf, device=magnitudes.device)
    k = max(1, round(density * moved.numel()))
    return torch.kthvalue(moved, moved.numel() - k + 1).values


@torch.no_grad()
def ties_merge(start: list[Tensor], weights: list[list[Tensor]], shares: list[float], density: float) -> list[Tensor]:
    """TIES-merging of tau_k = w_k - w, as the point avg = w + merged update: (1) trim each tau_k to its entries at or
    above trim_threshold; (2) elect each entry's sign, the sign of the sum of the trimmed updates; (3) disjoint mean:
    the share-weighted mean of w_k over the clients whose trimmed entry is nonzero with the elected sign (equal shares:
    the paper's plain mean); an entry none of them keeps stays at w (the paper resolves an exactly-zero sum to the
    majority sign; here it moves nothing). Written as weights of the w_k, so that one client gives w_k exactly."""
    thresholds = torch.stack([trim_threshold(torch._foreach_sub(w_k, start), density) for w_k in weights])
    shares_t = torch.tensor(shares, dtype=start[0].dtype, device=start[0].device)
    avg = []
    for i, w in enumerate(start):  # one tensor at a time: the m x tensor temporaries stay small
        trained = torch.stack([w_k[i] for w_k in weights])
        tau = trained - w
        shape = (-1,) + (1,) * w.ndim
        kept = (tau.abs() >= thresholds.view(shape)) & (tau != 0)
        elected = torch.where(kept, tau, 0).sum(0).sign()
        chosen = kept & (tau.sign() == elected)
        share = torch.where(chosen, shares_t.view(shape), 0)
        total = share.sum(0)
        ratio = share / torch.where(total > 0, total, 1)  # one client: share / share == 1 exactly
        avg.append(torch.where(total > 0, (ratio * trained).sum(0), w))
    return avg


MERGE_RULES: dict[str, MergeRule] = {"mean": weighted_mean, "ties": ties_merge}
