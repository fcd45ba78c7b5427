"""A real Flower round's seconds, part by part (issue 37), in `python -m helpers.bench --flower`: a secure federation on
this machine (helpers.flower.local: SuperLink, 2 SuperNodes, TLS, registered nodes) runs the same smoke FedAvg run as
before issue 37 and as now, one after the other, against the sequential engine. Each round, from the server's push of
its training messages to its next push, is split along the node that answered last, from our timestamps
(FLME_FLOWER_TIMING, helpers.flower.timing) and the SuperNodes' log lines (stamped as they arrive)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from helpers.flower.cache import CACHE_ENV
from helpers.flower.federation import POLL_ENV, SUPEREXEC_POLL
from helpers.flower.timing import TIMING_ENV

# The federation as tests/test_flower_federation.py ran it before issue 37 (its SuperLink kept state and messages in
# an SQLite file, --database), as it was in memory (the printed script's SuperLink), and as now. Before: the server's
# pulls 3 s apart (send_and_receive's loop, flwr/superlink/grid/http_grid.py:403-412), the SuperExecs' default poll
# (1 s), the data rebuilt at every message.
BEFORE = {"link": {POLL_ENV: "3", SUPEREXEC_POLL[0]: None}, "nodes": {SUPEREXEC_POLL[0]: None, CACHE_ENV: "0"}}
MODES = {
    "before": {**BEFORE, "database": True},
    "before_in_memory": {**BEFORE, "database": False},
    "after": {"link": {}, "nodes": {}, "database": False},
}
# (part, whose, what): a round's chain, each part ending where the next begins (flwr 1.41 file:line where Flower's)
SUPERNODE = "flwr/supernode/start_client_internal.py"
# fmt: off
PARTS = [
    ("push", "ours via Flower", "the server pushes the round's messages (Grid.push_messages: serialise, upload)"),
    ("node_idle", "Flower", f"the message waits for its SuperNode: 3 s of sleep after an empty pull ({SUPERNODE}:263)"),
    ("superexec_wait", "Flower, poll set by us", "until the SuperExec starts the message's flwr-clientapp process: "
     "it looks for tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s, default 1 (flwr/supercore/superexec/"
     "run_superexec.py:280)"),
    ("clientapp_start", "Flower", "the ClientApp process starts Python, imports flwr, pulls its message (whose objects "
     f"the SuperNode receives meanwhile, {SUPERNODE}:326-424) and installs the FAB "
     "(flwr/supernode/runtime/run_clientapp.py:82-187)"),
    ("app_imports", "ours", "helpers.flower.app, the ClientApp's module (torch, pandas, flwr's records)"),
    ("train_imports", "ours", "what training needs: helpers.federated.rounds (timm, torchvision)"),
    ("setup", "ours", "the client's data (disk cache, or rebuilt), model, weights, mask"),
    ("compute", "ours", "client_update: the J local steps"),
    ("reply", "ours", "the reply's records"),
    ("reply_to_supernode", "Flower", "the ClientApp pushes its reply and Context, exits; the SuperNode looks for "
     f"replies every 0.5 s ({SUPERNODE}:470)"),
    ("node_send", "Flower", f"the SuperNode pushes the reply to the SuperLink ({SUPERNODE}:486-532)"),
    ("server_wait", "ours", "until the server's next pull (FLME_FLOWER_POLL_S; send_and_receive: 3 s)"),
    ("server_pull", "ours via Flower", "the server pulls the replies (Grid.pull_messages: download, deserialise)"),
    ("server_step", "ours", "aggregation, evaluation, checkpoint, metrics, until the next round's push"),
]
# fmt: on
NODE_LINES = {"Receiving:": "recv", "Sending:": "sending", "Sent successfully": "sent"}


def node_events(log: str) -> list[tuple[float, str, str]]:
    """(time, kind, line) of a stamped SuperNode log's lines that bound a message's parts (NODE_LINES)."""
    from helpers.flower.server import ANSI  # lazy: needs flwr, as the federation does

    events = []
    for line in ANSI.sub("", log).splitlines():
        stamp, _, text = line.partition(" ")
        kind = next((kind for words, kind in NODE_LINES.items() if words in text), None)
        if kind is not None:
            events.append((float(stamp), kind, text))
    return events


def first(events: list[tuple[float, str, str]], kind: str, after: float = 0.0, contains: str = "") -> float:
    """The time of the first event of `kind` at or after `after` whose line contains `contains`."""
    found = [t for t, k, text in events if k == kind and t >= after and contains in text]
    if not found:
        raise ValueError(f"no {kind!r} line{f' for {contains}' if contains else ''} after {after:.3f} in the log")
    return found[0]


def message_bounds(message_id: str, timing: list[dict], nodes: list[list]) -> list[float]:
    """When the message reached its SuperNode and each later step of its node happened, up to its reply's upload
    (the ends of PARTS[1:-2]): from the node's stamped log and its ClientApp process's timing marks."""
    (events,) = [e for e in nodes if any(k == "recv" and message_id in text for _, k, text in e)]
    handler = next(e for e in timing if e["event"] == "handler" and e["id"] == message_id)
    own = {e["event"]: e["t"] for e in timing if e["pid"] == handler["pid"] and e["t"] >= handler["t"]}
    sending = first(events, "sending", own["replied"])
    bounds = [first(events, "recv", contains=message_id), handler["started"], handler["imported"], handler["t"]]
    bounds += [own.get("imports", handler["t"]), own["inputs"], own["computed"], own["replied"]]
    return [*bounds, sending, first(events, "sent", sending)]


def round_parts(timing: list[dict], logs: list[str]) -> list[dict[str, float]]:
    """Per training round followed by another: its seconds, and those of each part (PARTS) along the node whose
    reply came last (the parts add up to the round; overlapping steps count once)."""
    pushes = [e for e in timing if e["event"] == "push" and e["label"].startswith("train")]
    pushed = {e["label"]: e for e in timing if e["event"] == "pushed"}
    pulled = {i: (e["asked"], e["t"]) for e in timing if e["event"] == "pulled" for i in e["ids"]}
    nodes = [node_events(log) for log in logs]
    rounds = []
    for push, following in zip(pushes, pushes[1:], strict=False):
        last = max(pushed[push["label"]]["ids"], key=lambda i: pulled[i][1])
        bounds = [push["t"], pushed[push["label"]]["t"], *message_bounds(last, timing, nodes)]
        bounds += [*pulled[last], following["t"]]
        bounds = list(itertools.accumulate(bounds, max))  # steps that overlap (a node pulls while the server still
        # pushes, the server pulls while the node logs) count in the earlier part: no part is negative
        parts = {name: b - a for (name, *_), a, b in zip(PARTS, bounds[:-1], bounds[1:], strict=True)}
        rounds.append({"round_s": following["t"] - push["t"], "load": following.get("load", math.nan), **parts})
    return rounds


def run_on_federation(config: dict, mode: str, root: Path) -> list[dict[str, float]]:
    """`config` on a fresh local federation of num_clients SuperNodes set up as `mode` (MODES): its rounds' parts."""
    from helpers.flower.local import LocalFederation  # lazy: Flower is optional

    timing, k = root / "timing.jsonl", config["num_clients"]
    env = {TIMING_ENV: str(timing), "FLME_NODE_STATE": str(root / "node-state"), **MODES[mode]["nodes"]}
    federation = LocalFederation(root, k, env=env)
    try:
        federation.start_all(k, link_env=MODES[mode]["link"], database=MODES[mode]["database"])
        for node in range(k):
            federation.await_active(node, k)
        if federation.run(config, root / "runs").wait(timeout=1800) != 0:
            raise RuntimeError(f"flwr run failed ({mode}): {federation.log()[-3000:]}")
    finally:
        federation.close()
    events = [json.loads(line) for line in timing.read_text().splitlines()]
    return round_parts(events, [federation.log(f"node{node}") for node in range(k)])


def summary(rounds: list[dict[str, float]], sequential_s: float, mode: str) -> dict[str, float]:
    """Mean seconds of a round and of each part, the round's ratio to the sequential engine's, and the machine's
    mean load (1-minute average, other users included) at the end of the rounds."""
    mean = {name: statistics.fmean(r[name] for r in rounds) for name in rounds[0]}
    out = {f"federation_{mode}_load": mean.pop("load"), f"federation_{mode}_round_s": mean.pop("round_s")}
    out[f"federation_{mode}_ratio"] = out[f"federation_{mode}_round_s"] / sequential_s
    return out | {f"federation_{mode}_{name}_s": value for name, value in mean.items()}


def bench_federation(config: dict, repeats: int = 1) -> dict:
    """Seconds per round of `config` (FedAvg, >= 3 rounds) on a real local federation in each mode (MODES), each
    part's mean seconds, and all against the sequential engine (one torch thread everywhere, as on the nodes).
    `repeats` > 1 runs the modes again in reverse order, and so on (a load that drifts favours no mode)."""
    from helpers.federated.rounds import run_fedavg  # lazy: Flower is optional
    from helpers.ops.bench_flower import seconds_per_round  # lazy: Flower is optional

    if config["rounds"] < 3:
        raise ValueError(f"rounds={config['rounds']} is invalid for bench_federation: must be >= 3")
    threads = torch.get_num_threads()
    rounds: dict[str, list] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="flme-federation-") as tmp:
        torch.set_num_threads(1)
        try:
            sequential = seconds_per_round(run_fedavg(config, run_root=Path(tmp) / "sequential", progress=False))
        finally:
            torch.set_num_threads(threads)
        for repeat in range(repeats):
            for mode in list(MODES)[:: 1 if repeat % 2 == 0 else -1]:
                rounds[mode] += run_on_federation(config, mode, Path(tmp) / f"{mode}-{repeat}")
    out = {"federation_sequential_round_s": sequential}
    for mode, measured in rounds.items():
        out |= summary(measured, sequential, mode)
    out["federation_speedup"] = out["federation_before_round_s"] / out["federation_after_round_s"]
    out["federation_speedup_in_memory"] = out["federation_before_in_memory_round_s"] / out["federation_after_round_s"]
    return out


def breakdown_table(out: dict) -> str:
    """The parts as a markdown table: seconds in each mode, whose, what; the round against the sequential engine."""
    lines = [f"| part | {' | '.join(f'{m} (s)' for m in MODES)} | whose | what |", "|---" * (len(MODES) + 3) + "|"]
    for name, whose, what in [("round", "", "from the server's push to its next push"), *PARTS]:
        seconds = " | ".join(f"{out[f'federation_{m}_{name}_s']:.2f}" for m in MODES)
        lines.append(f"| {name} | {seconds} | {whose} | {what} |")
    sequential = out["federation_sequential_round_s"]
    ratios = " | ".join(f"{out[f'federation_{m}_ratio']:.0f}x" for m in MODES)
    lines.append(f"| round / sequential engine's ({sequential:.2f} s) | {ratios} | | |")
    loads = " | ".join(f"{out[f'federation_{m}_load']:.1f}" for m in MODES)
    return "\n".join([*lines, f"| machine load (1-minute average, 2 cores) | {loads} | | |"])
