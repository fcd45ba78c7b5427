"""The registry of federated algorithms: name -> its class (helpers.algorithms.fedavg's seam); config's `algorithm`
choice, the engines, the cost estimate and the report read it. A new algorithm: one module, one entry here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from helpers.algorithms.fedavg import DEFAULT_ALGORITHM, FedAvg
from helpers.algorithms.fedavgm import FedAvgM
from helpers.algorithms.fedopt import FedAdagrad, FedAdam, FedYogi
from helpers.algorithms.fedprox import FedProx
from helpers.algorithms.scaffold import ControlVariates, Scaffold

ALGORITHMS: dict[str, type[FedAvg]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedProx, Scaffold, FedAdam, FedYogi, FedAdagrad)
}
ALGORITHM_PARAMS = tuple(dict.fromkeys(p for cls in ALGORITHMS.values() for p in cls.params))  # every one, once


def algorithm_name(config: Mapping) -> str:
    """The config's algorithm (FedAvg configs leave it out: their run ids predate the choice)."""
    return config.get("algorithm", DEFAULT_ALGORITHM)


def keep_own_parameters(config: dict, given: Mapping) -> None:
    """In a config being made: keep its algorithm's own parameters, drop the others', refuse those `given`."""
    algorithm = config["algorithm"]
    for name in ALGORITHM_PARAMS:
        if name in ALGORITHMS[algorithm].params:
            continue
        if name in given:
            users = [a for a, cls in ALGORITHMS.items() if name in cls.params]
            raise ValueError(
                f"{name}={given[name]!r} is invalid with algorithm={algorithm!r}: {name} is a parameter of "
                f"algorithm {' or '.join(repr(u) for u in users)} (algorithm: one of {', '.join(ALGORITHMS)})"
            )
        del config[name]


def make_algorithm(
    config: Mapping, folder: str | Path | None = None, guard: Callable[[], None] | None = None
) -> FedAvg:
    """The config's algorithm; `folder` (a run folder) keeps per-client state on disk (SCAFFOLD's c_i), written after
    `guard()` (the run's lease check) like the folder's other files."""
    cls = ALGORITHMS[algorithm_name(config)]
    if cls is Scaffold:
        store = ControlVariates(Path(folder) / "control_variates" if folder is not None else None, guard)
        return Scaffold(config, store)
    return cls(config)
