"""The runner of each experiment (the command line, `work` and the GPU check start runs through it)."""

from __future__ import annotations

import importlib

# experiment name -> "module:function"; each function takes (config, run_root=..., progress=...) -> Run
RUNNERS = {
    "centralized": "helpers.training.centralized:run_centralized",
    "fedavg": "helpers.federated.rounds:run_fedavg",
    "sparse_centralized": "helpers.editing.sparse_runs:run_sparse_centralized",
    "sparse_fedavg": "helpers.editing.sparse_runs:run_sparse_fedavg",
}
FLOWER_RUNNER = "helpers.flower.app:run_flower"  # engine="flower" (fedavg, sparse_fedavg); imports flwr


def runner(experiment: str, engine: str = "sequential"):
    """The function that runs `experiment` (on Flower's simulation engine for engine="flower")."""
    module, func = (FLOWER_RUNNER if engine == "flower" else RUNNERS[experiment]).split(":")
    return getattr(importlib.import_module(module), func)
