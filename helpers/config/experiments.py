"""Profiles, parameters and their validation: every experiment's config is checked before compute starts."""

from __future__ import annotations

import ast
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from helpers.algorithms.fedavg import DEFAULT_ALGORITHM
from helpers.algorithms.registry import ALGORITHM_PARAMS, ALGORITHMS, keep_own_parameters
from helpers.sparse.masks import DEFAULT_MASK_RULE, MASK_RULES, one_shot

REPO = Path(__file__).resolve().parents[2]  # the repository: notebooks/, results/, figures/, report/ under it
PROFILES = ("smoke", "full")
NUM_CLASSES = 100  # CIFAR-100 and its synthetic stand-in
PROFILE_ENV = "FLME_PROFILE"


@dataclass(frozen=True)
class Param:
    """One parameter: its type, what values are allowed, and whether it is part of the run's identity."""

    kind: type
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hashed: bool = True  # False: changes nothing in the results (device, paths, checkpoint cadence)
    # Added after results existed: at this value (the old behaviour) a config leaves the parameter out, so earlier
    # run ids, config.json files and results CSVs stay exactly as they were. Read such values with `setting`.
    omitted_at: object = None

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{name} in {lo}{self.low}, {self.high}{hi}"
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {self.low}"
        return name


def _choice(*values: str, hashed: bool = True, omitted_at: str | None = None) -> Param:
    return Param(str, choices=values, hashed=hashed, omitted_at=omitted_at)


PARAMS: dict[str, Param] = {
    # identity of the data and model
    "profile": _choice(*PROFILES),
    "dataset": _choice("cifar100", "synthetic"),
    "model": _choice("vit_small_patch16_224.dino", "vit_tiny_smoke"),
    "pretrained": Param(bool),
    "img_size": Param(int, low=16, high=1024),
    "synthetic_train_size": Param(int, low=200),
    "synthetic_test_size": Param(int, low=100),
    "val_fraction": Param(float, low=0, high=1, low_open=True, high_open=True),
    "data_seed": Param(int, low=0),
    "seed": Param(int, low=0),
    "augment": _choice("crop", "rrc", "none"),
    # optimisation
    "train_mode": _choice("full", "head"),
    "head_features": _choice("cached", "backbone"),  # head-only runs: train on cached features or via the backbone
    "batch_size": Param(int, low=1),
    "lr": Param(float, low=0, low_open=True),
    "momentum": Param(float, low=0, high=1, high_open=True),
    # mixed precision: auto = fp16 + GradScaler below sm_80 (T4), bf16 from sm_80, fp32 on CPU (helpers.core.precision)
    "amp": _choice("auto", "fp16", "bf16", "fp32", omitted_at="auto"),
    "weight_decay": Param(float, low=0),
    "epochs": Param(int, low=1),
    "scheduler": _choice("cosine", "step", "constant", "warmup_cosine"),
    "warmup_epochs": Param(int, low=0),
    "step_size": Param(int, low=1),
    "gamma": Param(float, low=0, high=1, low_open=True),
    # federated
    "num_clients": Param(int, low=1),
    "participation": Param(float, low=0, high=1, low_open=True),
    "local_steps": Param(int, low=1),
    "rounds": Param(int, low=1),
    "sharding": _choice("iid", "noniid", "dirichlet"),
    "classes_per_client": Param(int, low=1),
    "dirichlet_alpha": Param(float, low=0, low_open=True),
    "server_lr": Param(float, low=0, low_open=True),
    "client_lr_schedule": _choice("constant", "cosine"),
    # who runs the clients: helpers.federated one after another in this process, or Flower apps (helpers.flower)
    "engine": _choice("sequential", "flower"),
    # where val/test are evaluated: on the server, or each client on its part of the split (federated.evaluation)
    "evaluation": _choice("server", "clients", omitted_at="server"),
    # a Flower node that fails mid-round (no reply, error, invalid reply): stop the run, or drop it from the round
    "node_failure": _choice("stop", "drop", omitted_at="stop"),
    # seconds the server waits for a round's replies (0: no limit); a node silent that long has failed (node_failure)
    "node_timeout_s": Param(float, low=0, hashed=False, omitted_at=0.0),
    # remedies against client drift (helpers.algorithms); each algorithm's own parameters are in its configs only
    "algorithm": _choice(*ALGORITHMS, omitted_at=DEFAULT_ALGORITHM),
    "server_momentum": Param(float, low=0, high=1, high_open=True),  # FedAvgM
    "prox_mu": Param(float, low=0),  # FedProx
    "scaffold_option": _choice("II", "I"),  # SCAFFOLD's control-variate update (the paper's options)
    "server_beta1": Param(float, low=0, high=1, high_open=True),  # FedAdam, FedYogi, FedAdagrad
    "server_beta2": Param(float, low=0, high=1, high_open=True),  # FedAdam, FedYogi
    "server_tau": Param(float, low=0, low_open=True),  # FedAdam, FedYogi, FedAdagrad
    # systems heterogeneity: the fraction of sampled clients that stop early (helpers.federated.stragglers)
    "stragglers": Param(float, low=0, high=1, high_open=True, omitted_at=0.0),
    # the client lr rises linearly over the first rounds (the TaLoS reference warms up for 500 steps)
    "warmup_rounds": Param(int, low=0, omitted_at=0),
    # model editing (sparse fine-tuning, §9): sparsity = fraction of backbone entries FROZEN
    "sparsity": Param(float, low=0, high=1, high_open=True),
    "calibration_rounds": Param(int, low=1),
    "mask_rule": _choice(*MASK_RULES),
    "score_method": _choice("talos", "empirical", "batch"),
    # samples scored per calibration round: of the train split, or of each client's shard (at most all of it)
    "calibration_samples": Param(int, low=1),
    # cls_token and pos_embed: under the mask like every backbone tensor, or trained densely (the TaLoS reference)
    "embeddings": _choice("masked", "dense"),
    "step0": _choice("sgd", "ridge"),
    "step0_epochs": Param(int, low=1),
    "step0_lr": Param(float, low=0, low_open=True),
    "ridge_lambda": Param(float, low=0, low_open=True),
    "mask_scope": _choice("global", "local"),
    # sensitivity scored on images under the evaluation preprocessing, or augmented as in training (TaLoS)
    "score_transform": _choice("eval", "train", omitted_at="eval"),
    # evaluation and bookkeeping (not part of the run identity)
    "eval_every": Param(int, low=1),
    "eval_test": Param(bool),
    "eval_batch_size": Param(int, low=1, hashed=False),
    "checkpoint_every": Param(int, low=1, hashed=False),
    "checkpoint_minutes": Param(float, low=0, low_open=True, hashed=False),
    "device": _choice("auto", "cpu", "cuda", hashed=False),
    "compile": Param(bool, hashed=False),  # torch.compile the trained module (same math, faster on GPU)
    # deterministic kernels (torch, cuDNN, cuBLAS workspace) so that a CUDA kill-resume can be compared exactly
    "deterministic": Param(bool, hashed=False, omitted_at=False),
    "data_root": Param(str, hashed=False),
}

# fmt: off
# Profile defaults: `full` is the course's setting, `smoke` the same code paths at toy sizes.
COMMON_DEFAULTS = {
    "val_fraction": 0.1, "data_seed": 0, "seed": 0, "augment": "crop", "train_mode": "full",
    "head_features": "cached",
    "momentum": 0.9, "weight_decay": 5e-5, "scheduler": "cosine", "warmup_epochs": 0, "step_size": 3,
    "gamma": 0.1, "eval_every": 1, "eval_test": False, "checkpoint_every": 1, "checkpoint_minutes": 10.0,
    "device": "auto", "compile": False, "data_root": "./data", "synthetic_train_size": 3000, "synthetic_test_size": 500,
    "amp": "auto", "deterministic": False,
    "num_clients": 100, "participation": 0.1, "local_steps": 4, "sharding": "iid", "classes_per_client": 5,
    "dirichlet_alpha": 0.5, "server_lr": 1.0, "client_lr_schedule": "constant", "engine": "sequential",
    "algorithm": DEFAULT_ALGORITHM, "server_momentum": 0.9, "prox_mu": 0.01, "scaffold_option": "II",
    "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 1e-3, "stragglers": 0.0, "warmup_rounds": 0,
    "score_transform": "eval", "evaluation": "server", "node_failure": "stop", "node_timeout_s": 0.0,
    "sparsity": 0.9, "calibration_rounds": 4, "mask_rule": DEFAULT_MASK_RULE, "score_method": "talos",
    "step0": "sgd", "step0_lr": 0.1, "ridge_lambda": 1.0, "mask_scope": "global", "embeddings": "masked",
}
PROFILE_DEFAULTS = {
    "full": {
        "dataset": "cifar100", "model": "vit_small_patch16_224.dino", "pretrained": True, "img_size": 224,
        "batch_size": 64, "eval_batch_size": 256, "lr": 0.01, "epochs": 10, "rounds": 500,
        "calibration_samples": 5000, "step0_epochs": 5,
    },
    "smoke": {
        "dataset": "synthetic", "model": "vit_tiny_smoke", "pretrained": False, "img_size": 32,
        # 6000 images: 54 per class in the train split, enough for K=100 clients with Nc=50 (the course grid).
        "batch_size": 32, "eval_batch_size": 500, "lr": 0.05, "epochs": 2, "rounds": 4,
        "synthetic_train_size": 6000, "synthetic_test_size": 500,
        "calibration_samples": 256, "step0_epochs": 2,
    },
}
# Federated runs only: at 224 px a val pass (5,000 images) every round is about 40% of a FedAvg run's T4 time;
# every 5th round (and always the last) still draws 100 points over 500 rounds.
FEDERATED_DEFAULTS = {"full": {"eval_every": 5}, "smoke": {}}

_DATA = ("profile", "dataset", "model", "pretrained", "img_size", "synthetic_train_size",
         "synthetic_test_size", "val_fraction", "data_seed", "seed", "augment", "data_root", "device")
_OPTIM = ("train_mode", "head_features", "batch_size", "lr", "momentum", "weight_decay", "amp")
# Remedies against heterogeneity: the algorithm, its parameters, stragglers (FedAvg configs hold none of them)
REMEDIES = ("algorithm", *ALGORITHM_PARAMS, "stragglers")
_BOOK = ("eval_every", "eval_batch_size", "checkpoint_every", "checkpoint_minutes", "compile", "deterministic")
EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "centralized": _DATA + _OPTIM + _BOOK + ("epochs", "scheduler", "warmup_epochs", "step_size", "gamma",
                                             "eval_test"),
    "fedavg": _DATA + _OPTIM + _BOOK + ("num_clients", "participation", "local_steps", "rounds", "sharding",
                                        "classes_per_client", "dirichlet_alpha", "server_lr",
                                        "client_lr_schedule", "engine", "eval_test", *REMEDIES,
                                        "warmup_rounds", "evaluation", "node_failure", "node_timeout_s"),
}

_EDIT = ("sparsity", "calibration_rounds", "mask_rule", "score_method", "calibration_samples", "embeddings",
         "step0", "step0_epochs", "step0_lr", "ridge_lambda", "score_transform")
# What only the mask depends on: sparsity 0 (the dense control) has no mask, so these take their defaults.
MASK_ONLY = ("calibration_rounds", "mask_rule", "score_method", "calibration_samples", "embeddings", "mask_scope",
             "score_transform")
# Sparse fine-tuning trains the masked backbone with the step-0 head frozen: train_mode does not apply.
_HEAD_ONLY = ("train_mode", "head_features")
EXPERIMENTS["sparse_centralized"] = tuple(n for n in EXPERIMENTS["centralized"] if n not in _HEAD_ONLY) + _EDIT
EXPERIMENTS["sparse_fedavg"] = tuple(n for n in EXPERIMENTS["fedavg"] if n not in _HEAD_ONLY) + _EDIT + (
    "mask_scope",)
# fmt: on


def profile_defaults(experiment: str, profile: str) -> dict:
    """Each parameter's default for `experiment` under `profile` (before values derived from others)."""
    federated = FEDERATED_DEFAULTS[profile] if "rounds" in EXPERIMENTS[experiment] else {}
    merged = {**COMMON_DEFAULTS, **PROFILE_DEFAULTS[profile], **federated, "profile": profile}
    return {name: merged[name] for name in EXPERIMENTS[experiment]}


def describe_parameters(experiments: list[str]) -> str:
    """A text table of every parameter of `experiments`: type, allowed values, each profile's default."""
    kinds = {int: "int", float: "float", bool: "bool", str: "str"}
    defaults = {(e, p): profile_defaults(e, p) for e in experiments for p in PROFILES}
    rows = [("name", "type", *PROFILES, "allowed")]
    for name in (n for n in PARAMS if any(n in EXPERIMENTS[e] for e in experiments)):
        users = [e for e in experiments if name in EXPERIMENTS[e]]
        # 'a or b' where experiments differ, e.g. eval_every under full: 1 centralized, 5 federated
        shown = [" or ".join(sorted({str(defaults[e, p][name]) for e in users})) for p in PROFILES]
        only = f" ({', '.join(users)} only)" if len(users) < len(experiments) else ""
        rows.append((name, kinds[PARAMS[name].kind], *shown, PARAMS[name].allowed() + only))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


def as_list(value: object) -> list:
    """A notebook list parameter as a list: papermill `-p NAME "[1, 5]"` passes text, `-y` passes a list."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{value!r} is not a list: write it like [1, 5] (or pass it with papermill -y)") from None
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_profile(profile: str | None = None) -> str:
    """The profile to use: env FLME_PROFILE wins over the notebook/CLI value, which wins over `smoke`."""
    chosen = os.environ.get(PROFILE_ENV) or profile or "smoke"
    if chosen not in PROFILES:
        source = f"environment variable {PROFILE_ENV}" if os.environ.get(PROFILE_ENV) else "profile"
        raise ValueError(f"{source}={chosen!r} is invalid: must be one of {', '.join(PROFILES)}")
    return chosen


def parse_value(name: str, text: str) -> object:
    """Convert a command-line string (`--set name=text`) to the parameter's type."""
    kind = _param(name).kind
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={text!r} is invalid: must be true or false")
    if kind is str:
        return text
    try:
        return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is invalid: must be {_param(name).allowed()}") from None


def parse_sets(pairs: list[str], experiment: str) -> dict:
    """['lr=0.1', 'epochs=3'] -> {'lr': 0.1, 'epochs': 3}, typed by each parameter's kind."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r} is invalid: must look like name=value")
        name, text = (part.strip() for part in pair.split("=", 1))
        if name not in EXPERIMENTS[experiment]:
            allowed = ", ".join(sorted(EXPERIMENTS[experiment]))
            raise ValueError(f"unknown parameter {name!r} for experiment {experiment!r}; allowed: {allowed}")
        out[name] = parse_value(name, text)
    return out


def make_config(experiment: str, profile: str | None = None, **overrides: object) -> dict:
    """Profile defaults for `experiment`, then explicit overrides, all validated; raises ValueError."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment={experiment!r} is unknown; allowed: {', '.join(EXPERIMENTS)}")
    names = EXPERIMENTS[experiment]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for experiment {experiment!r}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    profile = resolve_profile(profile)
    given = {k: v for k, v in overrides.items() if v is not None}  # None means "the profile's default"
    federated = FEDERATED_DEFAULTS[profile] if "rounds" in names else {}
    merged = {**COMMON_DEFAULTS, **PROFILE_DEFAULTS[profile], **federated, "profile": profile, **given}
    if "train_mode" in names and merged["train_mode"] == "head" and merged["head_features"] == "cached":
        # Cached features are un-augmented: the config states what the run does instead of ignoring `augment`.
        if given.get("augment", "none") != "none":
            raise ValueError(
                f"augment={given['augment']!r} is invalid with train_mode='head' and head_features='cached' "
                "(cached features are un-augmented): use augment='none', or head_features='backbone' to "
                "augment through the backbone at every step"
            )
        merged["augment"] = "none"
    config = {name: merged[name] for name in names}
    for name, value in config.items():
        config[name] = check_value(name, value)
    if "algorithm" in names:
        keep_own_parameters(config, given)
    if "sparsity" in names:
        _derive_editing(config, given, {**COMMON_DEFAULTS, **PROFILE_DEFAULTS[profile]})
    _check_combinations(config)
    return {k: v for k, v in config.items() if not _omitted(k, v)}


def _omitted(name: str, value: object) -> bool:
    spec = PARAMS[name]
    return spec.omitted_at is not None and type(value) is type(spec.omitted_at) and value == spec.omitted_at


def setting(config: dict, name: str) -> object:
    """config[name], or the parameter's `omitted_at` value where the config leaves it out (see Param)."""
    return config[name] if name in config or PARAMS[name].omitted_at is None else PARAMS[name].omitted_at


def _derive_editing(config: dict, given: dict, defaults: dict) -> None:
    """Editing values that follow from others (in place, on validated values)."""
    if config["sparsity"] == 0:
        # The dense control: an all-ones mask, nothing to calibrate. One run id whatever the mask settings say.
        config.update({k: defaults[k] for k in MASK_ONLY if k in config}, calibration_rounds=1)
    if "num_clients" in config and (config["sparsity"] == 0 or "calibration_samples" not in given):
        # The profile's count is a total: a federated run's clients score that many together (TaLoS: 5,000).
        config["calibration_samples"] = math.ceil(defaults["calibration_samples"] / config["num_clients"])


def check_value(name: str, value: object) -> object:
    """Validate one value against its Param; returns it (ints accepted where floats are expected)."""
    spec = _param(name)
    if spec.kind in (int, float) and isinstance(value, numbers.Number) and not isinstance(value, bool):
        # numpy scalars from pandas tables are fine where they are exact
        if spec.kind is float and isinstance(value, numbers.Real):
            value = float(value)
        elif isinstance(value, numbers.Integral):
            value = int(value)
    ok_type = isinstance(value, spec.kind) and not (spec.kind is int and isinstance(value, bool))
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok_type = float(value), True
    bad = not ok_type
    if not bad and spec.choices:
        bad = value not in spec.choices
    if not bad and spec.kind in (int, float):
        bad = not math.isfinite(value)
        if spec.low is not None:
            bad = bad or (value <= spec.low if spec.low_open else value < spec.low)
        if spec.high is not None:
            bad = bad or (value >= spec.high if spec.high_open else value > spec.high)
    if bad:
        raise ValueError(f"{name}={value!r} is invalid: must be {spec.allowed()}")
    return value


def _param(name: str) -> Param:
    if name not in PARAMS:
        raise ValueError(f"unknown parameter {name!r}; allowed: {', '.join(sorted(PARAMS))}")
    return PARAMS[name]


def _check_combinations(config: dict) -> None:
    """Rules that involve more than one parameter."""
    if config.get("scheduler") == "warmup_cosine" and config["warmup_epochs"] >= config["epochs"]:
        raise ValueError(f"warmup_epochs={config['warmup_epochs']} is invalid: must be < epochs={config['epochs']}")
    if config["model"] == "vit_tiny_smoke" and config["pretrained"]:
        raise ValueError("pretrained=True is invalid with model='vit_tiny_smoke': must be false (no weights)")
    if config["model"] != "vit_tiny_smoke" and config["img_size"] % 16:
        raise ValueError(f"img_size={config['img_size']} is invalid for ViT-S/16: must be a multiple of 16")
    if config["model"] == "vit_tiny_smoke" and config["img_size"] % 8:
        raise ValueError(f"img_size={config['img_size']} is invalid for the tiny ViT: must be a multiple of 8")
    if config.get("calibration_rounds", 1) > 1 and one_shot(config["mask_rule"]):
        rounds = "/".join(r for r in MASK_RULES if not one_shot(r))
        raise ValueError(
            f"calibration_rounds={config['calibration_rounds']} is invalid with mask_rule={config['mask_rule']!r}: "
            f"rounds only apply to {rounds} (the other rules are one-shot); use calibration_rounds=1"
        )
    if setting(config, "node_failure") == "drop" and ALGORITHMS[setting(config, "algorithm")].node_state:
        raise ValueError(  # its node may have stored c_i+ already: c would no longer be the mean of the c_i
            f"node_failure='drop' is invalid with algorithm={setting(config, 'algorithm')!r} (its clients keep state "
            "between rounds that a dropped reply would leave inconsistent): must be 'stop'"
        )
    if "num_clients" in config:
        if config["sharding"] == "noniid" and config["classes_per_client"] > 100:
            raise ValueError(f"classes_per_client={config['classes_per_client']} is invalid: must be in [1, 100]")
        if config["sharding"] == "noniid" and config["num_clients"] * config["classes_per_client"] < 100:
            raise ValueError(
                f"classes_per_client={config['classes_per_client']} with num_clients={config['num_clients']} "
                "is invalid: num_clients * classes_per_client must be >= 100 (every class needs a client)"
            )
        _check_federated(config)


def train_class_counts(config: dict) -> list[int]:
    """Per-class sizes of the train split from the config alone (mirrors data.stratified_split)."""
    if config["dataset"] == "cifar100":
        counts = [500] * NUM_CLASSES
    else:  # data.make_synthetic labels sample i with class i % 100
        n = config["synthetic_train_size"]
        counts = [len(range(c, n, NUM_CLASSES)) for c in range(NUM_CLASSES)]
    return [c - int(round(config["val_fraction"] * c)) for c in counts]


def train_split_size(config: dict) -> int:
    """Number of samples in the train split (45,000 for CIFAR-100 with 10% val)."""
    return sum(train_class_counts(config))


def split_sizes(config: dict) -> tuple[int, int, int]:
    """Train, val and test split sizes from the config alone."""
    n_train = train_split_size(config)
    total = 50_000 if config["dataset"] == "cifar100" else config["synthetic_train_size"]
    n_test = 10_000 if config["dataset"] == "cifar100" else config["synthetic_test_size"]
    return n_train, total - n_train, n_test


def _check_federated(config: dict) -> None:
    """Rules that need the train split's size (known from the config alone, before any data is loaded)."""
    counts, k = train_class_counts(config), config["num_clients"]
    if k > sum(counts):
        raise ValueError(
            f"num_clients={k} is invalid: must be <= {sum(counts)} (the train split size); "
            "every client needs at least one sample"
        )
    if config["sharding"] == "noniid":
        nc = config["classes_per_client"]
        slots = sum(min(k, c) for c in counts)  # a class of n samples can have at most n holders
        if slots < k * nc:
            raise ValueError(
                f"classes_per_client={nc} with num_clients={k} is invalid: needs {k * nc} (client, class) "
                f"pairs but the train split can fill only {slots}; lower num_clients or classes_per_client"
            )


def omitted_defaults() -> dict:
    """The parameters a config leaves out at their old behaviour (Param.omitted_at), with that value."""
    return {name: spec.omitted_at for name, spec in PARAMS.items() if spec.omitted_at is not None}


def hashed_items(config: dict) -> dict:
    """The part of a config that identifies a run (bookkeeping parameters left out)."""
    return {k: v for k, v in sorted(config.items()) if PARAMS[k].hashed}
