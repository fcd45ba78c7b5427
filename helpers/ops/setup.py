"""The study's settings as one tidy table (`results/<profile>/setup.csv`), from the configs and the notebooks' plans
at the parameters each notebook declares: what is fixed a priori, what is tuned on which split over which grid, the
seeds per cell. The report reads it (helpers.reporting.setup: macros and the setup table) without importing ops."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from helpers.algorithms.merging import MERGE_TUNING
from helpers.algorithms.registry import ALGORITHMS, algorithm_class
from helpers.config.experiments import make_config, resolve_profile, train_split_size
from helpers.config.parsing import as_list
from helpers.core.settings import default_results_root
from helpers.core.storage import atomic_write
from helpers.editing.step0 import head_fedavg_config
from helpers.federated.clients import clients_per_round
from helpers.federated.interference import PROBE_IMAGES
from helpers.federated.rounds import rounds_for_budget
from helpers.ops.comparisons import remedy_algorithms, remedy_rounds
from helpers.ops.coverage import fed_seeds, sized
from helpers.ops.notebook import declared_parameters
from helpers.ops.plans import BASELINE_J, editing_base, scheduler_extra
from helpers.ops.tuning import tuning_grid, tuning_rounds
from helpers.reporting.labels import param_label, value_label
from helpers.reporting.summaries import SETUP_NAME
from helpers.sparse.masks import MASK_RULES
from helpers.sparse.sensitivity import DAMPING

COLUMNS = ("stage", "key", "label", "value", "how")
# fixed a priori; tuned on the validation split over a grid; follows from the others; a number only the prose quotes
# (not in the setup table)
HOWS = ("fixed", "tuned", "derived", "prose")
DIGITS = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")


def _values(values: object) -> str:
    """A notebook list as text: '1, 5, 10'."""
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in as_list(values))


def _notebook(name: str, profile: str) -> dict:
    """A notebook's declared parameters at `profile`, its sizes left at None resolved as its plan resolves them."""
    return sized({**declared_parameters(name), "PROFILE": profile}, name)


def setup_rows(profile: str = "full") -> pd.DataFrame:
    """One row per stated setting (stage, key: the macro's name, label, value as text, how it was set)."""
    rows: list[tuple[str, str, str, object, str]] = []

    def add(stage: str, key: str, label: str, value: object, how: str = "fixed") -> None:
        rows.append((stage, key, label, value, how))

    # 01: centralized
    p1 = _notebook("01_centralized", profile)
    c = make_config("centralized", profile, epochs=p1["EPOCHS"])
    n_train = train_split_size(c)
    add("centralized", "ImgSize", "image px", c["img_size"])
    add("centralized", "ValPercent", "validation share (%)", round(100 * c["val_fraction"]), "prose")
    add("centralized", "TrainSize", "train split (images)", f"{n_train:,}", "prose")
    add("centralized", "Batch", "batch size", c["batch_size"])
    add("centralized", "Epochs", "epochs", c["epochs"])
    add("centralized", "ProbeLr", "probe lr", p1["PROBE_LR"])
    add("centralized", "GridLr", "lr grid", _values(p1["GRID_LR"]), "tuned")
    add("centralized", "GridWeightDecay", "weight-decay grid", _values(p1["GRID_WEIGHT_DECAY"]), "tuned")
    add("centralized", "GridMomentum", "momentum", _values(p1["GRID_MOMENTUM"]))
    grid_runs = math.prod(len(as_list(p1[n])) for n in ("GRID_LR", "GRID_MOMENTUM", "GRID_WEIGHT_DECAY"))
    add("centralized", "GridRuns", "grid runs", grid_runs, "prose")
    add("centralized", "Schedulers", "schedules", ", ".join(as_list(p1["SCHEDULERS"])), "tuned")
    add("centralized", "NumSchedulers", "schedules compared", len(as_list(p1["SCHEDULERS"])), "prose")
    add("centralized", "WarmupEpochs", "warm-up epochs", p1["WARMUP_EPOCHS"], "prose")
    step_size = scheduler_extra(p1, c["epochs"])["step"]["step_size"]
    add("centralized", "StepSize", "step: epochs per drop", step_size, "prose")
    add("centralized", "StepGamma", "step: factor per drop", c["gamma"], "prose")
    add("centralized", "CentralSeeds", "seeds (final runs)", len(as_list(p1["SEEDS"])))

    # 02, 03: FedAvg
    p2, p3 = _notebook("02_fedavg_iid", profile), _notebook("03_fedavg_noniid", profile)
    f = make_config("fedavg", profile, num_clients=p2["NUM_CLIENTS"], participation=p2["PARTICIPATION"],
                    local_steps=p2["LOCAL_STEPS"], rounds=p2["ROUNDS"], lr=p2["LR"],
                    eval_every=p2["EVAL_EVERY"])  # fmt: skip
    m = clients_per_round(f["num_clients"], f["participation"])
    samples = f["rounds"] * m * f["local_steps"] * f["batch_size"]
    budget = p3["STEP_BUDGET"] or make_config("fedavg", profile)["rounds"] * BASELINE_J
    j_list = as_list(p3["J_LIST"])
    add("fedavg", "NumClients", "K", f["num_clients"])
    add("fedavg", "Participation", "C", f["participation"])
    add("fedavg", "ClientsPerRound", "clients per round", m, "prose")
    add("fedavg", "LocalSteps", "J (IID)", f["local_steps"])
    add("fedavg", "Rounds", "rounds (IID)", f["rounds"])
    add("fedavg", "ClientLr", "client lr", f["lr"])
    add("fedavg", "ClientLrSchedule", "client lr schedule", f["client_lr_schedule"], "prose")
    add("fedavg", "ClientMomentum", "client momentum", f["momentum"])
    add("fedavg", "ClientWeightDecay", "client weight decay", f["weight_decay"])
    add("fedavg", "EvalEvery", "eval. every (rounds)", f["eval_every"])
    add("fedavg", "NcList", "Nc", _values(p3["NC_LIST"]))
    add("fedavg", "JList", "J", _values(j_list))
    add("fedavg", "StepBudget", "J x rounds", f"{budget:,}")
    add("fedavg", "RoundsPerJ", "rounds per J", _values([rounds_for_budget(budget, j) for j in j_list]), "derived")
    add("fedavg", "FedSamples", "training samples (IID run)", f"{samples:,}", "prose")
    add("fedavg", "FedPasses", "passes over the train split (IID)", f"{samples / n_train:.1f}", "prose")
    add("fedavg", "IidSeeds", "seeds (IID)", len(fed_seeds(p2)))
    add("fedavg", "GridSeeds", "seeds per (Nc, J)", len(as_list(p3["SEEDS"])))
    add("fedavg", "HardestNc", "Nc with more seeds (and IID)", p3["HARDEST_NC"])
    add("fedavg", "KeySeeds", "their seeds, at every J", len(fed_seeds(p3)))

    # 04: centralized editing
    p4 = _notebook("04_model_editing", profile)
    e = make_config("sparse_centralized", profile, epochs=p4["EPOCHS"], lr=p4["LR"])
    add("editing", "Sparsities", "sparsities", _values(p4["SPARSITIES"]))
    add("editing", "CalRounds", "R", _values(p4["CALIBRATION_ROUNDS"]))
    add("editing", "CalSamples", "calibration images per round", f"{e['calibration_samples']:,}")
    add("editing", "EditLr", "lr", e["lr"])
    add("editing", "EditEpochs", "epochs", e["epochs"])
    add("editing", "Damping", "damping of frozen weights", DAMPING, "prose")
    add("editing", "StepZeroEpochs", "step 0: epochs", e["step0_epochs"])
    add("editing", "StepZeroLr", "step 0: lr", e["step0_lr"])
    add("editing", "EditSeeds", "seeds per cell", 1)  # 04 declares one SEED, not a list
    add("editing", "NumRules", "mask rules", len(MASK_RULES), "prose")

    # 05, 06: federated editing
    p5, p6 = _notebook("05_federated_editing", profile), _notebook("06_mask_strategies", profile)
    base = editing_base(p5)
    head = head_fedavg_config(base)
    add("federated editing", "FedSparsities", "sparsities", _values(p5["SPARSITIES"]))
    add("federated editing", "FedCalRounds", "R", _values(p5["CALIBRATION_ROUNDS"]))
    add("federated editing", "FedNcList", "Nc (and IID)", _values(p5["NC_LIST"]))
    add("federated editing", "FedCalSamples", "calibration images per client, round", base["calibration_samples"])
    add("federated editing", "StepZeroRounds", "step 0: FedAvg rounds", head["rounds"], "derived")
    add("federated editing", "StepZeroFedLr", "step 0: client lr", head["lr"])
    add("federated editing", "RulesSparsity", "mask rules: sparsity", p6["SPARSITY"])
    add("federated editing", "RulesCalRounds", "mask rules: calibration rounds R", p6["CALIBRATION_ROUNDS"])
    add("federated editing", "RulesNcList", "mask rules: Nc (and IID)", _values(p6["NC_LIST"]))
    add("federated editing", "FedEditSeeds", "seeds per (sparsity, R)", 1)  # 05's grid runs its one SEED
    add("federated editing", "RulesSeeds", "mask rules: seeds", len(fed_seeds(p6)))

    # 05: the remedies and the extension
    algorithms = remedy_algorithms(profile, None if p5["REMEDIES"] is None else as_list(p5["REMEDIES"]))
    rounds = remedy_rounds(base, p5["REMEDY_J"])
    add("remedies", "RemedyNc", "Nc", _values(p5["REMEDY_NC"]))
    add("remedies", "RemedyHardestNc", "tuned at Nc", min(as_list(p5["REMEDY_NC"])))
    add("remedies", "RemedyJ", "J", p5["REMEDY_J"])
    add("remedies", "RemedyRounds", "rounds", rounds, "derived")
    r = p5["REMEDY_CALIBRATION_ROUNDS"]
    add(
        "remedies",
        "RemedyCalRounds",
        "sparse arm: R",
        "best on validation" if r is None else r,
        "tuned" if r is None else "fixed",
    )
    add("remedies", "TuningRounds", "tuning rounds", tuning_rounds(rounds, p5["TUNING_BUDGET"]), "derived")
    add("remedies", "TuningSplit", "tuning split", value_label(p5["TUNING_SPLIT"]), "prose")
    for algorithm in algorithms:
        name, grid = tuning_grid(algorithm, p5["TUNING_GRIDS"])
        key = ALGORITHMS[algorithm].title.replace("-", "")
        title = ALGORITHMS[algorithm].title
        add("remedies", f"Grid{key}", f"{title}: {param_label(name)}", _values(grid), "tuned")
        for other, spec in algorithm_class(algorithm).params.items():
            if other != name:  # the algorithm's other parameters keep their papers' values
                add("remedies", f"{key}{_camel(other)}", f"{title}: {param_label(other)}", spec.default)
    if p5["EXTENSION"]:
        name, grid = tuning_grid("ties", p5["TUNING_GRIDS"])
        add("remedies", "GridTIES", f"TIES: {param_label(MERGE_TUNING[0])}", _values(grid), "tuned")
        add("remedies", "ProbeImages", "interference probe (images)", PROBE_IMAGES, "prose")
    add("remedies", "RemedySeeds", "seeds per cell", len(fed_seeds(p5)))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["value"] = [f"{v:g}" if isinstance(v, float) else str(v) for v in table["value"]]
    return table


def _camel(name: str) -> str:
    """server_momentum -> ServerMomentum (a macro name holds letters only)."""
    words = "".join(part.capitalize() for part in name.split("_"))
    return re.sub(r"\d", lambda d: DIGITS[int(d.group())], words)


def write_setup(profile: str, results_root: str | Path | None = None) -> Path:
    """results/<profile>/setup.csv from setup_rows (the same code gives the same file); $FLME_PROFILE wins over
    `profile`, as everywhere."""
    profile = resolve_profile(profile)
    folder = Path(results_root if results_root is not None else default_results_root()) / profile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SETUP_NAME}.csv"
    atomic_write(path, setup_rows(profile).to_csv(index=False).encode())
    return path
