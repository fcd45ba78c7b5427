"""What a Flower server accepts from its nodes: every reply is checked before anything of it is averaged in.

Pure functions (no Flower import), so the checks are unit-tested without Flower processes: `sort_replies` pairs
replies with the messages sent (unasked, duplicate and wrong-node replies are problems), `weights_problem` checks
a client's trained weights against the global ones, the other checks scores, ridge statistics, GradScaler states and
update norms.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def sort_replies(
    asked: Mapping[str, int], replies: Iterable[tuple[str, int, object]], relay: int | None = None
) -> tuple[dict[str, object], dict[str, str], list[str]]:
    """Pair replies (reply_to message id, source node, reply) with the messages sent (message id -> node).

    Returns (message id -> its one reply, message id -> problem, problems of replies to no message sent). A
    second reply to a message, or one from another node than the one asked (`relay`, the SuperLink, may answer
    for a node it lost), makes that message a problem: neither reply is trusted."""
    got: dict[str, object] = {}
    problems: dict[str, str] = {}
    unasked: list[str] = []
    for message, node, reply in replies:
        if message not in asked:
            unasked.append(f"a reply from node {node} to a message that was not sent (id {message!r})")
        elif node != asked[message] and node != relay:
            problems[message] = f"a reply from node {node}, not from the node asked ({asked[message]})"
        elif message in got:
            problems[message] = "a second reply to the same message"
        else:
            got[message] = reply
    return {m: r for m, r in got.items() if m not in problems}, problems, unasked


def weights_problem(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> str | None:
    """Why `got` (a client's trained weights) cannot be averaged into `expected` (the global ones), or None:
    a missing or extra name, another shape or dtype, a non-finite value."""
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        return f"invalid weights: missing {missing}, unexpected {extra}"
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            return f"invalid weights: {name} has shape {tuple(have.shape)}, expected {tuple(want.shape)}"
        if have.dtype != want.dtype:
            return f"invalid weights: {name} has dtype {have.dtype}, expected {want.dtype}"
        if not bool(torch.isfinite(have).all()):
            return f"invalid weights: {name} has non-finite values"
    return None


def scores_problem(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> str | None:
    """Why sensitivity scores cannot be summed in: `expected`'s names, shapes and dtypes (weights_problem), finite and
    never negative (sums of squared gradients)."""
    problem = weights_problem(expected, got)
    if problem is not None:
        return problem.replace("invalid weights: ", "")
    negative = [n for n, s in got.items() if bool((s < 0).any())]
    return f"{negative[0]} has negative scores" if negative else None


def ridge_problem(xtx: Tensor, xty: Tensor, dim: int, classes: int, samples: int) -> str | None:
    """Why (X^T X, X^T Y) of `samples` rows (`dim` - 1 features and a bias column) cannot be summed in: shapes,
    float64, finite, X^T X symmetric with a non-negative diagonal; the bias column counts the rows, one label each."""
    if xtx.shape != (dim, dim) or xty.shape != (dim, classes):
        return (
            f"statistics of shapes {tuple(xtx.shape)}, {tuple(xty.shape)}, expected ({dim}, {dim}), ({dim}, {classes})"
        )
    if xtx.dtype != torch.float64 or xty.dtype != torch.float64:
        return f"statistics of dtypes {xtx.dtype}, {xty.dtype}, expected torch.float64"
    if not bool(torch.isfinite(xtx).all() and torch.isfinite(xty).all()):
        return "non-finite statistics"
    scale = float(xtx.abs().max()) or 1.0
    if float((xtx - xtx.T).abs().max()) > 1e-9 * scale or bool((xtx.diagonal() < 0).any()):
        return "X^T X is not symmetric with a non-negative diagonal"
    counts = xty[-1]  # the bias column against the one-hot labels: images per class
    if float(xtx[-1, -1]) != samples or bool((counts < 0).any() or (counts != counts.round()).any()):
        return f"the bias column counts {float(xtx[-1, -1]):g} rows, expected {samples} (its shard)"
    if float(counts.sum()) != samples:
        return f"{float(counts.sum()):g} one-hot labels for {samples} rows"
    return None


def scaler_problem(start: Mapping, got: Mapping | None, steps: int) -> str | None:
    """Why a client's GradScaler state cannot follow `start` after at most `steps` steps: another configuration, a
    growth tracker out of range, or a scale no run of `steps` steps reaches (one backoff or growth per step at most)."""
    if got is None or set(got) != set(start):
        return f"GradScaler state {got} has other keys than {sorted(start)}"
    fixed = ("growth_factor", "backoff_factor", "growth_interval")
    if any(float(got[k]) != float(start[k]) for k in fixed):
        return f"GradScaler state {got} changes {', '.join(fixed)}"
    interval, scale = int(start["growth_interval"]), float(got["scale"])
    if not 0 <= int(got["_growth_tracker"]) < interval or float(got["_growth_tracker"]) != int(got["_growth_tracker"]):
        return f"GradScaler growth tracker {got['_growth_tracker']} outside [0, {interval})"
    low = float(start["scale"]) * float(start["backoff_factor"]) ** steps
    high = float(start["scale"]) * float(start["growth_factor"]) ** (
        (int(start["_growth_tracker"]) + steps) // interval
    )
    if not (math.isfinite(scale) and low <= scale <= high):
        return (
            f"GradScaler scale {scale:g} outside [{low:g}, {high:g}], what {steps} steps from {start['scale']:g} allow"
        )
    return None


def update_outliers(norms: Mapping[int, float], bound: float) -> dict[int, str]:
    """Clients whose update norm exceeds `bound` times the median of the round's other clients' (leaving the client
    out: a huge update cannot lift its own yardstick): client -> why. None below two clients, or with bound 0."""
    if bound <= 0 or len(norms) < 2:
        return {}
    out = {}
    for k, norm in norms.items():
        others = statistics.median(v for j, v in norms.items() if j != k)
        if others > 0 and norm > bound * others:
            out[k] = (f"invalid reply: update norm {norm:.4g} is over update_bound={bound:g} times the median of the "
                      f"round's other clients ({others:.4g})")  # fmt: skip
    return out
