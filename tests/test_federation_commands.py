"""`--print-flwr-run NAME` prints the secure federation (flower.federation): TLS and node authentication on every
command, each node's own key, registration of every node; --insecure only as a named local try-out. The commands
themselves run in tests/test_flower_federation.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from helpers.ops.cli import main

ARGS = ["flower", "sparse_fedavg", "--profile", "smoke", "--set", "num_clients=3", "--print-flwr-run", "fed"]


def printed(capsys, tmp_path, *extra: str) -> list[str]:
    assert main([*ARGS, "--run-root", str(tmp_path / "runs"), *extra]) == 0
    assert not (tmp_path / "runs").exists()  # printed, nothing run
    return capsys.readouterr().out.splitlines()


def command(lines: list[str], program: str) -> list[str]:
    (line,) = [x for x in lines if program in x.split()[:3] and not x.startswith("#")]
    return shlex.split(line)


def test_the_printed_federation_is_secure_end_to_end(capsys, tmp_path):
    creds = tmp_path / "creds"
    lines = printed(capsys, tmp_path, "--credentials", str(creds), "--superlink-address", "server.lab:9000")
    assert not any("--insecure" in x or "insecure = true" in x for x in lines)
    make = command(lines, "helpers.flower.credentials")
    assert make[make.index("--host") + 1] == "server.lab" and make[make.index("--nodes") + 1] == "3"
    link = command(lines, "flower-superlink")
    assert link[0] == "FLME_NO_TRAIN_DATA=1" and "--enable-supernode-auth" in link
    for flag, name in [
        ("--ssl-ca-certfile", "ca.crt"),
        ("--ssl-certfile", "superlink.crt"),
        ("--ssl-keyfile", "superlink.key"),
    ]:
        assert link[link.index(flag) + 1] == str(creds / "superlink" / name)  # its own folder: no CA key in it
    node = command(lines, "flower-supernode")
    assert node[node.index("--root-certificates") + 1] == str(creds / "nodes" / "ca.crt")
    assert node[node.index("--auth-supernode-private-key") + 1] == str(creds / "nodes" / "node-0.key")
    assert node[node.index("--superlink") + 1] == "server.lab:9000"
    assert node[node.index("--node-config") + 1] == "partition-id=0 num-partitions=3"
    (register,) = [x for x in lines if "flwr supernode register" in x]
    assert register == f"for k in $(seq 0 2); do flwr supernode register {creds}/nodes/node-$k.pub fed; done"
    assert (
        f'#   root-certificates = "{creds / "ca" / "ca.crt"}"' in lines and '#   address = "server.lab:9000"' in lines
    )
    assert any("--node-key DIR" in x for x in lines if x.startswith("#"))  # a node may make its own key pair
    run = command(lines, "flwr")
    assert run[:4] == ["flwr", "run", run[2], "fed"] and Path(run[2], "pyproject.toml").is_file()
    order = [i for i, x in enumerate(lines) if not x.startswith("#")]  # credentials, link, register, node, run
    assert [lines[i].split()[0] for i in order] == ["python", "FLME_NO_TRAIN_DATA=1", "for", "flower-supernode", "flwr"]


def test_insecure_is_a_named_local_try_out(capsys, tmp_path):
    lines = printed(capsys, tmp_path, "--insecure", "--superlink-address", "127.0.0.1:8000")
    assert lines[0].startswith("# local try-out only: no TLS and no node authentication")
    assert "--insecure" in command(lines, "flower-superlink") and "--insecure" in command(lines, "flower-supernode")
    assert not any(
        w in " ".join(lines) for w in ("register", "--ssl-", "--root-certificates", "helpers.flower.credentials")
    )


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--superlink-address", "server.lab"], "--superlink-address 'server.lab' is invalid: must be HOST:PORT"),
        (["--print-flwr-run", "local", "--insecure"], "are for a real federation"),
    ],
)
def test_bad_federation_options_exit_2(extra, says, capsys, tmp_path):
    assert main([*ARGS, "--run-root", str(tmp_path / "runs"), *extra]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "runs").exists()
