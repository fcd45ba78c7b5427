"""What a Flower server accepts from its nodes: every reply is checked before anything of it is averaged in.

Pure functions (no Flower import), so the checks are unit-tested without Flower processes: `sort_replies` pairs
replies with the messages sent (unasked, duplicate and wrong-node replies are problems), `weights_problem` checks
a client's trained weights against the global ones. Also the tests' fault injection (FLME_FLOWER_FAULT).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

# Test-only fault injection: "ROUND:CLIENT[:KIND]" items, comma-separated (1-based round), KIND one of FAULT_KINDS
# (raise if omitted). An environment variable: Flower's simulation runs clients in Ray worker processes.
FAULT_ENV = "FLME_FLOWER_FAULT"
FAULT_KINDS = ("raise", "nan", "shape", "dtype", "extra", "missing")


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


def injected_fault(rnd: int, client: int) -> str | None:
    """The fault FLME_FLOWER_FAULT injects into client `client`'s reply in round `rnd` (0-based), if any."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        r, k, *kind = item.split(":")
        if (int(r), int(k)) == (rnd + 1, client):
            if (kind := kind[0] if kind else "raise") not in FAULT_KINDS:
                raise ValueError(f"{FAULT_ENV}={item!r} is invalid: the kind must be one of {', '.join(FAULT_KINDS)}")
            return kind
    return None


def corrupt(weights: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """`weights` damaged as fault `kind` says (tests only): what a faulty or hostile node might send."""
    name = next(iter(weights))
    damaged = dict(weights)
    if kind == "nan":
        damaged[name] = weights[name].clone().fill_(float("nan"))
    elif kind == "shape":
        damaged[name] = weights[name].flatten()[:-1].clone()
    elif kind == "dtype":
        damaged[name] = weights[name].double()
    elif kind == "extra":
        damaged["intruder"] = torch.zeros(1)
    elif kind == "missing":
        del damaged[name]
    return damaged
