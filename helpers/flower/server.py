"""The server's half of a Flower federation: what it sends the nodes and how it checks their replies (NodeEngine);
the nodes' half is helpers.flower.node.

NodeEngine is fedavg_round's train_clients on the nodes and a helpers.federated.remote.RemoteClients: shard sizes, each
client's sensitivity scores and its step-0 ridge statistics are asked of the nodes, so a server started with
FLME_NO_TRAIN_DATA=1 runs the whole study. Each operation is one message type (the node's query handler reads
`task.op`); the node runs the project's own function on its shard: client_update, score_pool, ridge_statistics.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from helpers.algorithms.fedavg import FedAvg, aligned_masks
from helpers.algorithms.scaffold import unpack_entries
from helpers.config.experiments import setting
from helpers.data.datasets import expected_shard_sizes
from helpers.federated.evaluation import eval_part_sizes
from helpers.federated.stragglers import local_steps
from helpers.flower.federation import poll_interval
from helpers.flower.replies import (
    ridge_problem,
    scaler_problem,
    scores_problem,
    sort_replies,
    update_outliers,
    weights_problem,
)
from helpers.flower.timing import mark
from helpers.sparse.masks import Masks
from helpers.training.loop import NonFiniteLossError
from helpers.training.runs import run_id

if TYPE_CHECKING:
    from helpers.federated.rounds import ClientResult  # lazy: heavy (timm); nodes import this

MISSING = "Flower is not installed: pip install -r requirements-flower.txt"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported; this machine may be offline
try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    from flwr.serverapp import Grid
except ImportError as exc:  # Flower is optional (requirements-flower.txt): say what to install
    raise ImportError(f"{MISSING} ({exc})") from None

# The SuperLink's error replies for a node it lost (no heartbeat) or a message that expired: no reply from the node
UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- transport


def send_and_pull(grid: Grid, messages: list[Message], timeout: float | None = None, label: str = "") -> list[Message]:
    """Grid.send_and_receive's loop (push, then pull until every message has a reply or `timeout` s have passed)
    through the Grid's public push_messages/pull_messages, with poll_interval() between pulls instead of its 3 s
    (flwr/superlink/grid/http_grid.py:412). Replies come back as pulled: pairing and checks are the caller's."""
    poll = poll_interval()
    mark("push", label=label, nodes=[m.metadata.dst_node_id for m in messages])
    ids = {i for i in grid.push_messages(messages) if i}  # a message the SuperLink refused has no id: no reply comes
    mark("pushed", label=label, ids=sorted(ids))
    end, replies = time.time() + (timeout or 0.0), []
    while ids and (timeout is None or time.time() < end):
        asked = time.time()
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {r.metadata.reply_to_message_id for r in got}
        if got:
            mark("pulled", label=label, ids=[r.metadata.reply_to_message_id for r in got], asked=asked)
        if ids:
            time.sleep(poll)
    return replies


def exchange(grid: Grid, messages: list[Message], timeout: float | None = None) -> dict[int, Message]:
    """Send, wait for every reply (at most `timeout` s); node id -> reply (replies come back in any order)."""
    return {r.metadata.src_node_id: r for r in send_and_pull(grid, messages, timeout, "hello")}


def reply_content(reply: Message | None, what: str) -> RecordDict:
    """A reply's content, or its error raised as "<what>: reason" (e.g. "round 2, client 7: ..."); a client's
    NonFiniteLossError stays one (client_update named the round and client)."""
    problem = reply_failure(reply)
    if problem is not None:
        raise_failure(what, problem)
    return reply.content


def reply_failure(reply: Message | None) -> str | None:
    """Why a reply has no content (no reply, the node's error, the SuperLink's for a lost node), or None."""
    if reply is None:
        return "no reply from its Flower node"
    if not reply.has_error():
        return None
    reason = ANSI.sub("", reply.error.reason)
    if getattr(reply.error, "code", None) in UNAVAILABLE:
        return f"no reply from its Flower node ({reason})"
    return reason


def raise_failure(what: str, problem: str) -> None:
    """Stop the run: "<what>: <problem>"; a client's NonFiniteLossError stays one (it names round and client)."""
    if problem.startswith(f"{NonFiniteLossError.__name__}: "):
        raise NonFiniteLossError(problem.split(": ", 1)[1])
    raise RuntimeError(f"{what}: {problem}")


def exchange_checked(
    grid: Grid, messages: dict[int, Message], timeout: float | None = None, label: str = ""
) -> tuple[dict[int, RecordDict | str], list[str]]:
    """Send one message per client, wait for the replies (at most `timeout` s) and pair them with the messages sent
    (flower.replies): client -> its reply's content, or why there is none; and the replies to no message sent."""
    replies = send_and_pull(grid, list(messages.values()), timeout, label)
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages.values()}
    keyed = ((r.metadata.reply_to_message_id, r.metadata.src_node_id, r) for r in replies)
    got, problems, unasked = sort_replies(asked, keyed, relay=SUPERLINK_NODE_ID)
    out: dict[int, RecordDict | str] = {}
    for k, m in messages.items():
        reply = got.get(m.metadata.message_id)
        problem = problems.get(m.metadata.message_id) or reply_failure(reply)
        if reply is None and timeout is not None and m.metadata.message_id not in problems:
            problem = f"no reply from its Flower node within node_timeout_s={timeout:g}"
        out[k] = problem if problem is not None else reply.content
    return out, unasked


def model_record(model: nn.Module) -> ArrayRecord:
    """Every parameter of `model` as it is now (calibration damps the backbone between rounds)."""
    return ArrayRecord({n: p.detach() for n, p in model.named_parameters()})


# ----------------------------------------------------------------------------- server side


class NodeEngine:
    """fedavg_round's train_clients on Flower nodes (`nodes`: client id -> node id), and the RemoteClients whose
    operations run there. Per run (a sparse run and its step-0 head run), the frozen weights and each node's mask
    are sent once, at its first round."""

    def __init__(self, grid: Grid, nodes: dict[int, int]):
        self.grid, self.nodes, self.ready = grid, nodes, set()

    def ask(self, op: str, config: dict, clients: list[int], content: Mapping | Callable | None = None, **task) -> list:
        """Operation `op` of run `config` on each client's node, with `content` (or content(k)): their replies'
        contents, in client order; any failure stops the run, naming the first failed client."""
        replies = self.gather(op, config, clients, content, **task)
        for k in clients:
            if isinstance(replies[k], str):
                raise_failure(f"{op} on client {k}", replies[k])
        return [replies[k] for k in clients]

    def gather(
        self, op: str, config: dict, clients: list[int], content: Mapping | Callable | None = None, **task
    ) -> dict[int, RecordDict | str]:
        """Operation `op` on each client's node: client -> its reply's content, or why there is none. All messages
        go at once: the nodes work in parallel. A reply to no message sent stops the run."""
        messages = {}
        for k in clients:
            record = ConfigRecord({"op": op, "run": run_id(config), "client": k, **task})
            body = RecordDict({"task": record, **((content(k) if callable(content) else content) or {})})
            kind = MessageType.TRAIN if op == "train" else MessageType.QUERY
            messages[k] = Message(body, dst_node_id=self.nodes[k], message_type=kind)
        label = f"{op} {task.get('round', task.get('call', ''))}".strip()  # e.g. "train 3" in the timing log
        replies, unasked = exchange_checked(self.grid, messages, setting(config, "node_timeout_s") or None, label)
        if unasked:  # no client to drop: such a reply is never used, and something is wrong in the federation
            raise RuntimeError(f"{op}: {unasked[0]}")
        return replies

    # Steps that need every client: a reply that cannot be used stops the run, naming the client. What the server
    # can know without the data it computes and checks the replies against: n_k, probe and evaluation part sizes.
    def shard_sizes(self, config: dict) -> list[int]:
        clients, expected = sorted(self.nodes), expected_shard_sizes(config)
        for k, c in zip(clients, self.ask("size", config, clients), strict=True):
            n = int(c["result"]["size"])
            usable(f"size on client {k}", None if n == expected[k] else f"shard size {n}, expected {expected[k]}")
        return expected

    def client_scores(
        self, model: nn.Module, config: dict, call: int, clients: list[int]
    ) -> Iterator[tuple[dict[str, Tensor], int]]:
        from helpers.sparse.sensitivity import backbone_parameters  # lazy: pulls timm (nodes import this module)

        device, sizes = next(model.parameters()).device, expected_shard_sizes(config)
        shapes = {
            n: torch.empty(p.shape, dtype=torch.float32, device="meta") for n, p in backbone_parameters(model).items()
        }
        for k, c in zip(clients, self.ask("score", config, clients, {"model": model_record(model)}, call=call)):
            scores, samples = c["scores"].to_torch_state_dict(), int(c["result"]["samples"])
            want = min(config["calibration_samples"], sizes[k])  # calibration_batches: a subset of its shard
            wrong = None if samples == want else f"{samples} samples scored, expected {want}"
            usable(f"score on client {k}", scores_problem(shapes, scores) or wrong)
            yield {n: s.to(device) for n, s in scores.items()}, samples

    def ridge_statistics(self, model: nn.Module, config: dict) -> Iterator[tuple[Tensor, Tensor]]:
        device, clients, sizes = next(model.parameters()).device, sorted(self.nodes), expected_shard_sizes(config)
        dim, classes = model.head.in_features + 1, model.head.out_features  # features and a bias column
        for k, c in zip(clients, self.ask("ridge", config, clients, {"model": model_record(model)})):
            stats = c["stats"].to_torch_state_dict()
            missing = sorted({"xtx", "xty"} - stats.keys())
            usable(f"ridge on client {k}", f"missing {missing}" if missing else None)
            usable(f"ridge on client {k}", ridge_problem(stats["xtx"], stats["xty"], dim, classes, sizes[k]))
            yield stats["xtx"].to(device), stats["xty"].to(device)

    def client_evaluations(self, model: nn.Module, config: dict, split: str) -> Iterator[tuple[float, int, int]]:
        """Every client's (summed loss, correct, samples) on its part of `split` (helpers.federated.evaluation)."""
        clients, parts = sorted(self.nodes), eval_part_sizes(config, split)
        for k, c in zip(clients, self.ask("evaluate", config, clients, {"model": model_record(model)}, split=split)):
            loss, correct, n = float(c["result"]["loss"]), int(c["result"]["correct"]), int(c["result"]["samples"])
            ok = 0 <= loss < math.inf and 0 <= correct <= n == parts[k]
            usable(
                f"evaluate on client {k}", None if ok else f"loss {loss}, {correct} correct of {n} (part of {parts[k]})"
            )
            yield loss, correct, n

    def client_interference(self, model: nn.Module, config: dict, clients: list[int], sizes: list[int]) -> list[float]:
        """Each client's share of its probe (`sizes`: the images it must compare, known here from n_k) on which its
        trained model (kept on its node) and `model` disagree."""
        shares = []
        replies = self.ask("interference", config, clients, {"model": model_record(model)})
        for k, size, c in zip(clients, sizes, replies, strict=True):
            disagree, n = int(c["result"]["disagree"]), int(c["result"]["samples"])
            ok = n == size and 0 <= disagree <= n
            usable(f"interference on client {k}", None if ok else f"{disagree} of {n} probe images (expected {size})")
            shares.append(disagree / n if n else 0.0)
        return shares

    def setup(self, model: nn.Module, masks: Masks | None, config: dict) -> None:
        """Once per run and node: the frozen parameters (the step-0 head of sparse runs) and the client's mask."""
        frozen = ArrayRecord({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
        shared = ArrayRecord(dict(masks.shared)) if masks is not None and not masks.local else None

        def content(k: int) -> dict:
            if masks is None:
                return {"frozen": frozen}  # else the shared mask's record, or the client's own
            return {"frozen": frozen, "masks": shared if shared is not None else ArrayRecord(dict(masks.of_client(k)))}

        self.ask("setup", config, sorted(self.nodes), content)
        self.ready.add(run_id(config))

    # fedavg_round's train_in_turn signature; data and shards live on the nodes
    # (the algorithm's server step runs in fedavg_round on the server, its client side on the nodes: node_train)
    def __call__(
        self, model, data, shards, rnd, clients, config, *, masks, start, scaler, algorithm
    ) -> Iterator[ClientResult]:
        from helpers.federated.rounds import ClientResult  # lazy: heavy (timm); nodes import this

        if run_id(config) not in self.ready:
            self.setup(model, masks, config)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        content = {"weights": ArrayRecord(dict(zip(names, start, strict=True)))}
        if scaler is not None:  # each client starts from the round's GradScaler state
            content["scaler"] = ConfigRecord(scaler.state_dict())
        down = algorithm_content(algorithm, start, names, masks)  # per client: server state its side needs
        replies = self.gather("train", config, clients, lambda k: {**content, **down(k)}, round=rnd)
        expected = dict(zip(names, start, strict=True))
        scaler_start = scaler.state_dict() if scaler is not None else None
        results = {
            k: trained_result(r, expected, scaler_start, local_steps(config, rnd, k)) for k, r in replies.items()
        }
        for k, r in results.items():  # what it sends beyond its weights (SCAFFOLD's Delta c_i), checked alike
            if not isinstance(r, str):
                own = aligned_masks(names, masks.of_client(k) if masks is not None else None)
                extra = client_extra(replies[k], names, own, start, required=algorithm.upload_factor > 1)
                weights = [w if m is None else torch.where(m, w, w0) for w, m, w0 in zip(r[0], own, start, strict=True)]
                results[k] = extra if isinstance(extra, str) else (weights, *r[1:], extra)  # frozen entries: start's
        norms = {k: update_norm(r[0], start) for k, r in results.items() if not isinstance(r, str)}
        results.update(update_outliers(norms, setting(config, "update_bound")))  # a huge finite update: failed
        failed = {k: r for k, r in results.items() if isinstance(r, str)}  # every check done before any sum
        kept = [k for k in clients if k not in failed]
        if failed and (setting(config, "node_failure") == "stop" or not kept):
            k = min(failed)
            raise_failure(f"round {rnd + 1}, client {k}" + ("" if kept else " (every client failed)"), failed[k])
        for k, problem in failed.items():  # node_failure="drop": left out of the round, recorded in its row
            logging.getLogger(__name__).warning("round %d, client %d dropped: %s", rnd + 1, k, problem)
        total = sum(len(shards[k]) for k in kept)  # the clients that replied, their n_k renormalised
        for k in kept:
            weights, loss, state, extra = results[k]
            own = masks.of_client(k) if masks is not None else None
            share = len(shards[k]) / total if failed else None
            yield ClientResult(k, weights, loss, own, state, extra, share=share)

    def close(self, config: dict) -> None:
        """The run is done: every node drops what it kept for its next messages (helpers.flower.cache) or only for
        resuming it (SCAFFOLD's c_i, as Scaffold.close does with the sequential engine's files)."""
        try:
            self.ask("close", config, sorted(self.nodes))
        except RuntimeError as exc:  # the run is done all the same: say what is left behind
            warnings.warn(f"run {run_id(config)} is done, but a node kept its files: {exc}", stacklevel=2)


def algorithm_content(
    algorithm: FedAvg, start: list[Tensor], names: list[str], masks: Masks | None
) -> Callable[[int], dict]:
    """Client k -> the records of what its side needs of the algorithm's server state (FedAvg.to_node: SCAFFOLD's
    c at the client's trainable entries, and which versions of c_i the node keeps)."""

    def content(k: int) -> dict:
        sent = algorithm.to_node(start, aligned_masks(names, masks.of_client(k) if masks is not None else None))
        if sent is None:
            return {}
        tensors, numbers = sent
        return {"algorithm": ArrayRecord(dict(zip(names, tensors, strict=True))), "numbers": ConfigRecord(numbers)}

    return content


def client_extra(
    content: RecordDict, names: list[str], masks: list[Tensor | None], start: list[Tensor], *, required: bool
) -> list[Tensor] | None | str:
    """What a node sent beyond its weights (ClientSide.finish: SCAFFOLD's Delta c_i), back at full shape (zero where
    the client's mask `masks` freezes, as finish returned it), None, or why it cannot be used (like trained_result)."""
    if "extra" not in content:
        return "malformed reply: no control variate" if required else None
    try:
        packed = content["extra"].to_torch_state_dict()
        extra = unpack_entries([packed[n] for n in names], masks, start)
    except Exception as exc:  # a wrong name or entry count: a problem of this client, not of the server
        return f"malformed reply: {type(exc).__name__}: {exc}"
    if not all(torch.isfinite(e).all() for e in extra):
        return "invalid reply: non-finite control variate"
    return extra


def usable(what: str, problem: str | None) -> None:
    """Stop the run on a reply that cannot be used: "<what>: invalid reply: <problem>"."""
    if problem is not None:
        raise RuntimeError(f"{what}: invalid reply: {problem}")


def update_norm(weights: list[Tensor], start: list[Tensor]) -> float:
    """|w_k - w|: the size of a client's update, over its trainable entries."""
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w - w0) for w, w0 in zip(weights, start)]))
    )


def trained_result(
    content: RecordDict | str, expected: Mapping[str, Tensor], scaler_start: dict | None = None, steps: int = 0
) -> tuple | str:
    """A train reply as (weights in `expected`'s order and device, loss, GradScaler state), or why it cannot be
    averaged in (helpers.flower.replies.weights_problem, a missing or non-finite loss, a GradScaler state that `steps`
    steps from `scaler_start` cannot reach, a malformed reply)."""
    if isinstance(content, str):
        return content
    try:
        trained = content["weights"].to_torch_state_dict()
        loss = float(content["result"]["loss"])
        state = dict(content["scaler"]) if "scaler" in content else None
    except Exception as exc:  # whatever a faulty node sent: a problem of this client, not of the server
        return f"malformed reply: {type(exc).__name__}: {exc}"
    problem = weights_problem(expected, trained)
    if problem is None and not math.isfinite(loss):
        problem = f"invalid reply: non-finite loss {loss}"
    if problem is None and scaler_start is not None and (bad := scaler_problem(scaler_start, state, steps)):
        problem = f"invalid reply: {bad}"  # RoundSum keeps the lowest scale: a tiny one would silence every gradient
    if problem is not None:
        return problem
    return [trained[n].to(w.device) for n, w in expected.items()], loss, state
