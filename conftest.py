"""Test defaults: smoke profile, runs and results in temporary folders (kernels started by nbval inherit them)."""

import os
import tempfile

os.environ.setdefault("FLME_PROFILE", "smoke")
# Tiny smoke models run fastest single-threaded; two threads on two shared cores can be 40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
_scratch = tempfile.mkdtemp(prefix="flme-tests-")
os.environ.setdefault("FLME_RUN_ROOT", os.path.join(_scratch, "runs"))
os.environ.setdefault("FLME_RESULTS_ROOT", os.path.join(_scratch, "results"))
os.environ.setdefault("FLME_FIGURES_ROOT", os.path.join(_scratch, "figures"))
os.environ.setdefault("FLME_TABLES_ROOT", os.path.join(_scratch, "report-generated"))


def pytest_configure(config):
    # Also when OMP_NUM_THREADS was set elsewhere: tiny smoke models are fastest on one intra-op thread.
    import torch

    torch.set_num_threads(1)
