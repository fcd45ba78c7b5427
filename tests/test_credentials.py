"""The credentials command (helpers.flower.credentials): file modes, refusals, and files that parse and verify as Flower
and a TLS client need them (checked with cryptography's own X.509 verifier and Flower's key loader)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError  # noqa: E402

from helpers.core.settings import REPO  # noqa: E402
from helpers.flower import credentials  # noqa: E402

HOSTS = ["localhost", "127.0.0.1", "server.lab"]


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("creds") / "federation"
    credentials.make_credentials(out, HOSTS, nodes=2)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_0600_in_a_0700_folder(creds):
    assert sorted(p.name for p in creds.iterdir()) == sorted(credentials.planned_files(2))
    assert mode(creds) == 0o700
    for path in creds.iterdir():
        assert mode(path) == (0o600 if path.suffix == ".key" else 0o644), path.name


def verifier(ca_file: Path, name: x509.GeneralName):
    store = Store([x509.load_pem_x509_certificate(ca_file.read_bytes())])
    return PolicyBuilder().store(store).build_server_verifier(name)


def test_superlink_certificate_verifies_against_the_ca_for_every_host_and_no_other(creds, tmp_path):
    leaf = x509.load_pem_x509_certificate((creds / "superlink.crt").read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "server.lab"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for name in (
        x509.DNSName("localhost"),
        x509.DNSName("server.lab"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        chain = verifier(creds / "ca.crt", name).verify(leaf, [])
        assert chain[-1].subject == x509.load_pem_x509_certificate((creds / "ca.crt").read_bytes()).subject
    with pytest.raises(VerificationError):
        verifier(creds / "ca.crt", x509.DNSName("evil.example")).verify(leaf, [])
    other = credentials.make_credentials(tmp_path / "other", ["localhost"], nodes=1)[0]
    with pytest.raises(VerificationError):  # a node trusting another CA refuses this SuperLink
        verifier(other, x509.DNSName("localhost")).verify(leaf, [])
    key = serialization.load_pem_private_key((creds / "superlink.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()


def test_node_keys_are_nist_ecdsa_in_openssh_format_as_flower_reads_them(creds):
    register = pytest.importorskip("flwr.cli.supernode.register")
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    publics = set()
    for k in range(2):
        private = serialization.load_ssh_private_key((creds / f"node-{k}.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key((creds / f"node-{k}.pub").read_bytes())
        assert public == private.public_key()
        # what `flwr supernode register node-k.pub` sends is the key flower-supernode derives from node-k.key
        assert register.try_load_public_key(creds / f"node-{k}.pub") == public_key_to_bytes(private.public_key())
        publics.add(public_key_to_bytes(public))
    assert len(publics) == 2


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "fed"
    credentials.make_credentials(out, ["localhost"], nodes=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="--force"):
        credentials.make_credentials(out, ["localhost"], nodes=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, not even node-2
    (out / "ca.key").chmod(0o644)
    credentials.make_credentials(out, ["localhost"], nodes=1, force=True)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and all(after[n] != before[n] for n in before)
    assert mode(out / "ca.key") == 0o600


def test_refuses_the_repository_a_run_folder_and_an_open_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="inside the repository"):
        credentials.check_out(REPO / "creds", 1)
    monkeypatch.setenv("FLME_RUN_ROOT", str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="run folder"):
        credentials.check_out(tmp_path / "runs" / "creds", 1)
    (tmp_path / "a-run").mkdir()
    (tmp_path / "a-run" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="run folder"):
        credentials.check_out(tmp_path / "a-run" / "creds", 1)
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    with pytest.raises(ValueError, match="chmod 700"):
        credentials.check_out(tmp_path / "open", 1)


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--host", "bad host", "--nodes", "1"], 2, "--host 'bad host' is invalid"),
        (["--host", "localhost", "--nodes", "0"], 2, "--nodes 0 is invalid"),
        (["--nodes", "1"], 2, "--host"),
    ],
)
def test_cli_bad_input_exits_2_before_writing(args, code, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        credentials.main(["--out", str(tmp_path / "fed"), *args])
    assert exit_.value.code == code and says in capsys.readouterr().err
    assert not (tmp_path / "fed").exists()


def test_cli_io_error_exits_1(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert credentials.main(["--out", str(tmp_path / "file" / "fed"), "--host", "localhost", "--nodes", "1"]) == 1
    assert "could not write" in capsys.readouterr().err


def test_without_cryptography_the_command_says_what_to_install(tmp_path):
    block = "import runpy, sys; sys.modules['cryptography'] = None; sys.argv[0] = 'x'; "
    run = "runpy.run_module('helpers.flower.credentials', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", block + run, "--host", "localhost", "--nodes", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith(f"error: {credentials.NO_CRYPTOGRAPHY}"), out.stderr
    assert "Traceback" not in out.stderr
