"""FedAvg and sparse FedAvg as Flower apps (§12): a ServerApp and a ClientApp built from one validated config.

The server is the project's own runner (run_fedavg / run_sparse_fedavg: run folder, step 0 and calibration,
checkpoints, evaluation, metrics.csv) with one change at the one engine seam, fedavg_round's train_clients: each
round's clients train on Flower nodes, and so does every other step that reads training data (shard sizes, step 0,
calibration scores: helpers.flower.server, both halves of each message). Node partition-id k is client k; its ClientApp
loads the config's data, takes shard k (a pure function of the seed) and runs client_update, the same J steps as the
sequential engine. Weights travel as the trainable parameters only; the frozen ones (the step-0 head) and the node's
mask are sent once, at the first round.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from helpers.config.experiments import make_config, setting
from helpers.config.parsing import parse_sets
from helpers.core.settings import REPO
from helpers.flower import (
    timing as flower_timing,  # first: its import time marks where a ClientApp process starts importing ours
)
from helpers.flower.node import node_query, node_train
from helpers.flower.server import MISSING, NodeEngine, exchange, reply_content  # say what to install if flwr is missing
from helpers.training.runs import Run, open_run, run_id

try:  # helpers.flower.server has already said what to install if flwr is missing, unless it was imported before
    from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:
    raise ImportError(f"{MISSING} ({exc})") from None

EXPERIMENTS_ON_FLOWER = ("fedavg", "sparse_fedavg")
NODE_WAIT_S = 300.0  # how long the server waits for num_clients nodes to connect
# One CPU per simulated client: Ray then runs torch with one thread, like the test suite, for equal floats.
BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"logging_level": "ERROR", "log_to_driver": False},
}
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


def federated_runner(experiment: str) -> Callable[..., Run]:
    """run_fedavg or run_sparse_fedavg: imported when a server needs one (a ClientApp process never does)."""
    if check_experiment(experiment) == "fedavg":
        from helpers.federated.rounds import run_fedavg  # lazy: ClientApps import this module

        return run_fedavg
    from helpers.editing.sparse_runs import run_sparse_fedavg  # lazy: ClientApps import this module

    return run_sparse_fedavg


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


# ----------------------------------------------------------------------------- the apps


def flower_apps(
    config: dict,
    run_root: str | Path | None = None,
    *,
    progress: bool = False,
    outcome: dict | None = None,
    client_mods: Sequence[Callable] = (),
) -> tuple[ServerApp, ClientApp]:
    """A ServerApp and a ClientApp for one validated config. The server puts its Run (or its exception) into
    `outcome`: Flower's simulation swallows some ways a server ends. `client_mods`: Flower mods around every message
    a node handles (the tests' fault injection)."""
    return _apps(lambda context: config, lambda context: run_root, progress, outcome, client_mods)


def _apps(
    config_of: Callable[[Context], dict],
    run_root_of: Callable[[Context], str | Path | None],
    progress: bool = False,
    outcome: dict | None = None,
    client_mods: Sequence[Callable] = (),
) -> tuple[ServerApp, ClientApp]:
    # The client handlers are pickled for every message: they capture config_of only (and it a config dict).
    server_app, client_app = ServerApp(), ClientApp(mods=list(client_mods))
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


def run_flower(
    config: dict, *, run_root: str | Path | None = None, progress: bool = True, client_mods: Sequence[Callable] = ()
) -> Run:
    """Run (or resume, or skip if done) a fedavg / sparse_fedavg run in Flower's simulation engine on this
    machine, one simulated node per client; same run folder and metrics as the sequential engine (`client_mods`:
    flower_apps')."""
    config = flower_config(config)
    run = open_run(experiment_of(config), config, run_root)
    if run.done:  # no need to start Ray: the runner returns the finished run before any client trains
        from helpers.federated.rounds import train_in_turn  # lazy: ClientApps import this module

        runner = federated_runner(run.experiment)
        return runner(config, run_root=run_root, progress=False, train_clients=train_in_turn)
    outcome: dict = {}
    server, client = flower_apps(config, run_root, progress=progress, outcome=outcome, client_mods=client_mods)
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
    runner, engine = federated_runner(experiment_of(config)), NodeEngine(grid, nodes)
    run = runner(config, run_root=run_root, progress=progress, train_clients=engine)
    if run.done:  # the nodes drop their cache of the run and what only a resume needs (SCAFFOLD's c_i)
        engine.close(config)
    return run


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
    messages = [Message(hello, dst_node_id=n, message_type=MessageType.QUERY) for n in ids]
    replies = exchange(grid, messages, setting(config, "node_timeout_s") or None)  # a silent node stops the run
    nodes: dict[int, int] = {}
    for n in ids:
        partition = int(reply_content(replies.get(n), f"Flower node {n}")["node"]["partition"])
        if partition in nodes:
            raise RuntimeError(f"Flower nodes {nodes[partition]} and {n} both have partition-id={partition}")
        nodes[partition] = n
    return nodes


def _reply(msg: Message, handler: Callable[..., RecordDict], *args) -> Message:
    """The handler's content as the reply, or its exception as an error reply naming its type."""
    flower_timing.mark_handler(msg.metadata.message_id)
    try:
        reply = Message(handler(*args), reply_to=msg)
        flower_timing.mark("replied", id=msg.metadata.message_id)
        return reply
    except Exception as exc:
        log.exception("client failed")  # the node's log keeps the traceback
        reason = f"{type(exc).__name__}: {exc}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
