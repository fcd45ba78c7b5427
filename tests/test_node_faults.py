"""Issue 23's evaluation on the nodes and node faults (issue 26's untrusted replies), without Ray: the Flower apps'
own server (helpers.flower.app.serve) drives nodes whose handlers run in this process (InProcessGrid), so replies can
be damaged, duplicated or invented. evaluation=clients gives the server's metrics and the server loads no data;
a failed client is dropped (its round equals a hand-computed average of the others) or stops the run by name.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid

import pytest
import torch

pytest.importorskip("flwr")

from faults import corrupt, fault_mod, fault_tamper  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from helpers.config.experiments import make_config  # noqa: E402
from helpers.core.torchfiles import load_torch
from helpers.data.datasets import load_data  # noqa: E402
from helpers.editing.sparse_runs import run_sparse_fedavg  # noqa: E402
from helpers.federated.clients import client_shards, client_update, sample_clients  # noqa: E402
from helpers.federated.rounds import run_fedavg
from helpers.flower import server as flower_ops
from helpers.flower.app import flower_config, run_flower, serve  # noqa: E402
from helpers.flower.federation import POLL_ENV, poll_interval  # noqa: E402
from helpers.flower.node import node_query, node_run_config, node_setup_tensors, node_train  # noqa: E402
from helpers.flower.replies import sort_replies, weights_problem  # noqa: E402
from helpers.training import resumable  # noqa: E402
from helpers.training.resumable import build_seeded_model  # noqa: E402
from helpers.training.runs import checkpoint_files, load_checkpoint, run_id  # noqa: E402

SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", rounds=2, server_lr=0.7)
IID = dict(num_clients=10, participation=0.3, sharding="iid")
SPARSE = dict(sparsity=0.9, calibration_rounds=2, calibration_samples=16, step0_epochs=1)


class InProcessGrid:
    """A Flower Grid whose nodes (partition-id k = client k) run the ClientApp's handlers in this process, through the
    Grid's public push_messages and pull_messages (no send_and_receive: the server must not need it).
    `tamper(message, reply)` returns the replies the server gets instead of `reply` (tests of untrusted replies);
    a pull returns every reply waiting, asked for or not (as a faulty SuperLink could)."""

    def __init__(self, config: dict, tamper=None):
        self.config, self.tamper, self.waiting = config, tamper, []
        # its own node disks (parallel tests share run ids), unless the test names them in FLME_NODE_STATE
        disk = {} if os.environ.get("FLME_NODE_STATE") else {"state-dir": tempfile.mkdtemp(prefix="flme-nodes-")}
        self.contexts = {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k, **disk},
                state=RecordDict(),
                run_config={},
            )  # fmt: skip
            for k in range(config["num_clients"])
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does
            self.waiting += self.tamper(m, self.answer(m)) if self.tamper else [self.answer(m)]
            ids.append(m.metadata.message_id)
        return ids

    def answer(self, m: Message) -> Message:
        handler = node_train if m.metadata.message_type == MessageType.TRAIN else node_query
        try:
            return Message(handler(m.content, self.contexts[m.metadata.dst_node_id], self.config), reply_to=m)
        except Exception as exc:  # as helpers.flower.app's ClientApp replies
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
            return Message(error, reply_to=m)

    def pull_messages(self, message_ids) -> list[Message]:
        replies, self.waiting = self.waiting, []
        return replies


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are created outside a Flower process here: give them the identity Flower would."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def flower_run(config: dict, root, tamper=None, faults=None):
    """serve() on an InProcessGrid, its replies damaged by `faults` (tests/faults.py) and then `tamper`."""
    config = flower_config(config)
    if faults:
        inject, then = fault_tamper(faults), tamper or (lambda m, r: [r])
        tamper = lambda m, r: [x for y in inject(m, r) for x in then(m, y)]  # noqa: E731
    return serve(InProcessGrid(config, tamper), config, root)


def dropped_ids(run) -> list[list[int]]:
    """The `dropped` column per round as client ids (pandas reads "3" as 3.0 and "" as NaN)."""
    return [[] if v != v else [int(float(t)) for t in str(v).split()] for v in run.metrics()["dropped"]]


def run_weights(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["model"]


# ----------------------------------------------------------------------------- the checks, as units


def test_sort_replies_trusts_one_reply_per_message_from_the_node_asked():
    asked = {"m1": 11, "m2": 12, "m3": 13, "m4": 14}
    replies = [("m1", 11, "a"), ("m2", 12, "b"), ("m2", 12, "b again"), ("m3", 99, "c"), ("m4", 1, "lost"),
               ("zz", 15, "stray")]  # fmt: skip
    got, problems, unasked = sort_replies(asked, replies, relay=1)
    assert got == {"m1": "a", "m4": "lost"}  # the relay (SuperLink) may answer for a node it lost
    assert problems == {
        "m2": "a second reply to the same message",
        "m3": "a reply from node 99, not from the node asked (13)",
    }
    assert len(unasked) == 1 and "node 15" in unasked[0] and "'zz'" in unasked[0]


@pytest.mark.parametrize("kind", ["nan", "shape", "dtype", "extra", "missing"])
def test_weights_problem_names_what_is_wrong(kind):
    expected = {"a.weight": torch.ones(3, 2), "b.bias": torch.zeros(4)}
    assert weights_problem(expected, {n: w.clone() for n, w in expected.items()}) is None
    problem = weights_problem(expected, corrupt(expected, kind))
    want = {"nan": "a.weight has non-finite", "shape": "a.weight has shape (5,), expected (3, 2)",
            "dtype": "a.weight has dtype torch.float64, expected torch.float32", "extra": "unexpected ['intruder']",
            "missing": "missing ['a.weight']"}  # fmt: skip
    assert problem.startswith("invalid weights: ") and want[kind] in problem


# ----------------------------------------------------------------------------- evaluation on the clients


@pytest.mark.parametrize("experiment", ["fedavg", "sparse_fedavg"])
def test_client_evaluation_equals_server_evaluation(experiment, tmp_path, monkeypatch):
    """Sequential engine: the clients' parts add up to the server's metrics (acc exactly, loss to rounding), and
    the weights are the same; on Flower nodes the server loads no data at all and gets the same metrics."""
    runner = {"fedavg": run_fedavg, "sparse_fedavg": run_sparse_fedavg}[experiment]
    extra = SPARSE if experiment == "sparse_fedavg" else {}  # step0="sgd": the head's FedAvg run on cached features
    config = make_config(experiment, "smoke", **SMALL, **IID, **extra)
    server = runner(config, run_root=tmp_path / "server", progress=False)
    clients = runner({**config, "evaluation": "clients"}, run_root=tmp_path / "clients", progress=False)
    assert server.id != clients.id and "evaluation" not in server.config  # default: left out, run ids unchanged
    assert_same_metrics(clients, server, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(run_weights(clients).values(), run_weights(server).values()))

    def refuse(*args, **kwargs):
        raise AssertionError("the server loaded data")

    monkeypatch.setattr(resumable, "load_data", refuse)  # the server's loader; the nodes load their own
    flw = flower_run({**config, "evaluation": "clients"}, tmp_path / "flower")
    assert_same_metrics(flw, clients, rel=1e-6)  # the nodes featurise their own part for the cached head run
    assert (
        max((a - b).abs().max().item() for a, b in zip(run_weights(flw).values(), run_weights(clients).values()))
        <= 1e-6
    )


def assert_same_metrics(got, want, rel: float) -> None:
    a, b = got.metrics(), want.metrics()
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in ("val_acc", "test_acc", "round", "clients"):
        assert list(a[col].fillna(-1)) == list(b[col].fillna(-1))
    for col in ("val_loss", "test_loss", "train_loss"):
        assert list(a[col].fillna(-1)) == pytest.approx(list(b[col].fillna(-1)), rel=rel)
    sa, sb = got.summary(), want.summary()
    for key in ("step0_val_acc", "step0_test_acc", "val_acc", "test_acc"):
        assert sa.get(key) == sb.get(key)
    for key in ("step0_val_loss", "step0_test_loss"):
        assert sa.get(key, -1) == pytest.approx(sb.get(key, -1), rel=rel)


# ----------------------------------------------------------------------------- failed clients


def reference_round(config: dict, weights: dict, rnd: int, kept: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg's round by hand over the clients in `kept` only: w + server_lr (sum_k n_k/n' w_k - w)."""
    data = load_data(config, torch.device("cpu"))
    shards = client_shards(config, data)
    model = build_seeded_model(config, torch.device("cpu"))
    total = sum(len(shards[k]) for k in kept)
    avg = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for k in kept:
        model.load_state_dict(weights)
        client_update(model, data, shards[k], rnd, k, config)
        for n, p in model.named_parameters():
            avg[n] += len(shards[k]) / total * p.detach().double()
    return {n: (w + config["server_lr"] * (avg[n] - w.double())).float() for n, w in weights.items()}


def test_failed_clients_are_dropped_recorded_and_the_others_averaged(tmp_path, monkeypatch):
    """node_failure=drop: a NaN update, a client that raises, a duplicated reply (round 1), a wrong-shaped and a
    wrong-dtype update (round 2) are left out; the rounds equal FedAvg over the clients that replied."""
    config = make_config("fedavg", "smoke", **SMALL, **IID, node_failure="drop")
    first, second = (sample_clients(config["seed"], r, config["num_clients"], config["participation"]) for r in (0, 1))
    faults = {(1, first[0]): "nan", (2, second[0]): "shape", (2, second[2]): "dtype"}
    twice = first[2]  # its round-1 reply arrives twice: neither is trusted

    def duplicate(message, reply):
        task = message.content["task"] if "task" in message.content else {"op": "hello"}
        again = task["op"] == "train" and task["round"] == 0 and task["client"] == twice
        return [reply, reply] if again else [reply]

    run = flower_run(config, tmp_path, tamper=duplicate, faults=faults)
    rows = run.metrics()
    assert dropped_ids(run) == [[first[0], twice], [second[0], second[2]]]
    w0 = {n: p.detach() for n, p in build_seeded_model(config, torch.device("cpu")).named_parameters()}
    w1 = reference_round(config, w0, 0, [first[1]])
    w2 = reference_round(config, w1, 1, [second[1]])
    got = run_weights(run)
    diff = max((got[n] - w2[n]).abs().max().item() for n in w2)
    print(f"max abs weight difference to the hand-computed rounds: {diff}")
    assert diff <= 1e-6
    assert run_fedavg(make_config("fedavg", "smoke", **SMALL, **IID), run_root=tmp_path).metrics().columns.tolist() == [
        c for c in rows.columns if c != "dropped"
    ]  # the column only where clients may be dropped


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("shape", r"invalid weights: \S+ has shape"),
        ("nan", r"invalid weights: \S+ has non-finite values"),
        ("raise", "RuntimeError: fault"),
    ],
)
def test_with_stop_a_bad_reply_stops_the_run_naming_round_and_client(fault, message, tmp_path, monkeypatch):
    config = make_config("fedavg", "smoke", **SMALL, **IID)
    victim = sample_clients(config["seed"], 1, config["num_clients"], config["participation"])[1]
    with pytest.raises(RuntimeError, match=rf"^round 2, client {victim}: {message}"):
        flower_run(config, tmp_path, faults={(2, victim): fault})
    (folder,) = (tmp_path / "fedavg").iterdir()
    saved = load_torch(checkpoint_files(folder)[0])
    assert saved["round"] == 1  # the global model is round 1's: the bad reply never touched it


def test_every_client_failing_stops_the_round_and_a_stray_reply_stops_the_run(tmp_path, monkeypatch):
    config = make_config("fedavg", "smoke", **SMALL, **IID, node_failure="drop")
    clients = sample_clients(config["seed"], 0, config["num_clients"], config["participation"])
    with pytest.raises(RuntimeError, match=rf"^round 1, client {clients[0]} \(every client failed\): invalid"):
        flower_run(config, tmp_path / "all", faults={(1, k): "nan" for k in clients})

    def stray(message, reply):
        other = Message(RecordDict({"x": ConfigRecord({"y": 1})}), dst_node_id=5, message_type=MessageType.QUERY)
        other.metadata.__dict__["_message_id"] = "never-sent"
        return [reply, Message(RecordDict(), reply_to=other)]

    with pytest.raises(RuntimeError, match="a reply from node 5 to a message that was not sent"):
        flower_run(config, tmp_path / "stray", tamper=stray)


def test_on_flower_simulation_the_nodes_evaluate_and_a_nan_update_is_dropped(tmp_path, monkeypatch):
    """The same through Flower's simulation (Ray: messages serialised, nodes in other processes): the server loads
    no data, the NaN update of round 2 is dropped, the weights are the hand-computed ones and the metrics those of
    the in-process nodes."""
    pytest.importorskip("ray")
    config = make_config("fedavg", "smoke", **SMALL, **IID, evaluation="clients", node_failure="drop")
    first, second = (sample_clients(config["seed"], r, config["num_clients"], config["participation"]) for r in (0, 1))
    faults = {(2, second[1]): "nan"}  # on the node (a Ray worker: the mod travels by value)
    local = flower_run(config, tmp_path / "in-process", faults=faults)

    def refuse(*args, **kwargs):
        raise AssertionError("the server loaded data")

    monkeypatch.setattr(resumable, "load_data", refuse)
    flw = run_flower(config, run_root=tmp_path / "simulation", progress=False, client_mods=[fault_mod(faults)])
    rows = flw.metrics()
    assert dropped_ids(flw) == [[], [second[1]]]
    w0 = {n: p.detach() for n, p in build_seeded_model(config, torch.device("cpu")).named_parameters()}
    want = reference_round(config, reference_round(config, w0, 0, first), 1, [second[0], second[2]])
    got = run_weights(flw)
    assert max((got[n] - want[n]).abs().max().item() for n in want) <= 1e-6
    assert rows.drop(columns="elapsed_s").equals(local.metrics().drop(columns="elapsed_s"))


class FakeClock:
    """time.time and time.sleep for helpers.flower.server: waits pass at once, and are recorded."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_node_silent_past_node_timeout_s_is_dropped_and_the_server_polls_at_its_interval(tmp_path, monkeypatch):
    """node_timeout_s bounds every wait for replies (0 = no limit; not part of the run id): a client whose reply is
    not back by then has failed, here dropped from round 2. The server pulls every FLME_FLOWER_POLL_S seconds
    (Grid.send_and_receive would sleep 3 s between pulls) until its replies are in or the timeout has passed."""
    config = make_config("fedavg", "smoke", **SMALL, **IID, node_failure="drop", node_timeout_s=30)
    slow = sample_clients(config["seed"], 1, config["num_clients"], config["participation"])[1]
    clock = FakeClock()
    monkeypatch.setattr(flower_ops, "time", clock)
    monkeypatch.setenv(POLL_ENV, "0.5")

    class SlowGrid(InProcessGrid):
        """The slow client's round-2 reply never comes back: the server gets the others."""

        def answer(self, m):
            task = m.content["task"] if "task" in m.content else {"op": "hello"}
            if task["op"] == "train" and task["round"] == 1 and task["client"] == slow:
                self.late = m.metadata.message_id
            return super().answer(m)

        def pull_messages(self, message_ids):
            return [r for r in super().pull_messages(message_ids) if r.metadata.reply_to_message_id != self.late]

    grid = SlowGrid(flower_config(config))
    grid.late = None
    run = serve(grid, flower_config(config), tmp_path)
    assert dropped_ids(run) == [[], [slow]]
    assert clock.sleeps == [0.5] * 60 and clock.now == 30  # pulls at 0, 0.5, ..., 29.5 s; none after the timeout
    w0 = {n: p.detach() for n, p in build_seeded_model(config, torch.device("cpu")).named_parameters()}
    first = sample_clients(config["seed"], 0, config["num_clients"], config["participation"])
    second = [k for k in sample_clients(config["seed"], 1, config["num_clients"], config["participation"]) if k != slow]
    want = reference_round(config, reference_round(config, w0, 0, first), 1, second)
    got = run_weights(run)
    assert max((got[n] - want[n]).abs().max().item() for n in want) <= 1e-6
    plain = make_config("fedavg", "smoke", **SMALL, **IID, node_failure="drop")
    assert "node_timeout_s" not in plain and run_id(flower_config(plain)) == run.id
    for bad in ("0", "nan", "x", "61"):
        monkeypatch.setenv(POLL_ENV, bad)
        with pytest.raises(ValueError, match=rf"^{POLL_ENV}='{bad}' is invalid: must be a number of seconds"):
            poll_interval()


def test_entries_outside_a_clients_own_mask_never_reach_the_average(tmp_path):
    """Per-client masks: a node that also changes entries its own mask freezes (others may train them) gives the
    honest run's weights bit for bit: the server takes those entries from the round's start, not from the reply."""
    config = flower_config(make_config("sparse_fedavg", "smoke", **SMALL, **IID, **SPARSE, mask_scope="local"))
    honest = serve(InProcessGrid(config), config, tmp_path / "honest")

    def outside(message, reply):
        if message.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return [reply]
        context, task = grid.contexts[message.metadata.dst_node_id], message.content["task"]  # the mask its node keeps
        masks = node_setup_tensors(context, node_run_config(str(task["run"]), config), int(task["client"]))[1]
        if masks is None:  # the step-0 head run
            return [reply]
        sent = reply.content["weights"].to_torch_state_dict()
        reply.content["weights"] = ArrayRecord({n: torch.where(masks[n].bool(), w, w + 1000) if n in masks else w
                                                for n, w in sent.items()})  # fmt: skip
        return [reply]

    grid = InProcessGrid(config, outside)
    tampered = serve(grid, config, tmp_path / "tampered")
    want, got = run_weights(honest), run_weights(tampered)
    assert all(torch.equal(got[n], want[n]) for n in want)


def too_many_correct(content: RecordDict) -> None:
    content["result"]["correct"] = 10**6


def nan_scores(content: RecordDict) -> None:
    scores = content["scores"].to_torch_state_dict()
    first = next(iter(scores))
    content["scores"] = ArrayRecord({**scores, first: scores[first] * math.nan})


def no_control_variate(content: RecordDict) -> None:
    del content["extra"]


@pytest.mark.parametrize(
    ("experiment", "op", "damage", "message"),
    [
        ("fedavg", "evaluate", too_many_correct, r"^evaluate on client \d+: invalid reply: loss"),
        ("sparse_fedavg", "score", nan_scores, r"^score on client \d+: invalid reply: \S+ has non-finite"),
        ("fedavg", "train", no_control_variate, r"^round 1, client \d+ \(every client failed\): malformed reply: no"),
    ],
)
def test_every_reply_a_step_needs_is_checked(experiment, op, damage, message, tmp_path):
    """Replies outside training (scores, evaluation sums) and SCAFFOLD's control variates are checked too: a
    damaged one stops the run naming the operation and the client."""
    extra = {"evaluation": "clients"} if op == "evaluate" else {"algorithm": "scaffold"} if op == "train" else {}
    config = make_config(experiment, "smoke", **SMALL, **IID, **(SPARSE if experiment != "fedavg" else {}), **extra)

    def damaged(m, reply):
        if "task" in m.content and m.content["task"]["op"] == op and not reply.has_error():
            damage(reply.content)
        return [reply]

    with pytest.raises(RuntimeError, match=message):
        flower_run(config, tmp_path, tamper=damaged)
