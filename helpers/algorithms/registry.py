"""The registry of federated algorithms: name -> its title and where its class lives. A new algorithm is one module
(a subclass of helpers.algorithms.fedavg.FedAvg declaring its own parameters) and one line here.

Torch-free on purpose: the report reads names and titles without loading any algorithm; config, the engines and
the cost estimate load the classes by name (`algorithm_class`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from helpers.core.params import DEFAULT_ALGORITHM


class Entry(NamedTuple):
    """One algorithm: how tables and figures name it, and "module:Class" of its implementation."""

    title: str
    home: str


ALGORITHMS: dict[str, Entry] = {
    "fedavg": Entry("FedAvg", "helpers.algorithms.fedavg:FedAvg"),
    "fedavgm": Entry("FedAvgM", "helpers.algorithms.fedavgm:FedAvgM"),
    "fedprox": Entry("FedProx", "helpers.algorithms.fedprox:FedProx"),
    "scaffold": Entry("SCAFFOLD", "helpers.algorithms.scaffold:Scaffold"),
    "fedadam": Entry("FedAdam", "helpers.algorithms.fedopt:FedAdam"),
    "fedyogi": Entry("FedYogi", "helpers.algorithms.fedopt:FedYogi"),
    "fedadagrad": Entry("FedAdagrad", "helpers.algorithms.fedopt:FedAdagrad"),
}


def algorithm_name(config: Mapping) -> str:
    """The config's algorithm (FedAvg configs leave it out: their run ids predate the choice)."""
    return config.get("algorithm", DEFAULT_ALGORITHM)


def algorithm_class(name: str) -> type:
    """The class of algorithm `name` (imported on first use: the algorithms need torch, this registry does not)."""
    module, attr = ALGORITHMS[name].home.split(":")
    return getattr(importlib.import_module(module), attr)


def make_algorithm(config: Mapping, folder: str | Path | None = None, guard: Callable[[], None] | None = None):
    """The config's algorithm; `folder` (a run folder) keeps per-client state on disk (SCAFFOLD's c_i), written after
    `guard()` (the run's lease check) like the folder's other files."""
    folder = Path(folder) if folder is not None else None
    return algorithm_class(algorithm_name(config)).from_config(config, folder, guard)
