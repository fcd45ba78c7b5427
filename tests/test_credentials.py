"""The credentials command (helpers.flower.credentials): one folder per destination (the CA's key never in the
SuperLink's), file modes, refusals of every bad input before anything is written, --force that removes what it
replaces, a SuperNode's own key pair, and files that parse and verify as Flower and a TLS client need them (checked
with cryptography's own X.509 verifier and Flower's key loader)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
import textwrap
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


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def cli(*args: str) -> int:
    try:
        return credentials.main(list(args))
    except SystemExit as exc:  # argparse's own errors and p.error
        return exc.code


def test_one_folder_per_destination_keys_0600_folders_0700(creds):
    assert sorted(tree(creds)) == sorted(credentials.planned_files(2))
    assert sorted(p.name for p in (creds / "superlink").iterdir()) == ["ca.crt", "superlink.crt", "superlink.key"]
    assert sorted(p.name for p in (creds / "ca").iterdir()) == ["ca.crt", "ca.key"]  # the CA's key: its own folder
    for folder in (creds, *(p for p in creds.iterdir())):
        assert mode(folder) == 0o700, folder
    for path in creds.rglob("*.*"):
        assert mode(path) == (0o600 if path.suffix == ".key" else 0o644), path


def verifier(ca_file: Path, name: x509.GeneralName):
    store = Store([x509.load_pem_x509_certificate(ca_file.read_bytes())])
    return PolicyBuilder().store(store).build_server_verifier(name)


def test_superlink_certificate_verifies_against_the_ca_for_every_host_and_no_other(creds, tmp_path):
    leaf = x509.load_pem_x509_certificate((creds / "superlink" / "superlink.crt").read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "server.lab"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    ca_files = [creds / folder / "ca.crt" for folder in ("ca", "superlink", "nodes")]
    assert len({p.read_bytes() for p in ca_files}) == 1  # one CA, copied where it is needed
    for name in (
        x509.DNSName("localhost"),
        x509.DNSName("server.lab"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        chain = verifier(ca_files[0], name).verify(leaf, [])
        assert chain[-1].subject == x509.load_pem_x509_certificate(ca_files[0].read_bytes()).subject
    with pytest.raises(VerificationError):
        verifier(ca_files[0], x509.DNSName("evil.example")).verify(leaf, [])
    other = tmp_path / "other"
    credentials.make_credentials(other, ["localhost"])
    with pytest.raises(VerificationError):  # a node trusting another CA refuses this SuperLink
        verifier(other / "nodes" / "ca.crt", x509.DNSName("localhost")).verify(leaf, [])
    key = serialization.load_pem_private_key((creds / "superlink" / "superlink.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()


def assert_flower_reads(private_file: Path, public_file: Path) -> bytes:
    """The key pair is NIST P-384 in OpenSSH format, and what `flwr supernode register` sends for the .pub is the key
    flower-supernode derives from the private key."""
    register = pytest.importorskip("flwr.cli.supernode.register")
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private = serialization.load_ssh_private_key(private_file.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert serialization.load_ssh_public_key(public_file.read_bytes()) == private.public_key()
    assert register.try_load_public_key(public_file) == public_key_to_bytes(private.public_key())
    return public_key_to_bytes(private.public_key())


def test_node_keys_made_centrally_or_on_the_node_are_as_flower_reads_them(creds, tmp_path, capsys):
    central = {
        assert_flower_reads(creds / "nodes" / f"node-{k}.key", creds / "nodes" / f"node-{k}.pub") for k in (0, 1)
    }
    assert len(central) == 2
    node = tmp_path / "node-home" / "key"
    assert cli("--node-key", str(node)) == 0
    assert sorted(tree(node)) == ["node.key", "node.pub"] and mode(node) == 0o700 and mode(node / "node.key") == 0o600
    assert assert_flower_reads(node / "node.key", node / "node.pub") not in central
    assert "node.pub" in capsys.readouterr().out
    assert cli("--node-key", str(node), "--host", "x.lab") == 2
    assert "--node-key makes one node's key pair: --host belong" in capsys.readouterr().err


def test_ca_key_encrypted_with_a_passphrase_file(tmp_path, capsys):
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery\n")
    secret.chmod(0o644)
    out = tmp_path / "fed"
    assert cli("--out", str(out), "--host", "localhost", "--ca-passphrase-file", str(secret)) == 2
    assert "is readable by other users (mode 0o644): chmod 600 it" in capsys.readouterr().err and not out.exists()
    secret.chmod(0o600)
    assert cli("--out", str(out), "--host", "localhost", "--ca-passphrase-file", str(secret)) == 0
    pem = (out / "ca" / "ca.key").read_bytes()
    assert b"ENCRYPTED" in pem
    with pytest.raises(TypeError):  # password required
        serialization.load_pem_private_key(pem, None)
    key = serialization.load_pem_private_key(pem, b"correct horse battery")
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    assert key.public_key() == ca.public_key()


def test_force_removes_what_it_replaces_and_names_the_keys_to_unregister(tmp_path, capsys):
    out = tmp_path / "fed"
    credentials.make_credentials(out, ["localhost"], nodes=3)
    before = tree(out)
    assert cli("--out", str(out), "--host", "localhost", "--nodes", "1") == 2
    assert "already holds ca/ca.crt" in capsys.readouterr().err
    assert tree(out) == before  # nothing written, not even node-0
    (out / "ca" / "ca.key").chmod(0o644)
    assert cli("--out", str(out), "--host", "localhost", "--nodes", "1", "--force") == 0
    after = tree(out)
    assert sorted(after) == sorted(credentials.planned_files(1))  # node-1 and node-2 are gone
    assert all(after[n] != before[n] for n in after if n.endswith((".key", ".pub", ".crt")))
    assert mode(out / "ca" / "ca.key") == 0o600
    printed = capsys.readouterr().out
    for k in range(3):
        assert f"node-{k}.pub ({credentials.key_fingerprint(before[f'nodes/node-{k}.pub'])})" in printed
    assert "replaced 3 SuperNode public keys" in printed and "flwr supernode unregister NODE_ID" in printed


def test_refuses_any_git_repository_a_run_folder_and_an_open_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="inside the git repository"):
        credentials.check_out(REPO / "creds", 1)
    other = tmp_path / "someone-elses-repo"
    (other / ".git").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"inside the git repository {other}"):
        credentials.check_out(other / "deep" / "creds", 1)
    worktree = tmp_path / "a-worktree"
    worktree.mkdir()
    (worktree / ".git").write_text("gitdir: /elsewhere\n")  # a worktree's or submodule's .git is a file
    with pytest.raises(ValueError, match="inside the git repository"):
        credentials.check_out(worktree / "creds", 1)
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
    "args, says",
    [
        (["--host", "bad host"], "--host 'bad host' is invalid"),
        (["--host", "localhost", "--nodes", "-1"], "--nodes -1 is invalid: must be 0 to 1000"),
        (["--host", "localhost", "--nodes", "1001"], "--nodes 1001 is invalid"),
        (["--host", "localhost", "--days", "0"], "--days 0 is invalid: must be 1 to 825"),
        (["--host", "localhost", "--days", "400000"], "--days 400000 is invalid"),
        (["--nodes", "1"], "--host is required"),
        (["--host", "localhost", "--ca-passphrase-file", "/nonexistent"], "--ca-passphrase-file /nonexistent is not"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_option_before_writing(args, says, tmp_path, capsys):
    assert cli("--out", str(tmp_path / "fed"), *args) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize("where", ["out", "dangling out", "a key", "a dangling key", "a folder"])
def test_symbolic_links_are_refused_before_anything_is_written(where, tmp_path, capsys):
    out, target = tmp_path / "fed", tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (target / "stolen.key").write_text("theirs")
    if where.endswith("out"):
        out.symlink_to(target if where == "out" else tmp_path / "missing")
    else:
        (out / "ca").mkdir(mode=0o700, parents=True)
        out.chmod(0o700)
        if where == "a folder":
            (out / "superlink").symlink_to(target)
        else:
            (out / "ca" / "ca.key").symlink_to(target / "stolen.key" if where == "a key" else tmp_path / "gone")
    assert cli("--out", str(out), "--host", "localhost", "--force") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert tree(target) == {"stolen.key": b"theirs"} and not (tmp_path / "gone").exists()
    if not out.is_symlink():
        assert not [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]  # nothing written


def test_cli_io_error_exits_1(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli("--out", str(tmp_path / "file" / "fed"), "--host", "localhost") == 1
    assert "could not write" in capsys.readouterr().err


def test_help_works_without_cryptography_and_a_command_says_what_to_install(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["cryptography"] = None  # as if not installed
        from helpers.flower.credentials import main
        for argv in (["--help"], ["--host", "localhost", "--out", sys.argv[1]]):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
            print("EXIT", code, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fed")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert "usage: python -m helpers.credentials" in out.stdout and "EXIT 0" in out.stdout, out.stderr
    assert "EXIT 2" in out.stdout and f"error: {credentials.NO_CRYPTOGRAPHY}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "fed").exists()
