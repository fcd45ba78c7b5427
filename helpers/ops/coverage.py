"""The study's sizes that depend on the profile and on the plan's size: the seeds of the federated cells the
conclusions rest on (`FED_SEEDS`), 05's sparsities, calibration rounds and remedies' Nc, 06's Nc. A notebook
parameter left at None takes its value here: the complete plan (full), the reduced plan for teams short of time
(full with `REDUCED=True`) or smoke's (one seed: the CI pipeline runs on 2 cores)."""

from __future__ import annotations

from collections.abc import Mapping

from helpers.config.experiments import check_value, resolve_profile
from helpers.config.parsing import as_list

SIZES: dict[tuple[str, str], dict[str, list]] = {  # (notebook or "*", parameter) -> {size: its value}
    ("*", "FED_SEEDS"): {"complete": [0, 1, 2], "reduced": [0, 1, 2], "smoke": [0]},
    ("05_federated_editing", "SPARSITIES"): {"complete": [0.9, 0.95, 0.99], "reduced": [0.9, 0.99], "smoke": [0.9]},
    ("05_federated_editing", "CALIBRATION_ROUNDS"): {"complete": [1, 2, 4], "reduced": [1, 4], "smoke": [1, 2]},
    ("05_federated_editing", "REMEDY_NC"): {"complete": [1, 5], "reduced": [1], "smoke": [1, 5]},
    ("06_mask_strategies", "NC_LIST"): {"complete": [1, 10], "reduced": [1], "smoke": [10]},
}  # fmt: skip
BEFORE_ADDITIONS: dict[str, dict] = {  # notebook -> what its parameters were before issue 33 added seeds and coverage
    "02_fedavg_iid": {"FED_SEEDS": [0]},
    "03_fedavg_noniid": {"FED_SEEDS": [0]},
    "05_federated_editing": {
        "SPARSITIES": [0.9],
        "CALIBRATION_ROUNDS": [1, 2],
        "REMEDY_CALIBRATION_ROUNDS": 1,
        "FED_SEEDS": [0],
    },
    "06_mask_strategies": {"NC_LIST": [10], "FED_SEEDS": [0]},
}
ADDITIONS: list[tuple[str, set[str]]] = [  # in the order the cost adds them: what, the parameters it sets again
    ("05: sparsity x calibration rounds", {"SPARSITIES", "CALIBRATION_ROUNDS"}),
    ("05: the remedies' and extension's sparse arm at the best R", {"REMEDY_CALIBRATION_ROUNDS"}),
    ("06: the mask rules at the hardest Nc too", {"NC_LIST"}),
    ("3 seeds for the cells the conclusions rest on", {"FED_SEEDS"}),
]


def plan_size(p: Mapping) -> str:
    """Which sizes apply: "smoke" on the smoke profile, else "reduced" (REDUCED=True) or "complete"."""
    if resolve_profile(p["PROFILE"]) == "smoke":
        return "smoke"
    return "reduced" if p.get("REDUCED") else "complete"


def sized(p: Mapping, notebook: str) -> dict:
    """`p` with each of the notebook's sizes left at None taken from SIZES (for the profile and plan size)."""
    size, out = plan_size(p), dict(p)
    for (nb, name), values in SIZES.items():
        if nb in ("*", notebook) and name in out and out[name] is None:
            out[name] = list(values[size])
    return out


def fed_seeds(p: Mapping) -> list[int]:
    """The seeds of the cells the conclusions rest on: SEED (or SEEDS) first, then FED_SEEDS, each once; a bad
    FED_SEEDS stops with one line naming it."""
    given = p["FED_SEEDS"] if p.get("FED_SEEDS") is not None else SIZES["*", "FED_SEEDS"][plan_size(p)]
    try:
        seeds = as_list(given)
    except ValueError:
        raise ValueError(f"FED_SEEDS={given!r} is invalid: must be a list of seeds (integers >= 0)") from None
    if not seeds:
        raise ValueError(f"FED_SEEDS={given!r} is invalid: give at least one seed (None: 3 in full, 1 in smoke)")
    for seed in seeds:
        try:
            check_value("seed", seed)
        except ValueError as exc:
            raise ValueError(f"FED_SEEDS={given!r} is invalid: {str(exc).split(' is invalid: ', 1)[-1]}") from None
    first = as_list(p["SEEDS"]) if "SEEDS" in p else [p["SEED"]]
    return list(dict.fromkeys([*first, *seeds]))


def seeds_note(p: Mapping, seeds: list[int]) -> str:
    """What the plan prints about its seeds (smoke says that it runs one where full runs three)."""
    full = len(SIZES["*", "FED_SEEDS"]["complete"])
    smoke = " (smoke: one seed; full runs 3)" if plan_size(p) == "smoke" and len(seeds) < full else ""
    return f"{len(seeds)} seed{'s' * (len(seeds) != 1)} {seeds}{smoke}"
