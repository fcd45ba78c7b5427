"""Test defaults: smoke profile, runs and results in temporary folders (kernels started by nbval inherit them)."""

import os
import tempfile

os.environ.setdefault("FLME_PROFILE", "smoke")
# Tiny smoke models run fastest single-threaded; two threads on two shared cores can be 40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reports usage to its servers by default: not from tests
_scratch = tempfile.mkdtemp(prefix="flme-tests-")
os.environ.setdefault("FLME_RUN_ROOT", os.path.join(_scratch, "runs"))
os.environ.setdefault("FLME_RESULTS_ROOT", os.path.join(_scratch, "results"))
os.environ.setdefault("FLME_FIGURES_ROOT", os.path.join(_scratch, "figures"))
os.environ.setdefault("FLME_TABLES_ROOT", os.path.join(_scratch, "report-generated"))
os.environ.setdefault("FLME_NODE_STATE", os.path.join(_scratch, "node-state"))  # Flower nodes' c_i, not in ~/.cache


def pytest_configure(config):
    # Also when OMP_NUM_THREADS was set elsewhere: tiny smoke models are fastest on one intra-op thread.
    import socket

    import torch

    torch.set_num_threads(1)
    # No test resolves a host outside this machine: the full profile's download probes and hub lookups fail here as
    # they would offline, and never reach out (CI has no internet; outside traffic is not the suite's to send).
    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if not _is_local(host):
            raise socket.gaierror(socket.EAI_NONAME, f"tests resolve no outside host ({host})")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = local_only


def _is_local(host) -> bool:
    """Loopback names and addresses, this machine's name, and IP literals (no lookup to make)."""
    import ipaddress
    import socket

    if host in (None, "", "localhost", socket.gethostname()):
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(text.split("%")[0])
        return True
    except ValueError:
        return text.endswith(".localhost")
