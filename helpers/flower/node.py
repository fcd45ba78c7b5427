"""A Flower node's half of the federation: the handlers of each message type (helpers.flower.server sends them).

A node holds one client's training data (its partition-id) and runs the project's own function on its shard:
client_update, score_pool, ridge_statistics, the evaluation sums; a client's state between rounds (SCAFFOLD's c_i)
stays in the node's state-dir.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from helpers.algorithms.fedavg import FedAvg, aligned_masks
from helpers.algorithms.registry import make_algorithm
from helpers.algorithms.scaffold import pack_entries
from helpers.config.experiments import check_value, setting
from helpers.core.caches import NODES
from helpers.core.precision import make_scaler
from helpers.core.settings import node_state_root
from helpers.data.datasets import Data, load_data, pick_device
from helpers.editing.calibration import score_pool
from helpers.editing.step0 import head_fedavg_config, ridge_statistics
from helpers.federated.clients import client_lr, client_shards, client_update
from helpers.federated.evaluation import eval_parts, split_tensors
from helpers.federated.interference import probe_predictions
from helpers.federated.stragglers import local_steps
from helpers.flower.replies import FAULT_ENV, corrupt, injected_fault
from helpers.flower.server import MISSING  # imported first: says what to install when flwr is missing
from helpers.training.features import backbone_features, uses_cached_features
from helpers.training.loop import evaluation_sums
from helpers.training.resumable import build_seeded_model
from helpers.training.runs import run_id

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
except ImportError as exc:
    raise ImportError(f"{MISSING} ({exc})") from None


def with_node_overrides(config: dict, context: Context) -> dict:
    """A node's own `device` and `data-root` (--node-config) replace the run's: neither changes the results."""
    local = {"device": context.node_config.get("device"), "data_root": context.node_config.get("data-root")}
    return {**config, **{k: check_value(k, v) for k, v in local.items() if v is not None}}


def node_run_config(run: str, config: dict) -> dict:
    """The config of the server's run `run`: this node's run, or (sparse, step0="sgd") its step-0 head run."""
    if run == run_id(config):
        return config
    if "sparsity" in config and config.get("step0") == "sgd" and run == run_id(head := head_fedavg_config(config)):
        return head
    raise ValueError(
        f"this node's config is run {run_id(config)}, the server's run {run}: "
        "give every node the same run config (and FLME_PROFILE)"
    )


def node_inputs(config: dict) -> tuple[Data, nn.Module, list[Tensor]]:
    """This process's data, model and client shards for `config` (built once; one config at a time). A node holds
    its training data: FLME_NO_TRAIN_DATA (the server's switch) does not apply."""

    def build() -> tuple[Data, nn.Module, list[Tensor]]:
        device = pick_device(config["device"])
        data, model = load_data(config, device, holder=True), build_seeded_model(config, device)
        if config["compile"]:
            model.compile()  # as the sequential engine trains its clients
        return data, model, client_shards(config, data)

    return NODES.get(json.dumps(config, sort_keys=True), build)


def client_inputs(config: dict, client: int) -> tuple[nn.Module, Data, Tensor]:
    """What client k trains: (model, data, its shard); for a head-only run on cached features, (model.head, the
    features of its own shard, their positions): the same rows as the server's cached features of the split."""
    data, model, shards = node_inputs(config)
    shard = shards[client].to(data.train_y.device)
    if not uses_cached_features(config):
        return model, data, shard
    x = backbone_features(model, data.train_x[shard], img_size=config["img_size"],
                          batch_size=config["eval_batch_size"], amp=setting(config, "amp"))  # fmt: skip
    own = Data(x, data.train_y[shard], data.val_x, data.val_y, data.test_x, data.test_y)
    return model.head, own, torch.arange(len(shard), device=shard.device)


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
    node_inputs(with_node_overrides(config, context))  # load the data and model now rather than in the first round
    return RecordDict({"node": ConfigRecord({"partition": node_partition(context, config)})})


def node_size(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """n_k: the size of this client's shard."""
    return RecordDict({"result": ConfigRecord({"size": len(node_inputs(config)[2][client])})})


def node_setup(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """Keep the run's frozen weights and this client's mask for its rounds."""
    run = run_id(config)
    for key in ("frozen", "masks"):
        if key in content:
            context.state[f"{key}@{run}"] = content[key]
    return RecordDict({"result": ConfigRecord({"client": client})})


def node_score(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """This client's summed sensitivity scores on the server's model (calibration round `call`)."""
    data, model, shards = node_inputs(config)
    load_weights(model, content["model"].to_torch_state_dict(), {})
    key, call = ("client", client), int(content["task"]["call"])
    scores, samples = score_pool(model, data, shards[client], key, call, config)
    return RecordDict({"scores": ArrayRecord(scores), "result": ConfigRecord({"samples": samples})})


def node_ridge(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """This client's ridge statistics (X_k^T X_k, X_k^T Y_k) of its own shard's features on the server's model."""
    data, model, shards = node_inputs(config)
    load_weights(model, content["model"].to_torch_state_dict(), {})
    shard = shards[client].to(data.train_y.device)
    x = backbone_features(model, data.train_x[shard], img_size=config["img_size"],
                          batch_size=config["eval_batch_size"], amp=setting(config, "amp"))  # fmt: skip
    xtx, xty = ridge_statistics(x, data.train_y[shard])
    return RecordDict({"stats": ArrayRecord({"xtx": xtx, "xty": xty})})


def node_train(content: RecordDict, context: Context, config: dict) -> RecordDict:
    """Client k's round on its node: the round's global weights in, client_update, its trained weights out."""
    _, config, client = node_task(content, context, config)
    rnd, run = int(content["task"]["round"]), run_id(config)
    fault = injected_fault(rnd, client)
    if fault == "raise":
        raise RuntimeError(f"fault injected by {FAULT_ENV} (tests only)")
    if f"frozen@{run}" not in context.state:
        raise RuntimeError("this node has no setup for the run (was it restarted?): rerun the run to resume it")
    model, data, shard = client_inputs(config, client)
    device = shard.device
    load_weights(model, content["weights"].to_torch_state_dict(), context.state[f"frozen@{run}"].to_torch_state_dict())
    masks = None
    if f"masks@{run}" in context.state:
        masks = {n: m.to(device) for n, m in context.state[f"masks@{run}"].to_torch_state_dict().items()}
    scaler = make_scaler(device, setting(config, "amp"))
    if scaler is not None:
        scaler.load_state_dict(dict(content["scaler"]))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    start = [p.detach().clone() for p in params]  # the round's global weights (FedProx's anchor)
    aligned = aligned_masks(names, masks)
    algorithm = node_algorithm(content, context, config, client, dict(zip(names, start, strict=True)), aligned)
    side = algorithm.client_side(rnd, client, start, aligned, client_lr(config, rnd), local_steps(config, rnd, client))
    loss = client_update(model, data, shard, rnd, client, config, masks=masks, scaler=scaler, side=side)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if fault is not None:
        trained = corrupt(trained, fault)
    reply = RecordDict({"weights": ArrayRecord(trained), "result": ConfigRecord({"client": client, "loss": loss})})
    if scaler is not None:
        reply["scaler"] = ConfigRecord(scaler.state_dict())
    if setting(config, "interference_probe"):  # kept here until the round's interference message
        probe = probe_predictions(model, data, shard, client, config)
        context.state[f"probe@{run}"] = ArrayRecord({"predictions": probe})
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
    algorithm = make_algorithm(config)
    if "algorithm" in content:
        packed = content["algorithm"].to_torch_state_dict()
        tensors = [packed[n].to(w.device) for n, w in start.items()]
        folder = node_state_dir(context, str(content["task"]["run"]), client)
        algorithm.from_server(tensors, dict(content["numbers"]), list(start.values()), masks, folder)
    return algorithm


def node_state_dir(context: Context, run: str, client: int) -> Path:
    """Where this node keeps client `client`'s state of run `run` between rounds, on its own disk (a restarted node
    finds it): --node-config state-dir, else $FLME_NODE_STATE, else ~/.cache/flme/flower-nodes."""
    root = context.node_config.get("state-dir") or node_state_root()
    return Path(str(root)).expanduser() / run / f"client_{client}"


def node_close(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """The run is done: drop this client's state of it (and the run's folder once no client of it is left)."""
    folder = node_state_dir(context, str(content["task"]["run"]), client)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # only if empty: the nodes of other clients may still hold theirs
    except OSError:
        pass
    return RecordDict({"result": ConfigRecord({"client": client})})


def node_evaluate(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """This client's (summed loss, correct, samples) on its part of the val or test split (evaluation=clients);
    a head-only run on cached features sends the head, evaluated on the backbone features of the part."""
    data, model, _ = node_inputs(config)
    x, y = split_tensors(data, str(content["task"]["split"]))
    part = eval_parts(len(y), config["num_clients"])[client].to(y.device)
    net = model.head if uses_cached_features(config) else model
    load_weights(net, content["model"].to_torch_state_dict(), {})
    opts = dict(img_size=config["img_size"], batch_size=config["eval_batch_size"], amp=setting(config, "amp"))
    x = backbone_features(model, x[part], **opts) if net is model.head else x[part]
    loss, correct, n = evaluation_sums(net, x, y[part], **opts)
    return RecordDict({"result": ConfigRecord({"loss": loss, "correct": correct, "samples": n})})


def node_interference(content: RecordDict, context: Context, config: dict, client: int) -> RecordDict:
    """How many of its probe images this client's trained model (its predictions kept since its train message) and
    the new global model disagree on (helpers.federated.interference); the kept predictions are dropped."""
    key = f"probe@{run_id(config)}"
    if key not in context.state:
        raise RuntimeError(
            "this node kept no probe predictions for the run (was it restarted?): set interference_probe=0"
        )
    own = context.state[key].to_torch_state_dict()["predictions"]
    del context.state[key]
    model, data, shard = client_inputs(config, client)
    load_weights(model, content["model"].to_torch_state_dict(), {})
    disagree = int((probe_predictions(model, data, shard, client, config).to(own.device) != own).sum())
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
