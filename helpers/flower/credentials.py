"""A federation's credentials (`python -m helpers.credentials`): a private CA, the SuperLink's TLS certificate, and
one ECDSA key pair per SuperNode in the OpenSSH format that `flwr supernode register` and `flower-supernode
--auth-supernode-private-key` read. Keys come from the `cryptography` package (a Flower dependency), never by hand."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import stat
import sys
from pathlib import Path

from helpers.core.settings import REPO, default_run_root
from helpers.flower.federation import DEFAULT_CREDENTIALS

NO_CRYPTOGRAPHY = "the credentials command needs the cryptography package: pip install -r requirements-flower.txt"
try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as exc:
    if __name__ == "__main__":  # the command line says what to install, without a traceback
        print(f"error: {NO_CRYPTOGRAPHY} ({exc})", file=sys.stderr)
        sys.exit(2)
    raise ImportError(f"{NO_CRYPTOGRAPHY} ({exc})") from None

CURVE = ec.SECP384R1()  # a NIST curve: Flower's SuperNode authentication accepts no other kind of key
HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){HOST_LABEL}(\.{HOST_LABEL})*$")  # RFC 1123 host names


def planned_files(nodes: int) -> list[str]:
    """Every file the command writes, in order: CA, SuperLink certificate and key, one key pair per node."""
    node_files = [f"node-{k}{suffix}" for k in range(nodes) for suffix in (".key", ".pub")]
    return ["ca.crt", "ca.key", "superlink.crt", "superlink.key", *node_files]


def host_name(value: str) -> x509.GeneralName:
    """A --host value as a certificate subject alternative name (an IP address or a DNS name)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        if not HOSTNAME.match(value):
            raise ValueError(f"--host {value!r} is invalid: must be a DNS name or an IP address") from None
        return x509.DNSName(value)


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, nodes: int, *, force: bool = False) -> Path:
    """The resolved output folder, or ValueError: inside the repository or a run folder, readable by others,
    or holding files this command would overwrite (without force)."""
    out = out.expanduser().resolve()
    if inside(out, REPO.resolve()):
        raise ValueError(f"--out {out} is inside the repository {REPO}: keys must never sit beside the code; "
                         f"use a folder outside it (default {DEFAULT_CREDENTIALS})")  # fmt: skip
    runs = default_run_root().expanduser().resolve()
    if inside(out, runs) or any((p / "config.json").exists() for p in (out, *out.parents)):
        raise ValueError(f"--out {out} is inside a run folder (or the run root {runs}): use a folder of its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and stat.S_IMODE(out.stat().st_mode) & 0o077:
        mode = oct(stat.S_IMODE(out.stat().st_mode))
        raise ValueError(f"--out {out} is open to other users (mode {mode}): use a new folder or chmod 700 it")
    existing = [name for name in planned_files(nodes) if (out / name).exists()]
    if existing and not force:
        raise ValueError(f"--out {out} already holds {', '.join(existing)}: pass --force to replace them")
    return out


def write(path: Path, data: bytes, private: bool) -> None:
    """Write `data`; a private key is created with mode 0600 (never readable by others, not even for a moment)."""
    # O_NOFOLLOW: a symbolic link planted in the folder must not send a key elsewhere (e.g. into a repository)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), 0o600 if private else 0o644)  # an existing file (--force) keeps its old mode


def certificate(subject: str, key, issuer: str, issuer_key, days: int, extensions: list) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of the machines differ a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA384())


def make_credentials(out: Path, hosts: list[str], nodes: int, *, days: int = 365, force: bool = False) -> list[Path]:
    """Write a private CA, the SuperLink's certificate (SANs: `hosts`) and key, and `nodes` SuperNode key pairs
    into `out` (mode 0700, private keys 0600); every input is checked before anything is written."""
    if not hosts:
        raise ValueError("--host is required: the SuperLink's host names or IP addresses, as the nodes dial it")
    names = [host_name(h) for h in hosts]
    if nodes < 1:
        raise ValueError(f"--nodes {nodes} is invalid: must be >= 1 (one key pair per SuperNode)")
    if days < 1:
        raise ValueError(f"--days {days} is invalid: must be >= 1")
    out = check_out(out, nodes, force=force)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)

    pem = serialization.Encoding.PEM
    pkcs8, nothing = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ca_key, link_key = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE)
    ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
    ca = certificate("fl-model-editing federation CA", ca_key, "fl-model-editing federation CA", ca_key, days * 10,
                     [(x509.BasicConstraints(ca=True, path_length=0), True), (ca_usage, True)])  # fmt: skip
    link_usage = x509.KeyUsage(True, False, False, False, True, False, False, False, False)  # signature, agreement
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    link = certificate(hosts[0], link_key, "fl-model-editing federation CA", ca_key, days,
                       [(x509.BasicConstraints(ca=False, path_length=None), True), (link_usage, True),
                        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                        (x509.SubjectAlternativeName(names), False), (aki, False)])  # fmt: skip
    files = {
        "ca.crt": (ca.public_bytes(pem), False),
        "ca.key": (ca_key.private_bytes(pem, pkcs8, nothing), True),
        "superlink.crt": (link.public_bytes(pem), False),
        "superlink.key": (link_key.private_bytes(pem, pkcs8, nothing), True),
    }
    for k in range(nodes):
        key = ec.generate_private_key(CURVE)
        openssh = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, nothing)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        files[f"node-{k}.key"] = (openssh, True)
        files[f"node-{k}.pub"] = (public + f" flme-node-{k}\n".encode(), False)
    for name, (data, private) in files.items():
        write(out / name, data, private)
    return [out / name for name in files]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m helpers.credentials",
        description="Make a Flower federation's credentials on the coordinator's machine: a private CA (ca.crt, "
        "ca.key), the SuperLink's TLS certificate for the given host names (superlink.crt, superlink.key) and one "
        "key pair per SuperNode (node-<k>.key, node-<k>.pub; ECDSA P-384, OpenSSH format). Give the SuperLink "
        "superlink.* and ca.crt, each SuperNode ca.crt and its own node-<k>.key, and register node-<k>.pub with "
        "`flwr supernode register`. Keep ca.key offline: whoever holds it can impersonate the SuperLink.",
        epilog="example: python -m helpers.credentials --host server.lab --host 10.0.0.5 --nodes 10  "
        "(docs/flower.md walks through the whole federation)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_CREDENTIALS,
                   help=f"a folder outside the repository and the run folders (default {DEFAULT_CREDENTIALS}); created "
                   "with mode 0700, private keys 0600")  # fmt: skip
    p.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP", required=True,
                   help="a host name or IP address at which the SuperNodes and `flwr` reach the SuperLink; repeat "
                   "for several (e.g. --host localhost --host 127.0.0.1)")  # fmt: skip
    p.add_argument("--nodes", type=int, required=True, help="how many SuperNode key pairs (node-0 .. node-N-1)")
    p.add_argument("--days", type=int, default=365, help="validity of the SuperLink certificate (default 365)")
    p.add_argument("--force", action="store_true", help="replace credentials already in --out (old keys stop working)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 for bad input (nothing written), 1 when writing fails."""
    p = parser()
    args = p.parse_args(argv)
    try:
        files = make_credentials(args.out, args.host, args.nodes, days=args.days, force=args.force)
    except ValueError as exc:
        p.error(str(exc))  # exits 2
    except OSError as exc:
        print(f"error: could not write the credentials: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} files to {files[0].parent}:")
    for path in files:
        print(f"  {path.name}  ({'private, 0600' if path.suffix == '.key' else 'public'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
