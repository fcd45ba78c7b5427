"""Test-only fault injection into a Flower node's train replies, kept out of the production code: a ClientApp mod
for Flower's simulation (nodes in Ray workers: this module is pickled by value) and a tamper for the in-process grid
of test_node_faults. `faults` maps (1-based round, client) to a kind of FAULT_KINDS."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Error, Message, MessageType
from flwr.common.constant import ErrorCode
from torch import Tensor

FAULT_KINDS = ("raise", "nan", "shape", "dtype", "extra", "missing")
FAULT_REASON = "RuntimeError: fault injected (tests only)"


def corrupt(weights: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """`weights` damaged as fault `kind` says: what a faulty or hostile node might send."""
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


def injected(message: Message, answer: Callable[[], Message], faults: dict[tuple[int, int], str]) -> Message:
    """The reply to `message` with its fault: an error reply instead of training ("raise"), or the node's own reply
    (`answer()`) with its weights corrupted."""
    task = message.content["task"] if "task" in message.content else None
    if message.metadata.message_type != MessageType.TRAIN or task is None:
        return answer()
    kind = faults.get((int(task["round"]) + 1, int(task["client"])))
    if kind is None:
        return answer()
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault kind {kind!r} is invalid: must be one of {', '.join(FAULT_KINDS)}")
    if kind == "raise":
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=FAULT_REASON), reply_to=message)
    reply = answer()
    if not reply.has_error():
        reply.content["weights"] = ArrayRecord(corrupt(reply.content["weights"].to_torch_state_dict(), kind))
    return reply


def fault_mod(faults: dict[tuple[int, int], str]) -> Callable:
    """A Flower ClientApp mod that injects `faults` (run_flower(..., client_mods=[fault_mod(...)]))."""
    return lambda message, context, call_next: injected(message, lambda: call_next(message, context), faults)


def fault_tamper(faults: dict[tuple[int, int], str]) -> Callable:
    """The same faults as a tamper of test_node_faults' InProcessGrid."""
    return lambda message, reply: [injected(message, lambda: reply, faults)]


def _pickle_by_value() -> None:
    """Ray workers do not have tests/ on their path: ship this module's functions by value."""
    try:
        from ray import cloudpickle
    except ImportError:  # no Ray: only the in-process grid runs
        return
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_pickle_by_value()
