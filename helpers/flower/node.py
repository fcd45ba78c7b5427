"""A Flower node's half of the federation: the handlers of each message type (helpers.flower.server sends them).

A node holds one client's training data (its partition-id) and runs the project's own function on its shard:
client_update, score_pool, ridge_statistics, the evaluation sums; a client's state between rounds (SCAFFOLD's c_i)
stays in the node's state-dir. flwr 1.41 runs each message in a new ClientApp process: the client's rows and the run's
setup wait on the node's disk between messages (helpers.flower.cache), and each operation imports what it needs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from helpers.algorithms.fedavg import FedAvg, aligned_masks
from helpers.algorithms.scaffold import pack_entries
from helpers.config.experiments import check_value, setting
from helpers.core import settings
from helpers.core.caches import NODES
from helpers.core.precision import make_scaler
from helpers.data.datasets import Data, load_data, pick_device
from helpers.federated.evaluation import eval_parts, split_tensors
from helpers.flower.cache import NodeCache, data_cache_on
from helpers.flower.server import MISSING  # imported first: says what to install when flwr is missing
from helpers.flower.timing import mark
from helpers.training.loop import evaluation_sums
from helpers.training.runs import run_id

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
except ImportError as exc:
    raise ImportError(f"{MISSING} ({exc})") from None

# Heavy modules (helpers.federated and what needs the model: timm, torchvision) are imported by the operations that
# use them: a ClientApp process serves one message (flwr 1.41), and size, setup and close need none of them.


class ClientData(NamedTuple):
    """What one client's operations read: `data` with its shard at positions `shard` of the train split and its
    parts of val and test at `parts[split]` (the whole splits in memory, only its rows from the node's disk)."""

    data: Data
    shard: Tensor
    parts: dict[str, Tensor]


def with_node_overrides(config: dict, context: Context) -> dict:
    """A node's own `device` and `data-root` (--node-config) replace the run's: neither changes the results."""
    local = {"device": context.node_config.get("device"), "data_root": context.node_config.get("data-root")}
    return {**config, **{k: check_value(k, v) for k, v in local.items() if v is not None}}


def node_run_config(run: str, config: dict) -> dict:
    """The config of the server's run `run`: this node's run, or (sparse, step0="sgd") its step-0 head run."""
    if run == run_id(config):
        return config
    if "sparsity" in config and config.get("step0") == "sgd":
        from helpers.editing.step0 import head_fedavg_config  # lazy: one message per process

        if run == run_id(head := head_fedavg_config(config)):
            return head
    raise ValueError(
        f"this node's config is run {run_id(config)}, the server's run {run}: "
        "give every node the same run config (and FLME_PROFILE)"
    )


class NodeMemory:
    """What this process holds for one config (in core.caches.NODES): the data and client shards, the model; each
    made when first needed (a ClientApp process that reads its client's rows from the disk cache builds no data)."""

    def __init__(self) -> None:
        self.data: Data | None = None
        self.shards: list[Tensor] = []
        self.model: nn.Module | None = None


def node_memory(config: dict) -> NodeMemory:
    return NODES.get(json.dumps(config, sort_keys=True), NodeMemory)


def node_data(config: dict) -> tuple[Data, list[Tensor]]:
    """This process's data and client shards for `config` (made once). A node holds its training data:
    FLME_NO_TRAIN_DATA (the server's switch) does not apply."""
    from helpers.federated.clients import client_shards  # lazy: one message per process

    memory = node_memory(config)
    if memory.data is None:
        memory.data = load_data(config, pick_device(config["device"]), holder=True)
        memory.shards = client_shards(config, memory.data)
    return memory.data, memory.shards


def node_model(config: dict) -> nn.Module:
    """This process's model for `config` (made once; its weights come with each message, or from the setup)."""
    from helpers.training.resumable import build_seeded_model  # lazy: one message per process

    memory = node_memory(config)
    if memory.model is None:
        memory.model = build_seeded_model(config, pick_device(config["device"]))
        if config["compile"]:
            memory.model.compile()  # as the sequential engine trains its clients
    return memory.model


def node_inputs(config: dict) -> tuple[Data, nn.Module, list[Tensor]]:
    """This process's data, model and client shards for `config` (one config at a time)."""
    data, shards = node_data(config)
    return data, node_model(config), shards


def client_data(config: dict, context: Context, client: int) -> ClientData:
    """Client k's data: from this process's memory when it holds the run's data (Flower's simulation keeps its
    workers), else from the node's disk cache of the run, else loaded, sharded and written to that cache."""
    cache = NodeCache(node_cache_dir(context, run_id(config), client), context, f"cache@{run_id(config)}")
    in_memory = node_memory(config).data is not None
    if not in_memory and data_cache_on() and (rows := cache.get("data")) is not None:
        return rows_as_client_data(rows, pick_device(config["device"]))
    data, shards = node_data(config)
    parts = {s: eval_parts(len(split_tensors(data, s)[1]), config["num_clients"])[client] for s in ("val", "test")}
    own = ClientData(data, shards[client].to(data.train_y.device), parts)
    if data_cache_on() and not in_memory:  # a process that held it in memory will keep it (Flower's simulation)
        cache.put("data", client_rows(own))
    return own


def client_rows(own: ClientData) -> dict[str, Tensor]:
    """The rows a client reads: its shard of the train split and its parts of val and test, images and labels."""
    rows = {}
    for split, positions in (("train", own.shard), *own.parts.items()):
        x, y = (own.data.train_x, own.data.train_y) if split == "train" else split_tensors(own.data, split)
        rows[f"{split}_x"], rows[f"{split}_y"] = x[positions.to(x.device)], y[positions.to(y.device)]
    return rows


def rows_as_client_data(rows: Mapping[str, Tensor], device: torch.device) -> ClientData:
    """client_rows back as ClientData on `device`: every position is the row's own (0..n-1)."""
    data = Data(*(rows[f"{s}_{xy}"].to(device) for s in ("train", "val", "test") for xy in "xy"))
    positions = {s: torch.arange(len(rows[f"{s}_y"]), device=device) for s in ("train", "val", "test")}
    return ClientData(data, positions.pop("train"), positions)


def client_inputs(config: dict, own: ClientData) -> tuple[nn.Module, Data, Tensor]:
    """What a client trains: (model, data, its shard); for a head-only run on cached features, (model.head, the
    features of its own shard, their positions): the same rows as the server's cached features of the split."""
    from helpers.training.features import backbone_features, uses_cached_features  # lazy: one message per process

    model = node_model(config)
    if not uses_cached_features(config):
        return model, own.data, own.shard
    data = own.data
    x = backbone_features(model, data.train_x[own.shard], img_size=config["img_size"],
                          batch_size=config["eval_batch_size"], amp=setting(config, "amp"))  # fmt: skip
    features = Data(x, data.train_y[own.shard], data.val_x, data.val_y, data.test_x, data.test_y)
    return model.head, features, torch.arange(len(own.shard), device=own.shard.device)


def node_partition(context: Context, config: dict) -> int:
    """This node's client id: its partition-id, checked against num_clients."""
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < config["num_clients"]:
        raise ValueError(f"partition-id={partition} is invalid: must be in [0, {config['num_clients'] - 1}]")
    return partition


def node_task(content: RecordDict, context: Context, config: dict) -> tuple[ConfigRecord, dict, int]:
    """The message's task, the config of its run (with this node's overrides) and this node's client id."""
    task = content["task"]
    run_config = node_run_config(str(task["run"]), config)
    client = node_partition(context, config)
    if int(task["client"]) != client:
        raise ValueError(f"client {task['client']} was sent to the node of partition-id={client}")
    return task, with_node_overrides(run_config, context), client


def node_query(content: RecordDict, context: Context, config: dict) -> RecordDict:
    """`hello`: this node's partition (= client id). A `task`: the operation it names (NODE_OPS)."""
    if "task" in content:
        task, run_config, client = node_task(content, context, config)
        return NODE_OPS[str(task["op"])](content, context, run_config, client)
    if str(content["hello"]["run"]) != run_id(config):
        node_run_config(str(content["hello"]["run"]), config)  # raises: another run
    partition = node_partition(context, config)
    client_data(with_node_overrides(config, context), context, partition)  # now, while every node loads its own
    mark("inputs")
    return RecordDict({"node": ConfigRecord({"partition": partition})})


def node_size(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """n_k: the size of this client's shard."""
    return RecordDict({"result": ConfigRecord({"size": len(client_data(config, context, client).shard)})})


def setup_cache(context: Context, config: dict, client: int) -> NodeCache:
    """Where the setup of run `config` (frozen weights, this client's mask) waits for its rounds on this node."""
    run = run_id(config)
    return NodeCache(node_cache_dir(context, run, client), context, f"setup@{run}")


def node_setup(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """Keep the run's frozen weights and this client's mask for its rounds, on the node's disk."""
    cache = setup_cache(context, config, client)
    for key in ("frozen", "masks"):
        if key in content:
            cache.put(key, content[key].to_torch_state_dict())
    return RecordDict({"result": ConfigRecord({"client": client})})


def node_setup_tensors(context: Context, config: dict, client: int) -> tuple[dict, dict | None]:
    """The setup's (frozen weights, mask or None) for run `config`; an error if this node has none (restarted)."""
    cache = setup_cache(context, config, client)
    frozen = cache.get("frozen")
    masks = cache.get("masks") if cache.has("masks") else None
    if frozen is None or (cache.has("masks") and masks is None):
        raise RuntimeError("this node has no setup for the run (was it restarted?): rerun the run to resume it")
    return frozen, masks


def node_score(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """This client's summed sensitivity scores on the server's model (calibration round `call`)."""
    from helpers.editing.calibration import score_pool  # lazy: one message per process

    own, model = client_data(config, context, client), node_model(config)
    load_weights(model, content["model"].to_torch_state_dict(), {})
    mark("inputs")
    key, call = ("client", client), int(content["task"]["call"])
    scores, samples = score_pool(model, own.data, own.shard, key, call, config)
    mark("computed")
    return RecordDict({"scores": ArrayRecord(scores), "result": ConfigRecord({"samples": samples})})


def node_ridge(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """This client's ridge statistics (X_k^T X_k, X_k^T Y_k) of its own shard's features on the server's model."""
    from helpers.editing.step0 import ridge_statistics  # lazy: one message per process
    from helpers.training.features import backbone_features  # lazy: one message per process

    own, model = client_data(config, context, client), node_model(config)
    load_weights(model, content["model"].to_torch_state_dict(), {})
    mark("inputs")
    x = backbone_features(model, own.data.train_x[own.shard], img_size=config["img_size"],
                          batch_size=config["eval_batch_size"], amp=setting(config, "amp"))  # fmt: skip
    xtx, xty = ridge_statistics(x, own.data.train_y[own.shard])
    mark("computed")
    return RecordDict({"stats": ArrayRecord({"xtx": xtx, "xty": xty})})


def node_train(content: RecordDict, context: Context, config: dict) -> RecordDict:
    """Client k's round on its node: the round's global weights in, client_update, its trained weights out."""
    from helpers.federated.clients import client_lr, client_update  # lazy: one message per process
    from helpers.federated.stragglers import local_steps  # lazy: one message per process

    mark("imports")  # what training needs (torch, timm, ...) is in: the benchmark splits imports from setup
    _, config, client = node_task(content, context, config)
    rnd = int(content["task"]["round"])
    frozen, masks = node_setup_tensors(context, config, client)
    model, data, shard = client_inputs(config, client_data(config, context, client))
    device = shard.device
    load_weights(model, content["weights"].to_torch_state_dict(), frozen)
    masks = {n: m.to(device) for n, m in masks.items()} if masks is not None else None
    scaler = make_scaler(device, setting(config, "amp"))
    if scaler is not None:
        scaler.load_state_dict(dict(content["scaler"]))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    start = [p.detach().clone() for p in params]  # the round's global weights (FedProx's anchor)
    aligned = aligned_masks(names, masks)
    algorithm = node_algorithm(content, context, config, client, dict(zip(names, start, strict=True)), aligned)
    side = algorithm.client_side(rnd, client, start, aligned, client_lr(config, rnd), local_steps(config, rnd, client))
    mark("inputs")
    loss = client_update(model, data, shard, rnd, client, config, masks=masks, scaler=scaler, side=side)
    mark("computed")
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    reply = RecordDict({"weights": ArrayRecord(trained), "result": ConfigRecord({"client": client, "loss": loss})})
    if scaler is not None:
        reply["scaler"] = ConfigRecord(scaler.state_dict())
    if setting(config, "interference_probe"):  # kept here until the round's interference message
        from helpers.federated.interference import probe_predictions  # lazy: one message per process

        probe = probe_predictions(model, data, shard, client, config)
        context.state[f"probe@{run_id(config)}"] = ArrayRecord({"predictions": probe})
    extra = side.finish(list(params)) if side is not None else None
    if extra is not None:  # only its trainable entries travel (the others are 0)
        reply["extra"] = ArrayRecord(dict(zip(names, pack_entries(extra, aligned), strict=True)))
    return reply


def node_algorithm(
    content: RecordDict,
    context: Context,
    config: dict,
    client: int,
    start: dict[str, Tensor],
    masks: list[Tensor | None],
) -> FedAvg:
    """This client's copy of the run's algorithm: the server state the round's message carries (FedAvg.to_node),
    its own state between rounds in this node's state-dir (SCAFFOLD's c_i)."""
    from helpers.algorithms.registry import make_algorithm  # lazy: one message per process

    algorithm = make_algorithm(config)
    if "algorithm" in content:
        packed = content["algorithm"].to_torch_state_dict()
        tensors = [packed[n].to(w.device) for n, w in start.items()]
        folder = node_state_dir(context, str(content["task"]["run"]), client)
        algorithm.from_server(tensors, dict(content["numbers"]), list(start.values()), masks, folder)
    return algorithm


def node_root(context: Context) -> Path:
    """This node's state-dir: --node-config state-dir, else $FLME_NODE_STATE, else ~/.cache/flme/flower-nodes."""
    root = context.node_config.get("state-dir") or settings.node_state_root()
    return Path(str(root)).expanduser()


def node_state_dir(context: Context, run: str, client: int) -> Path:
    """Where this node keeps client `client`'s state of run `run` between rounds, on its own disk (a restarted node
    finds it)."""
    return node_root(context) / run / f"client_{client}"


def node_cache_dir(context: Context, run: str, client: int) -> Path:
    """Where this node caches client `client`'s data and setup of run `run` between messages (helpers.flower.cache)."""
    return node_root(context) / run / f"cache_{client}"


def related_runs(config: dict) -> list[str]:
    """The run ids a node serves for run `config`: its own and (sparse, step0="sgd") its step-0 head run's."""
    if "sparsity" in config and config.get("step0") == "sgd":
        from helpers.editing.step0 import head_fedavg_config  # lazy: one message per process

        return [run_id(config), run_id(head_fedavg_config(config))]
    return [run_id(config)]


def node_close(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """The run is done: drop this client's state and caches of it (and the run's folder once no client of it is
    left), and those of its step-0 head run."""
    for run in related_runs(config):
        for folder in (node_state_dir(context, run, client), node_cache_dir(context, run, client)):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            (node_root(context) / run).rmdir()  # only if empty: the nodes of other clients may hold theirs
        except OSError:
            pass
    return RecordDict({"result": ConfigRecord({"client": client})})


def node_evaluate(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """This client's (summed loss, correct, samples) on its part of the val or test split (evaluation=clients);
    a head-only run on cached features sends the head, evaluated on the backbone features of the part."""
    from helpers.training.features import backbone_features, uses_cached_features  # lazy: one message per process

    own, model = client_data(config, context, client), node_model(config)
    split = str(content["task"]["split"])
    x, y = split_tensors(own.data, split)
    part = own.parts[split].to(y.device)
    net = model.head if uses_cached_features(config) else model
    load_weights(net, content["model"].to_torch_state_dict(), {})
    mark("inputs")
    opts = dict(img_size=config["img_size"], batch_size=config["eval_batch_size"], amp=setting(config, "amp"))
    x = backbone_features(model, x[part], **opts) if net is model.head else x[part]
    loss, correct, n = evaluation_sums(net, x, y[part], **opts)
    mark("computed")
    return RecordDict({"result": ConfigRecord({"loss": loss, "correct": correct, "samples": n})})


def node_interference(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """How many of its probe images this client's trained model (its predictions kept since its train message) and
    the new global model disagree on (helpers.federated.interference); the kept predictions are dropped."""
    from helpers.federated.interference import probe_predictions  # lazy: one message per process

    key = f"probe@{run_id(config)}"
    if key not in context.state:
        raise RuntimeError(
            "this node kept no probe predictions for the run (was it restarted?): set interference_probe=0"
        )
    own = context.state[key].to_torch_state_dict()["predictions"]
    del context.state[key]
    model, data, shard = client_inputs(config, client_data(config, context, client))
    load_weights(model, content["model"].to_torch_state_dict(), {})
    mark("inputs")
    disagree = int((probe_predictions(model, data, shard, client, config).to(own.device) != own).sum())
    mark("computed")
    return RecordDict({"result": ConfigRecord({"disagree": disagree, "samples": len(own)})})


NODE_OPS = {
    "size": node_size, "setup": node_setup, "score": node_score, "ridge": node_ridge, "evaluate": node_evaluate,
    "close": node_close, "interference": node_interference,
}  # fmt: skip


@torch.no_grad()
def load_weights(model: nn.Module, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor]) -> None:
    """Every parameter from the round's weights (trainable) or the setup (frozen); the model is shared by the
    nodes a process serves, so nothing may be left from the node before."""
    for name, p in model.named_parameters():
        if name not in trainable and name not in frozen:
            raise ValueError(f"parameter {name} is neither in the round's weights nor in the setup")
        p.copy_(trainable[name] if name in trainable else frozen[name])
        p.requires_grad_(name in trainable)
