"""The commands of a real Flower federation (docs/flower.md): SuperLink with TLS and SuperNode authentication, node
registration, SuperNodes holding the CA and their own key, and the `flwr` connection that trusts the CA. Strings only:
`python -m helpers flower --print-flwr-run NAME` prints them, tests/test_flower_federation.py runs them. Also the
federation's poll intervals: the SuperExecs' (set in the printed script) and the ServerApp's (FLME_FLOWER_POLL_S)."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from helpers.core.settings import env_value
from helpers.data.datasets import NO_TRAIN_DATA_ENV

DEFAULT_ADDRESS = "SERVER:8000"  # flwr 1.41's SuperLink serves every API on one port (--port, default 8000)
DEFAULT_CREDENTIALS = Path.home() / ".flme" / "credentials"  # outside the repository: keys never sit beside code
# the credentials folder, one folder per destination (helpers.flower.credentials writes them)
CA_DIR, LINK_DIR, NODES_DIR = "ca", "superlink", "nodes"
# A SuperExec (the SuperLink's and every SuperNode's) looks for a new task every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
# seconds, 1 s by default (flwr/supercore/superexec/run_superexec.py:48-51,280): a SuperNode's ClientApp process for a
# message then starts up to 1 s late, every message. At 0.2 s, up to 0.2 s late, for a local request every 0.2 s
# (measured on an idle 2-core federation: the SuperLink, 2 SuperNodes and their SuperExecs used 2.1 CPU seconds per
# 30 s, against 0.7 at 1 s and 4 at 0.1 s).
SUPEREXEC_POLL = ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
POLL_ENV = "FLME_FLOWER_POLL_S"  # seconds between the ServerApp's pulls for replies: helpers.core.settings reads it
DEFAULT_POLL_S = 0.2
TRY_OUT = (
    "local try-out only: no TLS and no node authentication, anyone who reaches the port can join and read every update"
)


def check_address(address: str) -> str:
    """A SuperLink address HOST:PORT (IPv6 in brackets), or ValueError naming --superlink-address."""
    if not re.fullmatch(r"[A-Za-z0-9.-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", address):
        raise ValueError(f"--superlink-address {address!r} is invalid: must be HOST:PORT, e.g. server.lab:8000")
    return address


def poll_interval() -> float:
    """Seconds between the server's pulls for replies: $FLME_FLOWER_POLL_S, default 0.2 (not part of the run id)."""
    raw = env_value(POLL_ENV) or str(DEFAULT_POLL_S)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.01 <= value <= 60:  # NaN fails too
        raise ValueError(f"{POLL_ENV}={raw!r} is invalid: must be a number of seconds in [0.01, 60]")
    return value


def superlink_command(credentials: Path, *, insecure: bool = False) -> list[str]:
    """flower-superlink with TLS (the private CA's certificate for its host names) accepting registered nodes only."""
    link = credentials / LINK_DIR
    security = ["--insecure"] if insecure else [
        "--ssl-ca-certfile", str(link / "ca.crt"), "--ssl-certfile", str(link / "superlink.crt"),
        "--ssl-keyfile", str(link / "superlink.key"), "--enable-supernode-auth"]  # fmt: skip
    return ["flower-superlink", *security, "--disable-runtime-dependency-installation"]


def register_command(credentials: Path, node: int | str, connection: str) -> list[str]:
    """`flwr supernode register`: the SuperLink accepts the node holding node-<k>.key from now on."""
    return ["flwr", "supernode", "register", str(credentials / NODES_DIR / f"node-{node}.pub"), connection]


def supernode_command(
    credentials: Path, node: int | str, num_nodes: int, address: str, *, insecure: bool = False
) -> list[str]:
    """flower-supernode for client `node`: trusts only the federation's CA, signs in with its own private key."""
    security = ["--insecure"] if insecure else [
        "--root-certificates", str(credentials / NODES_DIR / "ca.crt"),
        "--auth-supernode-private-key", str(credentials / NODES_DIR / f"node-{node}.key")]  # fmt: skip
    config = f"partition-id={node} num-partitions={num_nodes}"
    return ["flower-supernode", *security, "--superlink", address, "--node-config", config]


def connection_toml(name: str, address: str, credentials: Path, *, insecure: bool = False) -> str:
    """The `flwr` CLI's connection in $FLWR_HOME/config.toml: TLS verified against the federation's CA."""
    trust = "insecure = true" if insecure else f'root-certificates = "{credentials / CA_DIR / "ca.crt"}"'
    return f'[superlink]\ndefault = "{name}"\n[superlink.{name}]\naddress = "{address}"\n{trust}\n'


def federation_script(
    run_command: list[str], num_nodes: int, credentials: Path, address: str = DEFAULT_ADDRESS, *, insecure: bool = False
) -> str:
    """The whole walk-through as a bash script, one part per machine, for the `flwr run` command `run_command`
    (its connection name is run_command[3])."""
    name, host, last, join = run_command[3], address.rsplit(":", 1)[0].strip("[]"), num_nodes - 1, shlex.join
    step = iter(range(1, 7))
    lines = [f"# {TRY_OUT}"] if insecure else [
        f"# {next(step)}. coordinator, once: the credentials (ca/ stays here, offline; here the node keys are made "
        "centrally: alternatively each node runs `python -m helpers.credentials --node-key DIR` and sends only "
        "DIR/node.pub)",
        join(["python", "-m", "helpers.flower.credentials", "--out", str(credentials), "--host", host,
              "--nodes", str(num_nodes)])]  # fmt: skip
    files = "" if insecure else f"its folder {LINK_DIR}/: ca.crt, superlink.crt, superlink.key; "
    poll = "=".join(SUPEREXEC_POLL)
    lines += [
        f"# {next(step)}. server machine ({files}its ServerApp cannot read the train split)",
        f"{NO_TRAIN_DATA_ENV}=1 {poll} {join(superlink_command(credentials, insecure=insecure))}",
        f"# {next(step)}. wherever flwr runs: this connection in $FLWR_HOME/config.toml (default ~/.flwr)",
        *(f"#   {line}" for line in connection_toml(name, address, credentials, insecure=insecure).splitlines()),
    ]
    if not insecure:
        pub = f"{shlex.quote(str(credentials / NODES_DIR))}/node-$k.pub"
        lines += [
            f"# {next(step)}. register every node's public key (the SuperLink refuses a node not registered)",
            f"for k in $(seq 0 {last}); do flwr supernode register {pub} {shlex.quote(name)}; done",
        ]
    files = "" if insecure else f"{NODES_DIR}/ca.crt and its own {NODES_DIR}/node-k.key; "
    lines += [
        f"# {next(step)}. node machine k = 0..{last} ({files}shown for k=0; distinct --port for several on a host)",
        f"#    export {poll} first: each message's ClientApp process then starts within 0.2 s, not 1 s",
        join(supernode_command(credentials, 0, num_nodes, address, insecure=insecure)),
        f"# {next(step)}. anywhere with this repository and the connection above",
        join(run_command),
    ]
    return "\n".join(lines)
