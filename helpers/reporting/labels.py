"""What a run is called in tables and figures: its method (dense, head only, sparse s=.. R=.., the controls), its
sharding (IID or Nc), its algorithm. Torch-free: notebooks and the report label the same way from the same rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from helpers.algorithms.registry import ALGORITHMS
from helpers.core.params import DEFAULT_ALGORITHM, DEFAULT_MASK_RULE

DENSE_LABEL = "dense, new head"  # dense fine-tuning / FedAvg of 01-03: the head trained from scratch with the rest
DENSE_STEP0_LABEL = "dense, step-0 head"  # control (a): the whole backbone trained, head fixed after step 0
STEP0_LABEL = "step-0 model"  # control (b): the step-0 head on the untouched backbone


def sharding_label(sharding: str, classes_per_client: object) -> str:
    """'IID', or the number of classes per client ('5') of a non-IID sharding (the 'Nc' column of 03)."""
    return "IID" if sharding == "iid" else str(int(classes_per_client))


def method_label(config: Mapping) -> str:
    """Short name of what a run trains: 'dense, new head', 'head only', 'sparse s=0.9 R=4' (+ rule), or a
    control: 'dense, step-0 head' (sparsity 0) and 'step-0 model' (no backbone training, see step0_rows)."""
    if config.get("experiment") == "step0":
        return STEP0_LABEL
    if "sparsity" not in config or pd.isna(config.get("sparsity")):
        return "head only" if config.get("train_mode") == "head" else DENSE_LABEL
    if config["sparsity"] == 0:
        return DENSE_STEP0_LABEL
    rule = "" if config.get("mask_rule", DEFAULT_MASK_RULE) == DEFAULT_MASK_RULE else f" {config['mask_rule']}"
    rounds = f" R={int(config['calibration_rounds'])}" if pd.notna(config.get("calibration_rounds")) else ""
    return f"sparse{rule} s={config['sparsity']:g}{rounds}"


def method_labels(table: pd.DataFrame) -> pd.Series:
    """method_label of every row of a tidy table (computed once per distinct configuration)."""
    keys = [c for c in ("experiment", "sparsity", "train_mode", "mask_rule", "calibration_rounds") if c in table]
    configs = table[keys].astype(object).where(table[keys].notna(), None)
    rows = list(configs.itertuples(index=False, name=None))
    labels = {row: method_label({k: v for k, v in zip(keys, row) if v is not None}) for row in set(rows)}
    return pd.Series([labels[row] for row in rows], index=table.index, dtype=object)


def sparse_rows(table: pd.DataFrame) -> pd.Series:
    """True for the rows of sparse runs proper (sparsity > 0): not the dense control, step-0 or dense rows."""
    if "sparsity" not in table:
        return pd.Series(False, index=table.index)
    return table["sparsity"].fillna(0) > 0


def rules_with_controls(table: pd.DataFrame) -> pd.DataFrame:
    """A labelled table (with `method`) whose `mask_rule` names the controls and dense runs by their method,
    so that one column lists the rules and what they are compared with."""
    rule = sparse_rows(table)
    mask_rule = table["mask_rule"] if "mask_rule" in table else pd.Series(None, index=table.index, dtype=object)
    return table.assign(mask_rule=mask_rule.where(rule, table["method"]))


def with_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Add 'method' (see method_label) and, for federated rows, 'Nc' (see sharding_label) columns."""
    table = table.copy()
    table.insert(0, "method", method_labels(table))
    if "sharding" in table:
        table.insert(1, "Nc", [sharding_label(s, n) for s, n in zip(table["sharding"], table["classes_per_client"])])
    return table


def with_algorithm(table: pd.DataFrame) -> pd.DataFrame:
    """`algorithm` on every row (FedAvg runs leave it out of their configs)."""
    algorithm = table["algorithm"].fillna(DEFAULT_ALGORITHM) if "algorithm" in table else DEFAULT_ALGORITHM
    return table.assign(algorithm=algorithm)


def algorithm_order(names: Iterable[str]) -> list[str]:
    """The algorithms among `names` in the registry's order (FedAvg first)."""
    present = set(names)
    return [a for a in ALGORITHMS if a in present]


def algorithm_title(name: str) -> str:
    """How tables and figures name an algorithm (FedAdam, SCAFFOLD; an unknown name as it is)."""
    return ALGORITHMS[name].title if name in ALGORITHMS else name


def merge_label(merge: object, density: object = None) -> str:
    """How tables and figures name a merge rule: 'FedAvg mean' (also for runs from before `merge`), 'TIES d=0.2'."""
    if merge is None or pd.isna(merge) or merge == "mean":
        return "FedAvg mean"
    if merge != "ties":
        return {"median": "coordinate median"}.get(str(merge), str(merge))
    return "TIES" + (f" d={density:g}" if density is not None and pd.notna(density) else "")


def tuned_labels(part: pd.DataFrame) -> pd.Series:
    """'proximal weight mu = 0.1' for each row of a remedies table: the hyperparameter its method tuned and the value
    chosen (rows written before the tuning: '--')."""
    if "tuned_param" not in part:
        return pd.Series("--", index=part.index, dtype=object)
    values = part["tuned_value"] if "tuned_value" in part else pd.Series(float("nan"), index=part.index)
    labels = [
        f"{param_label(p)} = {v:g}" if isinstance(p, str) and pd.notna(v) else "--"
        for p, v in zip(part["tuned_param"], values)
    ]
    return pd.Series(labels, index=part.index, dtype=object)


# Readable names of parameter values and parameters in tables and the report (never a raw identifier).
VALUE_LABELS = {
    "warmup_cosine": "warm-up + cosine",
    "least_sensitive": "least sensitive",
    "most_sensitive": "most sensitive",
    "lowest_magnitude": "lowest magnitude",
    "highest_magnitude": "highest magnitude",
    "val": "validation",
}
PARAM_LABELS = {
    "server_lr": "server lr",
    "server_momentum": "server momentum",
    "server_beta1": "beta1",
    "server_beta2": "beta2",
    "server_tau": "tau",
    "prox_mu": "proximal weight mu",
    "merge_density": "density",
}


def value_label(value: object) -> str:
    """How the report names a parameter's value: a schedule, mask rule or algorithm by its readable name."""
    text = str(value)
    return VALUE_LABELS.get(text) or (algorithm_title(text) if text in ALGORITHMS else text)


def param_label(name: str) -> str:
    """How the report names a parameter (server_lr: 'server lr'); an unknown name with its underscores as spaces."""
    return PARAM_LABELS.get(name, name.replace("_", " "))
