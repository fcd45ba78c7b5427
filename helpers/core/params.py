"""The parameter vocabulary: `Param` (type, allowed values, one-line meaning; an algorithm's own parameters also carry
their default and the paper it comes from) and every parameter that no federated algorithm owns. Torch-free: the
report and the results reader use it; helpers.config assembles it with the algorithms' parameters."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from helpers.core.settings import PROFILES

DEFAULT_ALGORITHM = "fedavg"  # configs of FedAvg leave `algorithm` out: their run ids predate the choice
DEFAULT_MASK_RULE = "least_sensitive"  # TaLoS: fine-tune the entries the task is least sensitive to


@dataclass(frozen=True)
class Param:
    """One parameter: its type, what values are allowed, what it means, and whether it is part of the run's identity."""

    kind: type
    meaning: str = ""
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hashed: bool = True  # False: changes nothing in the results (device, paths, checkpoint cadence)
    # Added after results existed: at this value (the old behaviour) a config leaves the parameter out, so earlier
    # run ids, config.json files and results CSVs stay exactly as they were. Read such values with `setting`.
    omitted_at: object = None
    default: object = None  # an algorithm's own parameter: its default (the others' are profile defaults)
    source: str = ""  # where that default comes from (paper, table or section)

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{name} in {lo}{self.low:g}, {self.high:g}{hi}"
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {self.low:g}"
        return name

    def check(self, name: str, value: object) -> object:
        """`value` if it is allowed (ints accepted where floats are expected, exact numpy scalars too), else a
        ValueError naming the parameter and what is allowed."""
        if self.kind in (int, float) and isinstance(value, numbers.Number) and not isinstance(value, bool):
            if self.kind is float and isinstance(value, numbers.Real):
                value = float(value)
            elif isinstance(value, numbers.Integral):
                value = int(value)
        ok = isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool))
        if ok and self.choices:
            ok = value in self.choices
        if ok and self.kind in (int, float):
            ok = math.isfinite(value)
            if self.low is not None:
                ok = ok and (value > self.low if self.low_open else value >= self.low)
            if self.high is not None:
                ok = ok and (value < self.high if self.high_open else value <= self.high)
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid: must be {self.allowed()}")
        return value


def choice(
    *values: str,
    meaning: str = "",
    hashed: bool = True,
    omitted_at: str | None = None,
    default: str | None = None,
    source: str = "",
) -> Param:
    """A string parameter with a fixed set of values."""
    return Param(str, meaning, choices=values, hashed=hashed, omitted_at=omitted_at, default=default, source=source)


PROBABILITY = dict(low=0, high=1, high_open=True)

# Every parameter no algorithm owns (helpers.algorithms declares the others). `algorithm` and `mask_rule` take their
# values from the registries of helpers.algorithms and helpers.sparse: helpers.config fills their choices in.
PARAMS: dict[str, Param] = {
    # identity of the data and model
    "profile": choice(*PROFILES, meaning="full: CIFAR-100, DINO ViT-S/16 at 224 px; smoke: synthetic data, tiny ViT"),
    "dataset": choice("cifar100", "synthetic", meaning="the images: CIFAR-100, or synthetic CIFAR-shaped data"),
    "model": choice("vit_small_patch16_224.dino", "vit_tiny_smoke", meaning="the network (a new 100-class head)"),
    "pretrained": Param(bool, "start from the DINO weights (false: random init)"),
    "img_size": Param(int, "image side the model sees, in pixels (CIFAR's 32 px resized)", low=16, high=1024),
    "synthetic_train_size": Param(int, "training images of the synthetic dataset", low=200),
    "synthetic_test_size": Param(int, "test images of the synthetic dataset", low=100),
    "val_fraction": Param(
        float,
        "share of the training set held out for validation (stratified)",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    ),  # fmt: skip
    "data_seed": Param(int, "seed of the train/val split", low=0),
    "seed": Param(int, "seed of everything else: init, shards, client sampling, batches, augmentation", low=0),
    "augment": choice(
        "crop", "rrc", "none", meaning="training augmentation: random crop + flip, random-resized crop + flip, or none"
    ),  # fmt: skip
    # optimisation
    "train_mode": choice("full", "head", meaning="train every weight, or the head alone (linear probe)"),
    "head_features": choice(
        "cached",
        "backbone",
        meaning="head-only runs: train on cached backbone features, or through the backbone at every step (augmented)",
    ),  # fmt: skip
    "batch_size": Param(int, "images per optimizer step", low=1),
    "lr": Param(float, "learning rate (a federated client's, at the start of its schedule)", low=0, low_open=True),
    "momentum": Param(float, "SGD momentum (clients and centralized runs)", **PROBABILITY),
    # auto = fp16 + GradScaler below sm_80 (T4), bf16 from sm_80, fp32 on CPU (helpers.core.precision)
    "amp": choice(
        "auto",
        "fp16",
        "bf16",
        "fp32",
        meaning="mixed precision (auto: fp16 on a T4, bf16 on newer GPUs, fp32 on the CPU)",
        omitted_at="auto",
    ),  # fmt: skip
    "weight_decay": Param(float, "SGD weight decay (frozen entries never decay)", low=0),
    "epochs": Param(int, "passes over the training split (centralized)", low=1),
    "scheduler": choice("cosine", "step", "constant", "warmup_cosine", meaning="learning-rate schedule over epochs"),
    "warmup_epochs": Param(int, "epochs of linear warmup (scheduler warmup_cosine)", low=0),
    "step_size": Param(int, "epochs between lr drops (scheduler step)", low=1),
    "gamma": Param(float, "factor of each lr drop (scheduler step)", low=0, high=1, low_open=True),
    # federated
    "num_clients": Param(int, "K: clients the training split is sharded over", low=1),
    "participation": Param(float, "C: share of the clients sampled each round", low=0, high=1, low_open=True),
    "local_steps": Param(int, "J: optimizer steps of each client per round (not epochs)", low=1),
    "rounds": Param(int, "federated rounds", low=1),
    "sharding": choice("iid", "noniid", "dirichlet", meaning="how the clients' shards are drawn"),
    "classes_per_client": Param(int, "Nc: classes each client holds (sharding noniid)", low=1),
    "dirichlet_alpha": Param(
        float, "concentration of the class shares (sharding dirichlet; small = skewed)", low=0, low_open=True
    ),  # fmt: skip
    "client_lr_schedule": choice("constant", "cosine", meaning="the clients' lr over the rounds"),
    # who runs the clients: helpers.federated one after another in this process, or Flower apps (helpers.flower)
    "engine": choice("sequential", "flower", meaning="who trains the clients: this process, or a Flower federation"),
    "evaluation": choice(
        "server",
        "clients",
        meaning="where val/test are evaluated: on the server, or each client on its part of the split (sums)",
        omitted_at="server",
    ),  # fmt: skip
    "node_failure": choice(
        "stop",
        "drop",
        meaning="a Flower node that fails mid-round: stop the run, or drop its client from the round",
        omitted_at="stop",
    ),  # fmt: skip
    "node_timeout_s": Param(
        float, "seconds the server waits for a round's replies (0: no limit)", low=0, hashed=False, omitted_at=0.0
    ),  # fmt: skip
    "update_bound": Param(
        float,
        "a Flower client whose update norm is over this many times the median of the round's others fails (0: off)",
        low=0,
        hashed=False,
        omitted_at=10.0,
    ),  # fmt: skip
    "algorithm": choice(
        meaning="the federated algorithm (a remedy against client drift); its own parameters join the config",
        omitted_at=DEFAULT_ALGORITHM,
    ),  # fmt: skip
    "merge": choice(
        meaning="how the server combines the round's client updates: their size-weighted mean, TIES-merging "
        "(trim, elect signs, disjoint mean; Yadav et al. 2023) or the coordinate-wise median (robust to a minority "
        "of hostile clients; Yin et al. 2018), then the algorithm's server step",
        omitted_at="mean",
    ),  # fmt: skip
    "merge_density": Param(
        float,
        "merge=ties: share of each client's moved entries it keeps (largest magnitude over its whole update)",
        low=0,
        high=1,
        low_open=True,
    ),  # fmt: skip
    "interference_probe": Param(
        int,
        "images of each sampled client's own data on which its model and the new global one are compared each "
        "round (0: off; a diagnostic, not in the run id)",
        low=0,
        hashed=False,
        omitted_at=0,
    ),  # fmt: skip
    "stragglers": Param(
        float,
        "share of sampled clients that stop after a uniform 1..J steps (systems heterogeneity)",
        **PROBABILITY,
        omitted_at=0.0,
    ),  # fmt: skip
    "warmup_rounds": Param(
        int, "rounds over which the clients' lr rises linearly (TaLoS warms up)", low=0, omitted_at=0
    ),  # fmt: skip
    # model editing (sparse fine-tuning, §9): sparsity = fraction of backbone entries FROZEN
    "sparsity": Param(float, "share of backbone entries FROZEN by the mask (0: the dense control)", **PROBABILITY),
    "calibration_rounds": Param(int, "R: rounds of mask calibration (the mask reaches its density gradually)", low=1),
    "mask_rule": choice(meaning="which entries the mask keeps trainable"),
    "score_method": choice(
        "talos",
        "empirical",
        "batch",
        meaning="sensitivity: sampled-label logit Fisher (TaLoS), true-label loss, or the squared batch gradient",
    ),  # fmt: skip
    "calibration_samples": Param(
        int, "images scored per calibration round (federated: a total over the clients unless set)", low=1
    ),  # fmt: skip
    "embeddings": choice(
        "masked", "dense", meaning="cls_token and pos_embed: under the mask, or trained densely (the TaLoS reference)"
    ),  # fmt: skip
    "step0": choice(
        "sgd",
        "ridge",
        meaning="step 0, the head on the frozen backbone: SGD (federated: FedAvg on the "
        "head), or ridge regression in closed form",
    ),  # fmt: skip
    "step0_epochs": Param(int, "step 0's epochs (federated: its rounds follow from them)", low=1),
    "step0_lr": Param(float, "step 0's learning rate", low=0, low_open=True),
    "ridge_lambda": Param(float, "step 0's ridge penalty (step0 ridge)", low=0, low_open=True),
    "mask_scope": choice("global", "local", meaning="one mask from the clients' summed scores, or each client its own"),
    "score_transform": choice(
        "eval",
        "train",
        meaning="images scored under the evaluation preprocessing, or augmented as in training (TaLoS)",
        omitted_at="eval",
    ),  # fmt: skip
    # evaluation and bookkeeping (not part of the run identity)
    "eval_every": Param(int, "validate every this many epochs or rounds (the last one always)", low=1),
    "eval_test": Param(bool, "also evaluate the test split at every validation (curves), not just at the end"),
    "eval_batch_size": Param(int, "images per evaluation batch", low=1, hashed=False),
    "checkpoint_every": Param(int, "checkpoint every this many epochs or rounds", low=1, hashed=False),
    "checkpoint_minutes": Param(
        float, "and at least this often, in minutes of wall time", low=0, low_open=True, hashed=False
    ),  # fmt: skip
    "device": choice("auto", "cpu", "cuda", meaning="where to train (auto: a GPU if there is one)", hashed=False),
    "compile": Param(bool, "torch.compile the trained module (same math, faster on a GPU)", hashed=False),
    "deterministic": Param(
        bool,
        "deterministic kernels (torch, cuDNN, cuBLAS), so a CUDA kill-resume can be compared exactly",
        hashed=False,
        omitted_at=False,
    ),  # fmt: skip
    "data_root": Param(str, "where CIFAR-100 is downloaded to", hashed=False),
}
# What only the mask depends on: sparsity 0 (the dense control) has no mask, so these take their defaults.
MASK_ONLY = ("calibration_rounds", "mask_rule", "score_method", "calibration_samples", "embeddings", "mask_scope",
             "score_transform")  # fmt: skip
STEP_COLUMNS = ("epoch", "round")  # a metrics row's step: epochs of centralized runs, rounds of federated ones
INTEGER_COLUMNS = (*(n for n, p in PARAMS.items() if p.kind is int), *STEP_COLUMNS)


def omitted_defaults() -> dict:
    """The parameters a config leaves out at their old behaviour (Param.omitted_at), with that value."""
    return {name: spec.omitted_at for name, spec in PARAMS.items() if spec.omitted_at is not None}
