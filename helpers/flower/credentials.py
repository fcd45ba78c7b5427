"""A federation's credentials (`python -m helpers.credentials`): a private CA, the SuperLink's TLS certificate, and
ECDSA key pairs for SuperNodes in the OpenSSH format that `flwr supernode register` and `flower-supernode
--auth-supernode-private-key` read. Keys come from the `cryptography` package (a Flower dependency), never by hand.

One folder per destination under --out, so that copying a folder is the whole instruction and the CA's key never
travels: `ca/` (ca.key, ca.crt: stays with the coordinator, ca.key optionally passphrase-encrypted), `superlink/`
(its certificate and key, ca.crt), `nodes/` (ca.crt, and with --nodes K the central way's node-<k>.key/.pub). A
SuperNode can instead make its own key pair (--node-key DIR) and hand over only node.pub.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os
import re
import socket
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

from helpers.core.settings import REPO, default_run_root
from helpers.flower.federation import CA_DIR, DEFAULT_CREDENTIALS, LINK_DIR, NODES_DIR

NO_CRYPTOGRAPHY = "the credentials command needs the cryptography package: pip install -r requirements-flower.txt"
HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){HOST_LABEL}(\.{HOST_LABEL})*$")  # RFC 1123 host names
MAX_DAYS = 825  # the CA/Browser Forum's former limit for a server certificate; the CA lives 10 times as long
MAX_NODES = 1000
NODE_KEY, NODE_PUB = "node.key", "node.pub"  # --node-key DIR: one SuperNode's own key pair


def crypto() -> SimpleNamespace:
    """The parts of `cryptography` the commands use, imported when a command needs them (--help does not)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise ImportError(f"{NO_CRYPTOGRAPHY} ({exc})") from None
    # a NIST curve: Flower's SuperNode authentication accepts no other kind of key
    return SimpleNamespace(x509=x509, hashes=hashes, serialization=serialization, ec=ec, curve=ec.SECP384R1(),
                           eku=ExtendedKeyUsageOID, name=NameOID)  # fmt: skip


def planned_files(nodes: int) -> list[str]:
    """Every file the federation command writes, relative to --out, in order."""
    node_files = [f"{NODES_DIR}/node-{k}{suffix}" for k in range(nodes) for suffix in (".key", ".pub")]
    return [f"{CA_DIR}/ca.crt", f"{CA_DIR}/ca.key", f"{LINK_DIR}/ca.crt", f"{LINK_DIR}/superlink.crt",
            f"{LINK_DIR}/superlink.key", f"{NODES_DIR}/ca.crt", *node_files]  # fmt: skip


def check_host(value: str) -> str:
    """A --host value: an IP address or an RFC 1123 DNS name, else ValueError naming --host."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not HOSTNAME.match(value):
            raise ValueError(f"--host {value!r} is invalid: must be a DNS name or an IP address") from None
    return value


def check_numbers(nodes: int, days: int) -> None:
    if not 0 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes {nodes} is invalid: must be 0 to {MAX_NODES} (0: each node makes its own key)")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days {days} is invalid: must be 1 to {MAX_DAYS} (the SuperLink certificate's validity)")


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def git_repository(path: Path) -> Path | None:
    """The git repository (work tree) holding `path`, if any: a folder or a parent with a .git entry."""
    return next((p for p in (path, *path.parents) if (p / ".git").exists()), None)


def check_folder(option: str, folder: Path, names: list[str], force: bool) -> Path:
    """The resolved output folder, or ValueError naming `option`: a symbolic link (dangling ones too) at it or at any
    file or folder it would write, inside a git repository or a run folder, open to other users, or holding files
    `names` would replace (without force)."""
    if folder.expanduser().is_symlink():
        raise ValueError(f"{option} {folder} is a symbolic link: give the real folder")
    out = folder.expanduser().resolve()
    repository = REPO.resolve() if inside(out, REPO.resolve()) else git_repository(out)
    if repository is not None:
        raise ValueError(
            f"{option} {out} is inside the git repository {repository}: keys must never sit where a commit or a "
            f"push can take them; use a folder outside it (default {DEFAULT_CREDENTIALS})"
        )
    runs = default_run_root().expanduser().resolve()
    if inside(out, runs) or any((p / "config.json").exists() for p in (out, *out.parents)):
        raise ValueError(f"{option} {out} is inside a run folder (or the run root {runs}): use a folder of its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} exists and is not a folder")
    paths = {out / name for name in names} | {(out / name).parent for name in names}
    linked = sorted(str(p) for p in paths if p.is_symlink())
    if linked:
        raise ValueError(f"{option} {out} holds symbolic links where this command writes ({', '.join(linked)}): "
                         "remove them; keys are never written through a link")  # fmt: skip
    for path in sorted({out} | {(out / name).parent for name in names}):
        if path.is_dir() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            mode = oct(stat.S_IMODE(path.stat().st_mode))
            raise ValueError(f"{option} {path} is open to other users (mode {mode}): use a new folder or chmod 700 it")
    existing = [name for name in names if (out / name).exists()]
    if existing and not force:
        raise ValueError(f"{option} {out} already holds {', '.join(existing)}: pass --force to replace them")
    return out


def check_out(out: Path, nodes: int, *, force: bool = False) -> Path:
    """check_folder for the federation command's --out."""
    return check_folder("--out", out, planned_files(nodes), force)


def read_passphrase(path: Path | None) -> bytes | None:
    """The first line of --ca-passphrase-file (at least 8 characters; the file readable by its owner only)."""
    if path is None:
        return None
    option = f"--ca-passphrase-file {path}"
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{option} is not a regular file")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ValueError(f"{option} is readable by other users (mode {oct(stat.S_IMODE(path.stat().st_mode))}): "
                         "chmod 600 it")  # fmt: skip
    lines = path.read_bytes().splitlines()
    passphrase = lines[0].strip() if lines else b""
    if len(passphrase) < 8:
        raise ValueError(f"{option} holds no passphrase of at least 8 characters on its first line")
    return passphrase


def key_fingerprint(public_line: bytes) -> str:
    """An OpenSSH public key's SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    try:
        blob = base64.b64decode(public_line.split()[1], validate=True)
    except (IndexError, ValueError):
        return "an unreadable key"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def replaced_public_keys(out: Path, pattern: str) -> tuple[list[Path], list[str]]:
    """(every file of a previous run of the command that matches `pattern` under out, the fingerprints of the public
    keys among them): what --force removes, and what stays registered at the SuperLink."""
    old = sorted(p for p in out.glob(pattern) if p.is_file())
    return old, [f"{p.name} ({key_fingerprint(p.read_bytes())})" for p in old if p.suffix == ".pub"]


def write(path: Path, data: bytes, private: bool) -> None:
    """Create `path` with its mode set before any byte is written (0600 for a private key): never through a link,
    never over an existing file (--force removed it first)."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have taken bits away; never added any
        f.write(data)


def make_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)


def certificate(c, subject: str, key, issuer: str, issuer_key, days: int, extensions: list):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        c.x509.CertificateBuilder()
        .subject_name(c.x509.Name([c.x509.NameAttribute(c.name.COMMON_NAME, subject)]))
        .issuer_name(c.x509.Name([c.x509.NameAttribute(c.name.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(c.x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of the machines differ a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(c.x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, c.hashes.SHA384())


def san(c, host: str):
    try:
        return c.x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return c.x509.DNSName(host)


def key_pair(c, comment: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new P-384 key."""
    key, s = c.ec.generate_private_key(c.curve), c.serialization
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def federation_files(c, hosts: list[str], nodes: int, days: int, passphrase: bytes | None) -> dict[str, tuple]:
    """{relative path: (bytes, private)} of planned_files(nodes)."""
    s, issuer = c.serialization, "fl-model-editing federation CA"
    ca_key, link_key = c.ec.generate_private_key(c.curve), c.ec.generate_private_key(c.curve)
    ca_usage = c.x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
    ca = certificate(c, issuer, ca_key, issuer, ca_key, days * 10,
                     [(c.x509.BasicConstraints(ca=True, path_length=0), True), (ca_usage, True)])  # fmt: skip
    link_usage = c.x509.KeyUsage(True, False, False, False, True, False, False, False, False)  # signature, agreement
    aki = c.x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    link = certificate(c, hosts[0], link_key, issuer, ca_key, days,
                       [(c.x509.BasicConstraints(ca=False, path_length=None), True), (link_usage, True),
                        (c.x509.ExtendedKeyUsage([c.eku.SERVER_AUTH]), False),
                        (c.x509.SubjectAlternativeName([san(c, h) for h in hosts]), False), (aki, False)])  # fmt: skip
    lock = s.BestAvailableEncryption(passphrase) if passphrase else s.NoEncryption()
    ca_pem = ca.public_bytes(s.Encoding.PEM)
    files = {
        f"{CA_DIR}/ca.crt": (ca_pem, False),
        f"{CA_DIR}/ca.key": (ca_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, lock), True),
        f"{LINK_DIR}/ca.crt": (ca_pem, False),
        f"{LINK_DIR}/superlink.crt": (link.public_bytes(s.Encoding.PEM), False),
        f"{LINK_DIR}/superlink.key": (
            link_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()),
            True,
        ),  # fmt: skip
        f"{NODES_DIR}/ca.crt": (ca_pem, False),
    }
    for k in range(nodes):
        private, public = key_pair(c, f"flme-node-{k}")
        files[f"{NODES_DIR}/node-{k}.key"], files[f"{NODES_DIR}/node-{k}.pub"] = (private, True), (public, False)
    return files


def write_all(out: Path, files: dict[str, tuple], old: list[Path]) -> list[Path]:
    """Remove what --force replaces, then write `files` under out (folders 0700)."""
    for path in old:
        path.unlink(missing_ok=True)
    make_folder(out)
    for name, (data, private) in files.items():
        make_folder((out / name).parent)
        write(out / name, data, private)
    return [out / name for name in files]


def make_credentials(
    out: Path, hosts: list[str], nodes: int = 0, *, days: int = 365, force: bool = False,
    ca_passphrase: bytes | None = None,
) -> list[Path]:  # fmt: skip
    """Write a private CA, the SuperLink's certificate (SANs: `hosts`) and key, and `nodes` SuperNode key pairs
    (the central way) under `out` (planned_files); every input is checked before anything is written. With force,
    the files of an earlier run of the command are removed first (node keys it made included)."""
    if not hosts:
        raise ValueError("--host is required: the SuperLink's host names or IP addresses, as the nodes dial it")
    hosts = [check_host(h) for h in hosts]
    check_numbers(nodes, days)
    out = check_out(Path(out), nodes, force=force)
    c = crypto()
    old = [out / name for name in planned_files(0)] + replaced_public_keys(out, f"{NODES_DIR}/node-*")[0]
    return write_all(out, federation_files(c, hosts, nodes, days, ca_passphrase), old if force else [])


def make_node_key(folder: Path, *, force: bool = False) -> list[Path]:
    """One SuperNode's own key pair in `folder` (node.key 0600, node.pub): made where the node runs, so only the
    public key ever leaves it."""
    folder = check_folder("--node-key", Path(folder), [NODE_KEY, NODE_PUB], force)
    c = crypto()
    private, public = key_pair(c, f"flme-node@{socket.gethostname()}")
    old = [folder / NODE_KEY, folder / NODE_PUB] if force else []
    return write_all(folder, {NODE_KEY: (private, True), NODE_PUB: (public, False)}, old)


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m helpers.credentials` (its help needs neither flwr nor cryptography)."""
    p = argparse.ArgumentParser(
        prog="python -m helpers.credentials",
        description="Make a Flower federation's credentials. On the coordinator's machine (--host): a private CA "
        "in ca/ (keep it there, offline: whoever holds ca.key can impersonate the SuperLink), the SuperLink's TLS "
        "certificate for the given host names in superlink/ (copy that folder to the SuperLink host), and ca.crt in "
        "nodes/ for every SuperNode. On each SuperNode's machine (--node-key DIR): its own key pair; send only "
        "DIR/node.pub to the coordinator, who registers it with `flwr supernode register`. Or, centrally, --nodes "
        "K key pairs in nodes/ (node-<k>.key then has to be copied to node k).",
        epilog="examples: python -m helpers.credentials --host server.lab --host 10.0.0.5;  "
        "python -m helpers.credentials --node-key ~/.flme/node  (docs/flower.md walks through the whole federation). "
        "Needs the cryptography package (Flower's extras): pip install -r requirements-flower.txt",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_CREDENTIALS,
                   help=f"the coordinator's folder, outside any git repository and the run folders (default "
                   f"{DEFAULT_CREDENTIALS}); folders are created with mode 0700, private keys 0600")  # fmt: skip
    p.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a host name or IP address at which the SuperNodes and `flwr` reach the SuperLink; repeat "
                   "for several (e.g. --host localhost --host 127.0.0.1)")  # fmt: skip
    p.add_argument("--nodes", type=int, default=0,
                   help="the central way: also make K SuperNode key pairs in nodes/ (default 0: each node makes its "
                   "own with --node-key)")  # fmt: skip
    p.add_argument(
        "--days",
        type=int,
        default=365,
        help=f"validity of the SuperLink certificate, 1 to {MAX_DAYS} (default 365; the CA: 10 times it)",
    )
    p.add_argument("--ca-passphrase-file", type=Path, default=None, metavar="FILE",
                   help="encrypt ca/ca.key with the passphrase on this file's first line (mode 0600)")  # fmt: skip
    p.add_argument("--node-key", type=Path, default=None, metavar="DIR",
                   help="on a SuperNode's machine: make its own key pair DIR/node.key and DIR/node.pub")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="remove and replace credentials already there (old keys stop working; the command prints "
                   "which public keys to unregister)")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """(the files written, the replaced public keys that stay registered) for the parsed command line."""
    if args.node_key is not None:
        central = [o for o, given in (("--host", args.host), ("--nodes", args.nodes), ("--ca-passphrase-file",
                   args.ca_passphrase_file)) if given]  # fmt: skip
        if central:
            raise ValueError(f"--node-key makes one node's key pair: {', '.join(central)} belong to the coordinator's "
                             "command (without --node-key)")  # fmt: skip
        replaced = replaced_public_keys(args.node_key.expanduser(), NODE_PUB)[1] if args.force else []
        return make_node_key(args.node_key, force=args.force), replaced
    if not args.host:
        raise ValueError("--host is required (or --node-key DIR on a SuperNode's machine)")
    passphrase = read_passphrase(args.ca_passphrase_file)
    replaced = replaced_public_keys(args.out.expanduser(), f"{NODES_DIR}/node-*.pub")[1] if args.force else []
    files = make_credentials(args.out, args.host, args.nodes, days=args.days, force=args.force,
                             ca_passphrase=passphrase)  # fmt: skip
    return files, replaced


def report(files: list[Path], replaced: list[str]) -> None:
    root = os.path.commonpath([str(p) for p in files])
    print(f"wrote {len(files)} files under {root}:")
    for path in files:
        print(f"  {path.relative_to(root)}  ({'private, 0600' if path.suffix == '.key' else 'public'})")
    if files[-1].name == NODE_PUB:
        print(f"send only {files[-1]} to the coordinator (flwr supernode register node.pub CONNECTION); start "
              f"flower-supernode with --auth-supernode-private-key {files[0]} and the federation's "
              "nodes/ca.crt")  # fmt: skip
    if replaced:
        print(f"replaced {len(replaced)} SuperNode public keys, still registered at the SuperLink until you remove "
              f"them: {'; '.join(replaced)}. For each: `flwr supernode unregister NODE_ID CONNECTION` (its id is the "
              "one `flwr supernode register` printed; `flwr supernode ls CONNECTION` lists them)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 for bad input or a missing package (nothing written), 1 when writing
    fails."""
    p = parser()
    args = p.parse_args(argv)
    try:
        files, replaced = run(args)
    except ValueError as exc:
        p.error(str(exc))  # exits 2
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: could not write the credentials: {exc}", file=sys.stderr)
        return 1
    report(files, replaced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
