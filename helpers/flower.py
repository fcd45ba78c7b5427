"""FedAvg and sparse FedAvg as Flower apps (§12): a ServerApp and a ClientApp built from one validated config.

The server is the project's own runner (run_fedavg / run_sparse_fedavg: run folder, step 0 and calibration,
checkpoints, evaluation, metrics.csv) with one change at the one engine seam, fedavg_round's train_clients: each
round's clients train on Flower nodes. Node partition-id k is client k; its ClientApp loads the config's data, takes
shard k (a pure function of the seed) and runs client_update, the same J steps as the sequential engine. Weights
travel as the trainable parameters only; the frozen ones (the step-0 head) and the node's mask are sent once, at the
first round.

run_flower drives Flower's simulation in-process; flwr_run_command gives the `flwr run` command (Flower's CLI, its
local simulation or a real federation) for the same config. Flower is optional (requirements-flower.txt); nothing
else in helpers imports this module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from helpers.algorithm import aligned_masks
from helpers.algorithms import make_algorithm
from helpers.caches import NODES
from helpers.config import REPO, check_value, make_config, parse_sets, setting
from helpers.data import Data
from helpers.fedavg import (
    ClientResult,
    TrainClients,
    client_lr,
    client_shards,
    client_update,
    run_fedavg,
    train_in_turn,
)
from helpers.masks import Masks
from helpers.precision import make_scaler
from helpers.resumable import run_inputs
from helpers.runs import Run, open_run, run_id
from helpers.sparse_runs import run_sparse_fedavg
from helpers.stragglers import local_steps
from helpers.train import NonFiniteLossError

MISSING = "Flower is not installed: pip install -r requirements-flower.txt"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported; this machine may be offline
try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:
    raise ImportError(f"{MISSING} ({exc})") from None

EXPERIMENTS_ON_FLOWER = ("fedavg", "sparse_fedavg")
FEDERATED_RUNNERS = {"fedavg": run_fedavg, "sparse_fedavg": run_sparse_fedavg}
NODE_WAIT_S = 300.0  # how long the server waits for num_clients nodes to connect
# Test-only fault injection: "ROUND:CLIENT" (1-based round) makes that client raise. An environment variable,
# because Flower's simulation runs clients in Ray worker processes (they inherit the environment; patches do not).
FAULT_ENV = "FLME_FLOWER_FAULT"
# One CPU per simulated client: Ray then runs torch with one thread, like the test suite, for equal floats.
BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"logging_level": "ERROR", "log_to_driver": False},
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


def flower_config(config: Mapping, experiment: str | None = None) -> dict:
    """`config` (full or overrides) validated for Flower, engine="flower"; raises ValueError before compute."""
    experiment = check_experiment(experiment or experiment_of(config))
    config = make_config(experiment, **{**config, "engine": "flower"})
    if config.get("train_mode") == "head":
        raise ValueError(
            "train_mode='head' is invalid with engine='flower': head-only runs train on backbone features "
            "cached on the server; use engine='sequential' or train_mode='full'"
        )
    return config


def check_experiment(experiment: str) -> str:
    if experiment not in EXPERIMENTS_ON_FLOWER:
        raise ValueError(f"experiment={experiment!r} is invalid on Flower: must be one of fedavg, sparse_fedavg")
    return experiment


def experiment_of(config: Mapping) -> str:
    """sparse_fedavg for configs with a sparsity, else fedavg."""
    return "sparse_fedavg" if "sparsity" in config else "fedavg"


def deployed_config(run_config: Mapping) -> dict:
    """The config of a `flwr run` deployment from its run config (pyproject.toml's [tool.flwr.app.config] and
    --run-config): `experiment`, `profile`, and `set`, "name=value ..." as `python -m helpers run --set` takes."""
    experiment = check_experiment(str(run_config.get("experiment") or "fedavg"))
    sets = parse_sets(str(run_config.get("set", "")).split(), experiment)
    return flower_config({**sets, "profile": run_config.get("profile") or None}, experiment)


APP_DIR = REPO  # the Flower app: pyproject.toml's [tool.flwr.app]


def flwr_run_command(config: Mapping, run_root: str | Path, *, superlink: str = "local") -> list[str]:
    """The `flwr run` command (Flower's CLI) that runs `config` with these apps on a SuperLink connection:
    "local" is Flower's managed local simulation, num_clients nodes of one CPU each. Its run config gives
    `config` back through deployed_config: `set` holds every value that differs from the profile's default."""
    config = flower_config(config)
    experiment, root = experiment_of(config), str(Path(run_root).resolve())
    defaults = make_config(experiment, config["profile"])
    sets = []
    for name, value in config.items():
        if name in ("engine", "profile") or value == defaults.get(name):
            continue
        text = repr(value) if isinstance(value, float) else str(value)
        if not isinstance(value, (str, int, float)) or re.search(r'[\s"\\]', text):
            raise ValueError(f"{name}={value!r} cannot travel in flwr run's run config: no spaces, quotes or lists")
        sets.append(f"{name}={text}")
    if re.search(r'["\\]', root):
        raise ValueError(f"run_root={root!r} cannot travel in flwr run's run config: no quotes or backslashes")
    run_config = f'experiment="{experiment}" profile="{config["profile"]}" set="{" ".join(sets)}" run-root="{root}"'
    command = ["flwr", "run", str(APP_DIR), superlink, "--stream", "--run-config", run_config]
    if superlink == "local":
        federation = f"num-supernodes={config['num_clients']} client-resources-num-cpus=1"
        command[5:5] = ["--federation-config", federation]
    return command


def with_node_overrides(config: dict, context: Context) -> dict:
    """A node's own `device` and `data-root` (--node-config) replace the run's: neither changes the results."""
    local = {"device": context.node_config.get("device"), "data_root": context.node_config.get("data-root")}
    return {**config, **{k: check_value(k, v) for k, v in local.items() if v is not None}}


# ----------------------------------------------------------------------------- the apps


def flower_apps(
    config: dict, run_root: str | Path | None = None, *, progress: bool = False, outcome: dict | None = None
) -> tuple[ServerApp, ClientApp]:
    """A ServerApp and a ClientApp for one validated config. The server puts its Run (or its exception) into
    `outcome`: Flower's simulation swallows some ways a server ends."""
    return _apps(lambda context: config, lambda context: run_root, progress, outcome)


def _apps(
    config_of: Callable[[Context], dict],
    run_root_of: Callable[[Context], str | Path | None],
    progress: bool = False,
    outcome: dict | None = None,
) -> tuple[ServerApp, ClientApp]:
    # The client handlers are pickled for every message: they capture config_of only (and it a config dict).
    server_app, client_app = ServerApp(), ClientApp()
    outcome = {} if outcome is None else outcome

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["run"] = serve(grid, config_of(context), run_root_of(context), progress=progress)
        except BaseException as exc:
            outcome["error"] = exc
            raise

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return _reply(msg, node_query, msg.content, context, config_of(context))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _reply(msg, node_train, msg.content, context, config_of(context))

    return server_app, client_app


# For `flwr run` on a real federation (pyproject.toml names these): the config comes from the run config.
# Two plain assignments: `flwr run` finds the components by reading this file's syntax tree.
_deployed = _apps(
    lambda context: deployed_config(context.run_config), lambda context: context.run_config.get("run-root") or None
)
server_app = _deployed[0]
client_app = _deployed[1]


def run_flower(config: dict, *, run_root: str | Path | None = None, progress: bool = True) -> Run:
    """Run (or resume, or skip if done) a fedavg / sparse_fedavg run in Flower's simulation engine on this
    machine, one simulated node per client; same run folder and metrics as the sequential engine."""
    config = flower_config(config)
    run = open_run(experiment_of(config), config, run_root)
    if run.done:  # no need to start Ray: the runner returns the finished run before any client trains
        return FEDERATED_RUNNERS[run.experiment](config, run_root=run_root, progress=False, train_clients=train_in_turn)
    outcome: dict = {}
    server, client = flower_apps(config, run_root, progress=progress, outcome=outcome)
    try:
        simulate(server, client, config["num_clients"])
    except Exception:
        if "error" not in outcome:
            raise
    if "error" in outcome:
        raise outcome["error"]
    if "run" not in outcome:
        raise RuntimeError(f"Flower's simulation ended before the server finished run {run.dir}; rerun to resume")
    return outcome["run"]


def simulate(server: ServerApp, client: ClientApp, num_nodes: int) -> None:
    """Flower's simulation engine (Ray) with `num_nodes` nodes. run_simulation is deprecated in flwr 1.41 in
    favour of `flwr run`, but it is the in-process way to drive these apps: its notice is silenced."""
    if importlib.util.find_spec("ray") is None:  # run_simulation would exit the process instead
        raise ImportError(f"Flower's simulation engine needs ray: {MISSING.split(': ')[1]}")
    from flwr.simulation import run_simulation

    # 0: Ray leaves CUDA_VISIBLE_DEVICES alone for workers without a GPU share (and stops warning about it).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_log, level = logging.getLogger("flwr"), logging.getLogger("flwr").level
    pythonpath = os.environ.get("PYTHONPATH")
    flwr_log.setLevel(logging.ERROR)
    try:
        backend = json.loads(json.dumps(BACKEND))  # Flower edits it in place
        run_simulation(server, client, num_supernodes=num_nodes, backend_config=backend)
    finally:
        flwr_log.setLevel(level)
        if pythonpath is None:  # run_simulation overwrites it for its workers
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


# ----------------------------------------------------------------------------- server side


def serve(grid: Grid, config: dict, run_root: str | Path | None = None, *, progress: bool = False) -> Run:
    """The ServerApp's work: the project's runner, each round's clients trained on the Flower nodes."""
    nodes = connect_nodes(grid, config)  # before step 0 and round 1: a missing node fails fast
    train_clients = node_trainer(grid, nodes)
    runner = FEDERATED_RUNNERS[experiment_of(config)]
    return runner(config, run_root=run_root, progress=progress, train_clients=train_clients)


def node_trainer(grid: Grid, nodes: dict[int, int]) -> TrainClients:
    """fedavg_round's train_clients on Flower nodes (`nodes`: client id -> node id): at the first round it sends
    every node the frozen weights and its mask; every round, the sampled clients train on their nodes."""
    ready = []  # set up (once per run: a resumed run has new nodes)

    # fedavg_round's train_in_turn signature; data and shards live on the nodes
    # (the algorithm's server step runs in fedavg_round on the server, its client side on the nodes: node_train)
    def train_clients(
        model, data, shards, rnd, clients, config, *, masks, start, scaler, algorithm
    ) -> Iterator[ClientResult]:
        if not ready:
            send_setup(grid, nodes, model, masks, config)
            ready.append(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        weights = ArrayRecord(dict(zip(names, start, strict=True)))
        task = {"run": run_id(config), "round": rnd}
        scaler_state = ConfigRecord(scaler.state_dict()) if scaler is not None else None
        messages = []
        for k in clients:
            content = RecordDict({"weights": weights, "task": ConfigRecord({**task, "client": k})})
            if scaler_state is not None:  # each client starts from the round's GradScaler state
                content["scaler"] = scaler_state
            messages.append(Message(content, dst_node_id=nodes[k], message_type=MessageType.TRAIN, group_id=str(rnd)))
        replies = exchange(grid, messages)
        # every client's error is raised before the first is summed
        contents = [reply_content(replies.get(nodes[k]), f"round {rnd + 1}, client {k}") for k in clients]
        device = start[0].device
        for k, content in zip(clients, contents, strict=True):
            trained = content["weights"].to_torch_state_dict()
            own = masks.of_client(k) if masks is not None else None
            state = dict(content["scaler"]) if "scaler" in content else None
            loss = float(content["result"]["loss"])
            yield ClientResult(k, [trained[n].to(device) for n in names], loss, own, state)

    return train_clients


def connect_nodes(grid: Grid, config: dict) -> dict[int, int]:
    """client id -> node id: waits for num_clients nodes, then asks each for its partition-id."""
    k = config["num_clients"]
    deadline = time.monotonic() + NODE_WAIT_S
    while len(ids := sorted(grid.get_node_ids())) < k:  # nodes register one by one after the server starts
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{len(ids)} Flower nodes connected in {NODE_WAIT_S:.0f} s, num_clients={k} needed: start one "
                f"SuperNode per client, --node-config 'partition-id=<0..{k - 1}> num-partitions={k}'"
            )
        time.sleep(0.1)
    hello = RecordDict({"hello": ConfigRecord({"run": run_id(config)})})
    replies = exchange(grid, [Message(hello, dst_node_id=n, message_type=MessageType.QUERY) for n in ids])
    nodes: dict[int, int] = {}
    for n in ids:
        partition = int(reply_content(replies.get(n), f"Flower node {n}")["node"]["partition"])
        if partition in nodes:
            raise RuntimeError(f"Flower nodes {nodes[partition]} and {n} both have partition-id={partition}")
        nodes[partition] = n
    return nodes


def send_setup(grid: Grid, nodes: dict[int, int], model: nn.Module, masks: Masks | None, config: dict) -> None:
    """Once per run and node: the frozen parameters (the step-0 head of sparse runs) and the client's mask."""
    frozen = ArrayRecord({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    shared = ArrayRecord(dict(masks.shared)) if masks is not None and not masks.local else None
    messages = []
    for k, node in sorted(nodes.items()):
        content = RecordDict({"setup": ConfigRecord({"run": run_id(config)}), "frozen": frozen})
        if masks is not None:  # the shared mask's record, or the client's own
            content["masks"] = shared if shared is not None else ArrayRecord(dict(masks.of_client(k)))
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.QUERY))
    replies = exchange(grid, messages)
    for k, node in sorted(nodes.items()):
        reply_content(replies.get(node), f"setup of client {k}")


def exchange(grid: Grid, messages: list[Message]) -> dict[int, Message]:
    """Send, wait for every reply; node id -> reply (replies come back in any order)."""
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}


def reply_content(reply: Message | None, what: str) -> RecordDict:
    """A reply's content, or its error raised as "<what>: reason" (e.g. "round 2, client 7: ..."); a client's
    NonFiniteLossError stays one (client_update named the round and client)."""
    if reply is None:
        raise RuntimeError(f"{what}: no reply from its Flower node")
    if not reply.has_error():
        return reply.content
    reason = ANSI.sub("", reply.error.reason)
    if reason.startswith(f"{NonFiniteLossError.__name__}: "):
        raise NonFiniteLossError(reason.split(": ", 1)[1])
    raise RuntimeError(f"{what}: {reason}")


# ----------------------------------------------------------------------------- node side


def node_inputs(config: dict) -> tuple[Data, nn.Module, list[Tensor]]:
    """This process's data, model and client shards for `config` (built once; one config at a time)."""

    def build() -> tuple[Data, nn.Module, list[Tensor]]:
        data, model = run_inputs(config)
        if config["compile"]:
            model.compile()  # as the sequential engine trains its clients
        return data, model, client_shards(config, data)

    return NODES.get(json.dumps(config, sort_keys=True), build)


def node_partition(context: Context, config: dict) -> int:
    """This node's client id: its partition-id, checked against num_clients."""
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < config["num_clients"]:
        raise ValueError(f"partition-id={partition} is invalid: must be in [0, {config['num_clients'] - 1}]")
    return partition


def node_query(content: RecordDict, context: Context, config: dict) -> RecordDict:
    """`hello`: this node's partition (= client id). `setup`: keep the run's frozen weights and mask."""
    check_run(content["setup" if "setup" in content else "hello"], config)
    if "hello" in content:  # load the data and model now rather than in the first round
        node_inputs(with_node_overrides(config, context))
    for key in ("setup", "frozen", "masks"):
        if key in content:
            context.state[key] = content[key]
    return RecordDict({"node": ConfigRecord({"partition": node_partition(context, config)})})


def node_train(content: RecordDict, context: Context, config: dict) -> RecordDict:
    """Client k's round on its node: the round's global weights in, client_update, its trained weights out."""
    task = content["task"]
    rnd, client = int(task["round"]), int(task["client"])
    check_run(task, config)
    if os.environ.get(FAULT_ENV) == f"{rnd + 1}:{client}":
        raise RuntimeError(f"fault injected by {FAULT_ENV} (tests only)")
    if client != node_partition(context, config):
        raise ValueError(f"client {client} was sent to the node of partition-id={node_partition(context, config)}")
    if "setup" not in context.state:
        raise RuntimeError("this node has no setup for the run (was it restarted?): rerun the run to resume it")
    config = with_node_overrides(config, context)
    data, model, shards = node_inputs(config)
    device = data.train_x.device
    load_weights(model, content["weights"].to_torch_state_dict(), context.state["frozen"].to_torch_state_dict())
    masks = None
    if "masks" in context.state:
        masks = {n: m.to(device) for n, m in context.state["masks"].to_torch_state_dict().items()}
    scaler = make_scaler(device, setting(config, "amp"))
    if scaler is not None:
        scaler.load_state_dict(dict(content["scaler"]))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    start = [p.detach().clone() for p in params]  # the round's global weights (FedProx's anchor)
    side = make_algorithm(config).client_side(
        rnd, client, start, aligned_masks(names, masks), client_lr(config, rnd), local_steps(config, rnd, client)
    )
    loss = client_update(model, data, shards[client], rnd, client, config, masks=masks, scaler=scaler, side=side)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    reply = RecordDict({"weights": ArrayRecord(trained), "result": ConfigRecord({"client": client, "loss": loss})})
    if scaler is not None:
        reply["scaler"] = ConfigRecord(scaler.state_dict())
    return reply


@torch.no_grad()
def load_weights(model: nn.Module, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor]) -> None:
    """Every parameter from the round's weights (trainable) or the setup (frozen); the model is shared by the
    nodes a process serves, so nothing may be left from the node before."""
    for name, p in model.named_parameters():
        if name not in trainable and name not in frozen:
            raise ValueError(f"parameter {name} is neither in the round's weights nor in the setup")
        p.copy_(trainable[name] if name in trainable else frozen[name])
        p.requires_grad_(name in trainable)


def check_run(record: ConfigRecord, config: dict) -> None:
    """The server's run id must be this node's: the same config on every node."""
    if record["run"] != run_id(config):
        raise ValueError(
            f"this node's config is run {run_id(config)}, the server's run {record['run']}: "
            "give every node the same run config (and FLME_PROFILE)"
        )


def _reply(msg: Message, handler: Callable[..., RecordDict], *args) -> Message:
    """The handler's content as the reply, or its exception as an error reply naming its type."""
    try:
        return Message(handler(*args), reply_to=msg)
    except Exception as exc:
        log.exception("client failed")  # the node's log keeps the traceback
        reason = f"{type(exc).__name__}: {exc}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
