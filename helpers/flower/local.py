"""A secure Flower federation on this machine, started with the commands --print-flwr-run prints (flower.federation):
a SuperLink with TLS and --enable-supernode-auth whose ServerApp runs without training data, SuperNodes registered
with their own keys (each in its own session), `flwr run` trusting the federation's CA. Run by the benchmark
(ops.bench_federation) and tests/test_flower_federation.py. Every process's output goes to <root>/<name>.log, each
line prefixed with the Unix time it arrived (Flower's own log lines carry no time at its default level)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers.data.datasets import NO_TRAIN_DATA_ENV
from helpers.flower.federation import (
    SUPEREXEC_POLL,
    connection_toml,
    register_command,
    superlink_command,
    supernode_command,
)

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stamp_lines(source, log: Path) -> None:
    """Copy `source`'s lines to `log` as they come, each prefixed with time.time() (a thread per process)."""
    with open(log, "a") as out:
        for line in iter(source.readline, ""):
            out.write(f"{time.time():.3f} {line}")
            out.flush()


class LocalFederation:
    """A secure federation on localhost with `num_nodes` SuperNodes (partition-id k, key node-k) and one spare key
    pair (node-<num_nodes>) that is never registered. `env` is added to every process's environment (a name set to
    None is left out); the SuperLink and the SuperNodes get the printed script's FLWR_SUPEREXEC_TASK_POLL_INTERVAL
    unless `env` says otherwise."""

    def __init__(self, root: Path, num_nodes: int, env: dict[str, str] | None = None):
        from helpers.flower.credentials import make_credentials  # lazy: needs cryptography

        self.root, self.port, self.nodes, self.others, self.link = Path(root), free_port(), {}, [], None
        self.creds = self.root / "creds"
        make_credentials(self.creds, ["localhost", "127.0.0.1"], nodes=num_nodes + 1)
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                    "FLWR_HOME": str(self.root / "flwr-home"), "PYTHONUNBUFFERED": "1",
                    SUPEREXEC_POLL[0]: SUPEREXEC_POLL[1], **(env or {})}  # fmt: skip
        self.env.pop(NO_TRAIN_DATA_ENV, None)  # the nodes hold their data; only the server runs without
        self.env = {k: v for k, v in self.env.items() if v is not None}
        (self.root / "flwr-home").mkdir(parents=True)
        (self.root / "flwr-home" / "config.toml").write_text(connection_toml("fed", self.address, self.creds))

    def start_all(self, num_nodes: int, link_env: dict[str, str] | None = None, database: bool = False) -> None:
        """The SuperLink (with `link_env`; its state and objects in memory, as printed, or in an SQLite file with
        `database`), the nodes' registration, then the nodes (not awaited)."""
        command = [*superlink_command(self.creds), "--port", str(self.port)]
        command += ["--database", str(self.root / "link.db")] if database else []
        self.link = self.start(command, "link", {NO_TRAIN_DATA_ENV: "1", **(link_env or {})})
        deadline = time.monotonic() + 120
        while not self.listening():  # flwr run fails at once if the SuperLink is not up yet
            if time.monotonic() > deadline or self.link.poll() is not None:
                raise RuntimeError(f"the SuperLink did not start: {self.log('link')[-2000:]}")
            time.sleep(0.2)
        registering = [subprocess.Popen(register_command(self.creds, k, "fed"), env=self.env, cwd=self.root,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                       for k in range(num_nodes)]  # fmt: skip
        for register in registering:
            if register.wait(timeout=120) != 0:
                raise RuntimeError(f"flwr supernode register failed: {register.stdout.read()}")
        for k in range(num_nodes):  # they activate while the caller goes on
            self.launch(k, num_nodes)

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self, command: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}  # {name: None} leaves it out
        proc = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, cwd=self.root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        threading.Thread(target=stamp_lines, args=(proc.stdout, self.root / f"{name}.log"), daemon=True).start()
        return proc

    def start_node(self, k: int, num_nodes: int) -> None:
        """Node k, started and activated: a node killed a moment ago stays "online" at the SuperLink until its
        heartbeats lapse (about a minute), and its key is refused until then, so a refused start is retried."""
        self.launch(k, num_nodes)
        self.await_active(k, num_nodes)

    def launch(self, k: int, num_nodes: int) -> None:
        command = supernode_command(self.creds, k, num_nodes, self.address)
        if (log := self.root / f"node{k}.log").exists():  # await_active reads this start's log only
            log.replace(self.root / f"node{k}-before.log")
        self.nodes[k] = self.start([*command, "--port", str(free_port())], f"node{k}")

    def await_active(self, k: int, num_nodes: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "SuperNode ID:" not in self.log(f"node{k}"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode {k} did not activate: {self.log(f'node{k}')[-2000:]}")
            if self.nodes[k].poll() is not None:  # refused (still online after a kill) or failed: try again
                time.sleep(2)
                self.launch(k, num_nodes)
            time.sleep(0.2)

    def kill_node(self, k: int) -> None:
        os.killpg(self.nodes[k].pid, signal.SIGKILL)  # the SuperNode and the ClientApp it runs, mid-message
        self.nodes[k].wait()

    def run(self, config: dict, run_root: Path) -> subprocess.Popen:
        """`flwr run` of `config` on this federation, started (the caller waits)."""
        from helpers.flower.app import flwr_run_command  # lazy: needs flwr

        return self.start(flwr_run_command(config, run_root, superlink="fed"), "runs")

    def log(self, name: str = "runs") -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        for proc in [*self.others, *self.nodes.values(), self.link]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
