"""merge=ties and the interference diagnostic on Flower nodes (in process, as tests/test_node_faults.py drives them:
no Ray, no SuperLink) give the sequential engine's results: the same merged rounds, and the interference the nodes
compute from the predictions they kept."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from test_node_faults import IID, SMALL, SPARSE, assert_same_metrics, flower_run, run_weights, task_identity  # noqa: E402, F401

from helpers.config.experiments import make_config  # noqa: E402
from helpers.editing.sparse_runs import run_sparse_fedavg  # noqa: E402
from helpers.federated.rounds import run_fedavg  # noqa: E402


@pytest.mark.parametrize("experiment", ["fedavg", "sparse_fedavg"])
def test_ties_and_interference_on_flower_equal_the_sequential_engine(experiment, tmp_path):
    runner = {"fedavg": run_fedavg, "sparse_fedavg": run_sparse_fedavg}[experiment]
    extra = SPARSE if experiment == "sparse_fedavg" else {}
    config = make_config(
        experiment, "smoke", **SMALL, **IID, **extra, merge="ties", merge_density=0.3, interference_probe=8
    )
    sequential = runner(config, run_root=tmp_path / "sequential", progress=False)
    flw = flower_run(config, tmp_path / "flower")
    assert_same_metrics(flw, sequential, rel=1e-6)
    a, b = flw.metrics()["interference"], sequential.metrics()["interference"]
    assert list(a) == list(b) and a.between(0, 1).all()
    diff = max((x - y).abs().max().item() for x, y in zip(run_weights(flw).values(), run_weights(sequential).values()))
    assert diff <= 1e-6


def test_a_node_without_kept_predictions_names_the_parameter(tmp_path):
    """The interference message after a node lost its state (a restart): the run stops with an error naming it."""
    from flwr.app import Context, RecordDict

    from helpers.flower.node import node_interference

    config = make_config("fedavg", "smoke", **SMALL, **IID, interference_probe=8)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="interference_probe=0"):
        node_interference(RecordDict(), context, config, 0)


def test_an_interference_reply_the_server_cannot_check_stops_the_run(tmp_path):
    """A node claiming more probe images than its shard's probe holds (the server knows n_k): the run stops, naming
    the client; nothing unchecked reaches the row."""

    def inflate(message, reply):
        task = message.content["task"] if "task" in message.content else None
        if task is not None and task["op"] == "interference" and not reply.has_error():
            reply.content["result"]["samples"] = 10**6
        return [reply]

    config = make_config("fedavg", "smoke", **SMALL, **IID, interference_probe=8)
    with pytest.raises(RuntimeError, match=r"interference on client \d+: invalid reply: .*\(expected 8\)"):
        flower_run(config, tmp_path, tamper=inflate)
