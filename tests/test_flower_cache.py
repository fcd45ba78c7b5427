"""Issue 37's node cache, in-process (no Ray, no SuperLink): flwr 1.41 starts a ClientApp process per message, so a
node keeps its client's rows and the run's setup on its disk between messages. Nodes that forget everything in memory
before each message (as a fresh process does) load their data once per run and give the sequential engine's run; a
cache file is read only by the Flower run (Context) that wrote it, only with its recorded content, and without running
code."""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from test_node_faults import IID, SMALL, InProcessGrid, run_weights, task_identity  # noqa: E402, F401

from helpers.config.experiments import make_config  # noqa: E402
from helpers.core import caches
from helpers.editing.sparse_runs import run_sparse_fedavg  # noqa: E402
from helpers.flower import node as flower_node  # noqa: E402
from helpers.flower.app import flower_config, serve  # noqa: E402
from helpers.flower.cache import CACHE_ENV, NodeCache  # noqa: E402
from helpers.training.runs import run_id  # noqa: E402

SPARSE = dict(sparsity=0.9, calibration_rounds=2, calibration_samples=16, step0="ridge", evaluation="clients")


class FreshProcessGrid(InProcessGrid):
    """Each message finds its node's process empty (NODES and the data splits forgotten), as flwr 1.41's ClientApp
    process does; `loads` counts the nodes' loads of the dataset, `reads` the messages that read the client's data."""

    def __init__(self, config, monkeypatch):
        super().__init__(config)
        self.loads = self.reads = 0
        real = flower_node.load_data

        def counted(*args, **kwargs):
            self.loads += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(flower_node, "load_data", counted)

    def answer(self, m):
        caches.NODES.clear()
        caches.DATA.clear()
        op = m.content["task"]["op"] if "task" in m.content else "hello"
        self.reads += op in ("hello", "size", "ridge", "score", "train", "evaluate")
        return super().answer(m)


def test_fresh_node_processes_load_their_data_once_and_give_the_sequential_run(tmp_path, monkeypatch):
    """Sparse FedAvg with ridge step 0, 2 calibration rounds and evaluation on the clients: every operation of the
    node (hello, size, ridge, score, setup, train, evaluate, close) runs in a "fresh process" and reads its rows and
    setup from the disk cache; weights and metrics equal the sequential engine's; close leaves nothing on the node."""
    state = tmp_path / "node-state"
    monkeypatch.setenv("FLME_NODE_STATE", str(state))
    config = make_config("sparse_fedavg", "smoke", **SMALL, **IID, **SPARSE)
    seq = run_sparse_fedavg(config, run_root=tmp_path / "sequential", progress=False)
    grid = FreshProcessGrid(flower_config(config), monkeypatch)
    flw = serve(grid, flower_config(config), tmp_path / "flower")
    want, got = run_weights(seq), run_weights(flw)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert flw.metrics().drop(columns="elapsed_s").equals(seq.metrics().drop(columns="elapsed_s"))
    assert grid.loads == config["num_clients"] and grid.reads > 6 * config["num_clients"]  # loaded at hello only
    assert state.exists() and list(state.iterdir()) == []  # the done run's close: no cache left on a node


def test_without_the_cache_a_fresh_node_loads_its_data_at_every_message(tmp_path, monkeypatch):
    """FLME_NODE_CACHE=0, the state before issue 37 (the benchmark's "before"): the same run, a load per message."""
    monkeypatch.setenv(CACHE_ENV, "0")
    config = flower_config(make_config("fedavg", "smoke", **SMALL, **IID))
    grid = FreshProcessGrid(config, monkeypatch)
    flw = serve(grid, config, tmp_path / "flower")
    assert grid.loads == grid.reads == 2 * config["num_clients"] + config["rounds"] * 3  # hello, size, train
    monkeypatch.delenv(CACHE_ENV)
    want, got = run_weights(serve(InProcessGrid(config), config, tmp_path / "memory")), run_weights(flw)
    assert all(torch.equal(got[n], want[n]) for n in want)


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_a_cache_file_is_read_only_by_its_run_with_its_content_and_without_running_code(tmp_path):
    written_by, other_run = context(), context()
    cache = NodeCache(tmp_path, written_by, "cache@run")
    cache.put("data", {"x": torch.arange(6).view(2, 3)})
    assert torch.equal(cache.get("data")["x"], torch.arange(6).view(2, 3))
    assert NodeCache(tmp_path, other_run, "cache@run").get("data") is None  # another Flower run (or SuperNode)
    assert NodeCache(tmp_path, written_by, "cache@other").get("data") is None  # another run of ours
    (path,) = tmp_path.glob("data-*.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert cache.get("data") is None  # changed on disk: rebuilt, never read
    path.unlink()
    assert cache.get("data") is None

    class Runs:  # what a planted file could make torch.load(weights_only=False) execute
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    buffer = io.BytesIO()
    torch.save({"x": Runs()}, buffer)
    planted = NodeCache(tmp_path, context(), "cache@run")  # its hash recorded, as if the Context were compromised
    planted.context.state["cache@run"] = ConfigRecord({"data": hashlib.sha256(buffer.getvalue()).hexdigest()})
    planted.path("data", planted.hashes()["data"]).write_bytes(buffer.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        planted.get("data")
    assert not (tmp_path / "ran").exists()


def test_the_setup_is_kept_per_run_and_a_node_without_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("FLME_NODE_STATE", str(tmp_path))
    config = flower_config(make_config("fedavg", "smoke", **SMALL, **IID))
    node = context()
    frozen = {"head.weight": torch.ones(2, 2)}
    setup = RecordDict({"task": ConfigRecord({"op": "setup", "run": run_id(config), "client": 0}),
                        "frozen": ArrayRecord(frozen)})  # fmt: skip
    flower_node.node_query(setup, node, config)
    got, masks = flower_node.node_setup_tensors(node, config, 0)
    assert torch.equal(got["head.weight"], frozen["head.weight"]) and masks is None
    with pytest.raises(RuntimeError, match=r"^this node has no setup for the run \(was it restarted\?\)"):
        flower_node.node_setup_tensors(context(), config, 0)  # a restarted SuperNode: a new Context
