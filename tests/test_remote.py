"""A server without training data (FLME_NO_TRAIN_DATA=1, federated.remote): the loader withholds the train split and
names the switch on any use; with a RemoteClients engine (here in-process, as helpers.flower.server runs it on nodes)
the federated runners give the sequential engine's run without touching it. No Flower needed."""

from __future__ import annotations

import pytest
import torch

from helpers.config.experiments import make_config
from helpers.data.datasets import NO_TRAIN_DATA_ENV, TrainDataWithheldError, Withheld, load_data
from helpers.editing.calibration import load_masks, score_pool
from helpers.editing.sparse_runs import run_sparse_fedavg
from helpers.editing.step0 import ridge_statistics
from helpers.federated.clients import client_shards
from helpers.federated.remote import RemoteClients, remote_clients
from helpers.federated.rounds import run_fedavg, train_in_turn
from helpers.training.features import backbone_features
from helpers.training.runs import load_checkpoint

SMALL = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", rounds=2)
NONIID = dict(num_clients=50, participation=0.06, sharding="noniid", classes_per_client=2)


def test_the_switch_withholds_the_train_split_only(monkeypatch, tmp_path):
    config = make_config("fedavg", "smoke", **SMALL)
    full = load_data(config, torch.device("cpu"))
    monkeypatch.setenv(NO_TRAIN_DATA_ENV, "1")
    server = load_data(config, torch.device("cpu"))
    assert isinstance(server.train_x, Withheld) and isinstance(server.train_y, Withheld)
    assert torch.equal(server.val_x, full.val_x) and torch.equal(server.test_y, full.test_y)
    for use in (lambda: server.train_x.device, lambda: server.train_y[0], lambda: len(server.train_x)):
        with pytest.raises(TrainDataWithheldError, match=rf"{NO_TRAIN_DATA_ENV}=1: a federation's server holds no"):
            use()
    assert torch.equal(load_data(config, torch.device("cpu"), holder=True).train_x, full.train_x)  # a client's own
    with pytest.raises(TrainDataWithheldError, match="the training labels is not on this machine"):
        run_fedavg(config, progress=False, run_root=tmp_path)  # the sequential engine reads it: refused, named
    monkeypatch.setenv(NO_TRAIN_DATA_ENV, "yes")
    with pytest.raises(ValueError, match=rf"^{NO_TRAIN_DATA_ENV}='yes' is invalid: must be 1"):
        load_data(config, torch.device("cpu"))


class InProcessClients:
    """RemoteClients on the clients' own copy of the data (load_data(holder=True)), in this process."""

    def __init__(self, config: dict):
        self.data = load_data(config, torch.device("cpu"), holder=True)
        self.shards = client_shards(config, self.data)
        self.asked: list[str] = []

    def shard_sizes(self, config):
        self.asked.append("size")
        return [len(s) for s in self.shards]

    def client_scores(self, model, config, call, clients):
        self.asked.append("score")
        for k in clients:
            yield score_pool(model, self.data, self.shards[k], ("client", k), call, config)

    def ridge_statistics(self, model, config):
        self.asked.append("ridge")
        for s in self.shards:
            x = backbone_features(model, self.data.train_x[s], img_size=config["img_size"],
                                  batch_size=config["eval_batch_size"])  # fmt: skip
            yield ridge_statistics(x, self.data.train_y[s])

    def __call__(self, model, data, shards, *args, **kwargs):
        assert all(isinstance(s, Withheld) for s in [data.train_x, *shards])  # the server passes sizes only
        self.asked.append("train")
        return train_in_turn(model, self.data, self.shards, *args, **kwargs)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_a_remote_engine_gives_the_sequential_run_without_the_train_split(scope, tmp_path, monkeypatch):
    config = make_config("sparse_fedavg", "smoke", **SMALL, **NONIID, sparsity=0.9, calibration_rounds=2,
                         calibration_samples=16, step0="ridge", mask_scope=scope)  # fmt: skip
    seq = run_sparse_fedavg(config, run_root=tmp_path / "sequential", progress=False)
    clients = InProcessClients(config)
    assert isinstance(clients, RemoteClients) and remote_clients(clients) is clients
    assert remote_clients(train_in_turn) is None
    monkeypatch.setenv(NO_TRAIN_DATA_ENV, "1")
    run = run_sparse_fedavg(config, run_root=tmp_path / "remote", progress=False, train_clients=clients)
    assert set(clients.asked) == {"size", "ridge", "score", "train"}
    want, got = load_checkpoint(seq)["model"], load_checkpoint(run)["model"]
    assert all(torch.equal(got[n], want[n]) for n in want)  # same float operations in one process
    assert run.metrics().drop(columns="elapsed_s").equals(seq.metrics().drop(columns="elapsed_s"))
    for k in range(config["num_clients"]):
        own, ref = load_masks(run).of_client(k), load_masks(seq).of_client(k)
        assert all(torch.equal(own[n], ref[n]) for n in ref)
