"""Each experiment's parameters and each profile's defaults; `make_config` validates a config before any compute
(every value, the combinations, what the train split can hold). The parameters are helpers.core.params' and each
federated algorithm's own (helpers.algorithms), assembled here from the registries on every call."""

from __future__ import annotations

import math
from dataclasses import replace

from helpers.algorithms.merging import DEFAULT_MERGE_DENSITY, MERGE_RULES
from helpers.algorithms.registry import ALGORITHMS, algorithm_class
from helpers.core.params import DEFAULT_ALGORITHM, DEFAULT_MASK_RULE, MASK_ONLY, PARAMS, Param
from helpers.core.settings import PROFILES, profile_override
from helpers.data.datasets import NUM_CLASSES
from helpers.sparse.masks import MASK_RULES, one_shot

# fmt: off
# Profile defaults: `full` is the course's setting, `smoke` the same code paths at toy sizes. A federated
# algorithm's own parameters take their defaults from the algorithm (helpers.algorithms: each from its paper).
COMMON_DEFAULTS = {
    "val_fraction": 0.1, "data_seed": 0, "seed": 0, "augment": "crop", "train_mode": "full",
    "head_features": "cached",
    "momentum": 0.9, "weight_decay": 5e-5, "scheduler": "cosine", "warmup_epochs": 0, "step_size": 3,
    "gamma": 0.1, "eval_every": 1, "eval_test": False, "checkpoint_every": 1, "checkpoint_minutes": 10.0,
    "device": "auto", "compile": False, "data_root": "./data", "synthetic_train_size": 3000, "synthetic_test_size": 500,
    "amp": "auto", "deterministic": False,
    "num_clients": 100, "participation": 0.1, "local_steps": 4, "sharding": "iid", "classes_per_client": 5,
    "dirichlet_alpha": 0.5, "client_lr_schedule": "constant", "engine": "sequential",
    "algorithm": DEFAULT_ALGORITHM, "stragglers": 0.0, "warmup_rounds": 0,
    "score_transform": "eval", "evaluation": "server", "node_failure": "stop", "node_timeout_s": 0.0,
    "update_bound": 10.0, "merge": "mean", "merge_density": DEFAULT_MERGE_DENSITY, "interference_probe": 0,
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
_BOOK = ("eval_every", "eval_batch_size", "checkpoint_every", "checkpoint_minutes", "compile", "deterministic")
_ALGORITHMS = "<the algorithms' own parameters>"  # where they go in a federated config (in the registry's order)
_CENTRALIZED = _DATA + _OPTIM + _BOOK + ("epochs", "scheduler", "warmup_epochs", "step_size", "gamma", "eval_test")
_FEDERATED = _DATA + _OPTIM + _BOOK + (
    "num_clients", "participation", "local_steps", "rounds", "sharding", "classes_per_client", "dirichlet_alpha",
    "server_lr", "client_lr_schedule", "engine", "eval_test", "algorithm", _ALGORITHMS, "stragglers",
    "warmup_rounds", "evaluation", "node_failure", "node_timeout_s", "update_bound", "merge", "merge_density",
    "interference_probe")
_EDIT = ("sparsity", "calibration_rounds", "mask_rule", "score_method", "calibration_samples", "embeddings",
         "step0", "step0_epochs", "step0_lr", "ridge_lambda", "score_transform")
# Sparse fine-tuning trains the masked backbone with the step-0 head frozen: train_mode does not apply.
_HEAD_ONLY = ("train_mode", "head_features")
_LAYOUT = {
    "centralized": _CENTRALIZED,
    "fedavg": _FEDERATED,
    "sparse_centralized": tuple(n for n in _CENTRALIZED if n not in _HEAD_ONLY) + _EDIT,
    "sparse_fedavg": tuple(n for n in _FEDERATED if n not in _HEAD_ONLY) + _EDIT + ("mask_scope",),
}
# fmt: on
EXPERIMENTS = tuple(_LAYOUT)


def algorithm_params() -> dict[str, dict[str, Param]]:
    """{algorithm: its own parameters}, in the registry's order."""
    return {name: algorithm_class(name).params for name in ALGORITHMS}


def parameters() -> dict[str, Param]:
    """Every parameter: helpers.core.params' (the registries' names as the choices of `algorithm` and `mask_rule`)
    and each algorithm's own (algorithms that share one, e.g. server_lr, differ only in its default)."""
    params = {
        **PARAMS,
        "algorithm": replace(PARAMS["algorithm"], choices=tuple(ALGORITHMS)),
        "mask_rule": replace(PARAMS["mask_rule"], choices=tuple(MASK_RULES)),
        "merge": replace(PARAMS["merge"], choices=tuple(MERGE_RULES)),
    }
    for own in algorithm_params().values():
        for name, spec in own.items():
            params.setdefault(name, spec)
    return params


def experiment_parameters(experiment: str) -> tuple[str, ...]:
    """The parameters of `experiment`, in the order its configs (and results CSVs) hold them."""
    if experiment not in _LAYOUT:
        raise ValueError(f"experiment={experiment!r} is unknown; allowed: {', '.join(EXPERIMENTS)}")
    names: list[str] = []
    for name in _LAYOUT[experiment]:
        if name == _ALGORITHMS:
            names += [p for own in algorithm_params().values() for p in own if p not in _LAYOUT[experiment]]
        else:
            names.append(name)
    return tuple(dict.fromkeys(names))


def remedy_parameters() -> tuple[str, ...]:
    """The remedies against heterogeneity: the algorithm, every algorithm's own parameters, stragglers."""
    return ("algorithm", *dict.fromkeys(p for own in algorithm_params().values() for p in own), "stragglers")


def resolve_profile(profile: str | None = None) -> str:
    """The profile to use: env FLME_PROFILE wins over the notebook/CLI value, which wins over `smoke`."""
    chosen = profile_override() or profile or "smoke"
    if chosen not in PROFILES:
        source = "environment variable FLME_PROFILE" if profile_override() else "profile"
        raise ValueError(f"{source}={chosen!r} is invalid: must be one of {', '.join(PROFILES)}")
    return chosen


def profile_defaults(experiment: str, profile: str, algorithm: str = DEFAULT_ALGORITHM) -> dict:
    """Each parameter's default for `experiment` under `profile` (before values derived from others); a federated
    experiment's algorithm parameters are `algorithm`'s."""
    names = experiment_parameters(experiment)
    federated = FEDERATED_DEFAULTS[profile] if "rounds" in names else {}
    own = {n: spec.default for n, spec in algorithm_class(algorithm).params.items()}
    merged = {**COMMON_DEFAULTS, **PROFILE_DEFAULTS[profile], **federated, **own, "algorithm": algorithm,
              "profile": profile}  # fmt: skip
    return {name: merged[name] for name in names if name in merged}


def check_value(name: str, value: object) -> object:
    """Validate one value against its parameter; returns it (ints accepted where floats are expected)."""
    params = parameters()
    if name not in params:
        raise ValueError(f"unknown parameter {name!r}; allowed: {', '.join(sorted(params))}")
    return params[name].check(name, value)


def make_config(experiment: str, profile: str | None = None, **overrides: object) -> dict:
    """Profile defaults for `experiment`, then explicit overrides, all validated; raises ValueError."""
    names = experiment_parameters(experiment)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for experiment {experiment!r}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    profile = resolve_profile(profile)
    given = {k: check_value(k, v) for k, v in overrides.items() if v is not None}  # None: the profile's default
    algorithm = given.get("algorithm", DEFAULT_ALGORITHM) if "algorithm" in names else None
    merged = {**profile_defaults(experiment, profile, algorithm or DEFAULT_ALGORITHM), **given}
    if "train_mode" in names and merged["train_mode"] == "head" and merged["head_features"] == "cached":
        # Cached features are un-augmented: the config states what the run does instead of ignoring `augment`.
        if given.get("augment", "none") != "none":
            raise ValueError(
                f"augment={given['augment']!r} is invalid with train_mode='head' and head_features='cached' "
                "(cached features are un-augmented): use augment='none', or head_features='backbone' to "
                "augment through the backbone at every step"
            )
        merged["augment"] = "none"
    if algorithm is not None:
        keep_own_parameters(merged, given, algorithm)
    if "merge" in names:
        keep_merge_density(merged, given)
    config = {name: check_value(name, merged[name]) for name in names if name in merged}
    if "sparsity" in names:
        _derive_editing(config, given, {**COMMON_DEFAULTS, **PROFILE_DEFAULTS[profile]})
    _check_combinations(config)
    return {k: v for k, v in config.items() if not _omitted(k, v)}


def keep_own_parameters(merged: dict, given: dict, algorithm: str) -> None:
    """In a config being made: keep `algorithm`'s own parameters, drop the others', refuse those `given`."""
    owners = algorithm_params()
    for name in dict.fromkeys(p for own in owners.values() for p in own):
        if name in owners[algorithm]:
            continue
        if name in given:
            users = [a for a, own in owners.items() if name in own]
            raise ValueError(
                f"{name}={given[name]!r} is invalid with algorithm={algorithm!r}: {name} is a parameter of "
                f"algorithm {' or '.join(repr(u) for u in users)} (algorithm: one of {', '.join(ALGORITHMS)})"
            )
        merged.pop(name, None)


def keep_merge_density(merged: dict, given: dict) -> None:
    """In a config being made: merge_density belongs to merge=ties only (mean configs leave it out: their run ids
    stay); given with another rule, it is refused."""
    if merged["merge"] == "ties":
        return
    if "merge_density" in given:
        raise ValueError(
            f"merge_density={given['merge_density']!r} is invalid with merge={merged['merge']!r}: merge_density is "
            "a parameter of merge='ties' (set merge=ties, or leave merge_density out)"
        )
    merged.pop("merge_density", None)


def _omitted(name: str, value: object) -> bool:
    spec = parameters()[name]
    return spec.omitted_at is not None and type(value) is type(spec.omitted_at) and value == spec.omitted_at


def setting(config: dict, name: str) -> object:
    """config[name], or the parameter's `omitted_at` value where the config leaves it out (see Param)."""
    spec = PARAMS.get(name) or parameters()[name]
    return config[name] if name in config or spec.omitted_at is None else spec.omitted_at


def _derive_editing(config: dict, given: dict, defaults: dict) -> None:
    """Editing values that follow from others (in place, on validated values)."""
    if config["sparsity"] == 0:
        # The dense control: an all-ones mask, nothing to calibrate. One run id whatever the mask settings say.
        config.update({k: defaults[k] for k in MASK_ONLY if k in config}, calibration_rounds=1)
    if "num_clients" in config and (config["sparsity"] == 0 or "calibration_samples" not in given):
        # The profile's count is a total: a federated run's clients score that many together (TaLoS: 5,000).
        config["calibration_samples"] = math.ceil(defaults["calibration_samples"] / config["num_clients"])


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
    if "num_clients" in config:
        algorithm = setting(config, "algorithm")
        if setting(config, "node_failure") == "drop" and algorithm_class(algorithm).node_state:
            raise ValueError(  # its node may have stored c_i+ already: c would no longer be the mean of the c_i
                f"node_failure='drop' is invalid with algorithm={algorithm!r} (its clients keep state between rounds "
                "that a dropped reply would leave inconsistent): must be 'stop'"
            )
        if config["sharding"] == "noniid" and config["classes_per_client"] > NUM_CLASSES:
            raise ValueError(f"classes_per_client={config['classes_per_client']} is invalid: must be in [1, 100]")
        if config["sharding"] == "noniid" and config["num_clients"] * config["classes_per_client"] < NUM_CLASSES:
            raise ValueError(
                f"classes_per_client={config['classes_per_client']} with num_clients={config['num_clients']} "
                "is invalid: num_clients * classes_per_client must be >= 100 (every class needs a client)"
            )
        _check_federated(config)


def train_class_counts(config: dict) -> list[int]:
    """Per-class sizes of the train split from the config alone (mirrors data.datasets.stratified_split)."""
    if config["dataset"] == "cifar100":
        counts = [500] * NUM_CLASSES
    else:  # data.datasets.make_synthetic labels sample i with class i % 100
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


def hashed_items(config: dict) -> dict:
    """The part of a config that identifies a run (bookkeeping parameters left out)."""
    params = parameters()
    return {k: v for k, v in sorted(config.items()) if params[k].hashed}
