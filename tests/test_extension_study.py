"""The extension's building blocks: its configs from the remedies comparison's cell (FedAvg's mean and TIES over its
density grid, dense and sparse, same budget, interference on) and its results view (TIES at the density chosen on
validation, interference averaged over the rounds)."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers.algorithms.merging import MERGE_TUNING
from helpers.config.experiments import make_config
from helpers.federated.interference import PROBE_IMAGES
from helpers.ops.plans import extension_configs, remedy_plan
from helpers.reporting.extension import chosen_densities, extension_rows
from helpers.training.runs import run_id


def test_extension_configs_hold_the_remedies_cell_and_vary_only_the_merge_and_the_mask():
    base = make_config("sparse_fedavg", "full", calibration_rounds=2)
    cells = remedy_plan(base, ["fedavg", "fedadam"], [1], 8)
    cell = next(c for c in cells if c.get("algorithm") == "fedadam" and c["sparsity"] > 0)  # a remedy's cell
    groups = extension_configs(cell)
    configs = [c for group in groups.values() for c in group]
    assert len(groups["mean"]) == 2 and len(groups["ties"]) == 2 * len(MERGE_TUNING[1])
    assert len({run_id(c) for c in configs}) == len(configs)
    assert sorted(c["merge_density"] for c in groups["ties"]) == sorted(2 * list(MERGE_TUNING[1]))
    for c in configs:
        assert "algorithm" not in c and c["server_lr"] == 1.0  # FedAvg's server step: TIES's lambda = 1
        assert c["interference_probe"] == PROBE_IMAGES
        assert (c["classes_per_client"], c["local_steps"], c["rounds"]) == (1, 8, cell["rounds"])  # same budget
        assert c["sparsity"] in (0.0, cell["sparsity"]) and c["mask_rule"] == cell["mask_rule"]
    fedavg = next(c for c in cells if "algorithm" not in c and c["sparsity"] > 0)
    assert run_id(groups["mean"][1]) == run_id(fedavg)  # the remedies' FedAvg run: interference is not in the id


def rows(run: str, sparsity: float, merge: str | None, density: float | None, val: float) -> list[dict]:
    base = {"run_id": run, "experiment": "sparse_fedavg", "sparsity": sparsity, "merge": merge,
            "merge_density": density}  # fmt: skip
    return [{**base, "round": 1, "val_acc": val - 0.1, "val_loss": 3.0, "interference": 0.4},
            {**base, "round": 2, "val_acc": val, "val_loss": 2.0 - val, "interference": 0.2}]  # fmt: skip


def test_ties_enters_at_the_density_best_on_validation_per_dense_and_sparse():
    table = pd.DataFrame([
        *rows("m0", 0.0, None, None, 0.5), *rows("m9", 0.9, None, None, 0.5),
        *rows("a0", 0.0, "ties", 0.1, 0.7), *rows("b0", 0.0, "ties", 0.2, 0.6),
        *rows("a9", 0.9, "ties", 0.1, 0.6), *rows("b9", 0.9, "ties", 0.2, 0.8),
    ])  # fmt: skip
    final = table[table["round"] == 2]
    assert chosen_densities(final) == {0.0: 0.1, 0.9: 0.2}
    tied = final.assign(val_acc=0.5, val_loss=final["run_id"].map({"a0": 1.0, "b0": 0.9}).fillna(1.0))
    assert chosen_densities(tied) == {0.0: 0.2, 0.9: 0.1}  # equal accuracy: the lower loss, then the lower density
    part = extension_rows(table)
    assert set(part["run_id"]) == {"m0", "m9", "a0", "b9"}
    assert set(part["variant"]) == {"dense, FedAvg mean", "sparse, FedAvg mean", "dense, TIES d=0.1",
                                    "sparse, TIES d=0.2"}  # fmt: skip
    assert part["mean_interference"].tolist() == pytest.approx([0.3] * len(part))
