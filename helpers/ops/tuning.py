"""The remedies tuned alike: each algorithm's own hyperparameter chosen from its grid (the algorithm declares both,
`tuning`) on the validation split, never the test split, at the hardest heterogeneity setting of the comparison, with
the same number of tuning runs and the same budget per run for every method; the comparison then runs each method at
its chosen value. A candidate whose training diverges (a non-finite loss) is recorded as diverged and never chosen.
The extension's TIES-merging (`merge=ties`, helpers.algorithms.merging) is tuned the same way as one more method,
TIES: its merge_density over MERGE_TUNING (TUNING_GRIDS["ties"] replaces it)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from helpers.algorithms.merging import MERGE_TUNING
from helpers.algorithms.registry import algorithm_class, algorithm_name
from helpers.config.experiments import check_value
from helpers.editing.sparse_runs import run_sparse_fedavg
from helpers.reporting.results import editing_table, final_rows, write_results
from helpers.training.loop import NonFiniteLossError
from helpers.training.runs import Run, mark_done, metrics_file, open_run

TUNING_SPLITS = ("val",)  # the split a value is chosen on (the test split only ever reports)
METRIC = "val_acc"
TIES = "ties"  # the tuned method of a run with merge=ties (whatever its algorithm: the extension's is FedAvg)


def method_name(config: Mapping) -> str:
    """The method a run tunes: TIES for a run with merge=ties, else its algorithm."""
    return TIES if config.get("merge") == TIES else algorithm_name(config)


def own_tuning(method: str) -> tuple[str, tuple]:
    """(parameter, grid) `method` declares: TIES its merge_density over MERGE_TUNING, an algorithm its `tuning`."""
    return MERGE_TUNING if method == TIES else algorithm_class(method).tuning


def tuning_grid(algorithm: str, overrides: Mapping | None = None) -> tuple[str, list]:
    """(parameter, values) `algorithm` (or TIES) is tuned over: its own grid, or TUNING_GRIDS[algorithm] (each value
    checked)."""
    name, values = own_tuning(algorithm)
    if overrides is not None and algorithm in overrides:
        given = overrides[algorithm]
        values = list(given) if isinstance(given, (list, tuple)) else [given]
        if len(values) < 2:
            raise ValueError(f"TUNING_GRIDS[{algorithm!r}]={given!r} is invalid: must be a list of at least two values "
                             f"of {name} (a grid of one value tunes nothing)")  # fmt: skip
    try:
        return name, [check_value(name, v) for v in values]
    except ValueError as exc:
        raise ValueError(f"TUNING_GRIDS[{algorithm!r}]: {exc}") from None


def check_tuning(split: str, budget: float, grids: Mapping | None, algorithms: list[str]) -> None:
    """The notebook's tuning parameters, before any compute (each error names its parameter); `algorithms`: the
    methods tuned (TIES among them when the extension runs)."""
    if split not in TUNING_SPLITS:
        raise ValueError(f"TUNING_SPLIT={split!r} is invalid: must be one of {', '.join(TUNING_SPLITS)} (values are "
                         "chosen on the validation split; the test split only reports)")  # fmt: skip
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"TUNING_BUDGET={budget!r} is invalid: must be a number in (0, 1] (each tuning run's rounds "
                         "as a share of the comparison's)")  # fmt: skip
    if grids is not None and not isinstance(grids, Mapping):
        raise ValueError(f"TUNING_GRIDS={grids!r} is invalid: must be None or a dict {{algorithm: [values]}}")
    unknown = sorted(set(grids or {}) - set(algorithms))
    if unknown:
        raise ValueError(f"TUNING_GRIDS names {unknown}, which this comparison does not run (tuned: {algorithms})")
    for algorithm in algorithms:
        tuning_grid(algorithm, grids)


def tuning_rounds(rounds: int, budget: float) -> int:
    """A tuning run's rounds: `budget` of the comparison's, at least one."""
    return max(1, math.ceil(budget * rounds))


def train_tuning(configs: list[dict], run_root: str | Path | None = None) -> list[Run]:
    """Train (or load) every tuning run; one whose loss becomes non-finite is marked done as diverged (so a rerun
    does not train it again) and stays in the list."""
    runs = []
    for config in configs:
        try:
            runs.append(run_sparse_fedavg(config, run_root=run_root, progress=False))
        except NonFiniteLossError as exc:
            runs.append(mark_diverged(open_run("sparse_fedavg", config, run_root), str(exc)))
    return runs


def mark_diverged(run: Run, error: str) -> Run:
    """done.json for a run whose training diverged: its rows so far stay readable, `diverged` says it lost."""
    path = metrics_file(run.dir)
    if path is not None and path.exists():
        run.written.update(metrics=path.name, metrics_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    print(f"[diverged] {run.id}: {error}", flush=True)
    mark_done(run, {"diverged": True, "error": error})
    return run


def diverged(run: Run) -> bool:
    return bool(run.done and run.summary().get("diverged"))


def chosen_values(runs: list[Run]) -> dict[str, tuple[str, object]]:
    """{method: (parameter, value)}: per method (algorithm, or TIES) the tuned value of the run with the best final
    validation accuracy (diverged runs never win; ties: the first in the grid's order)."""
    chosen = {}
    for algorithm in dict.fromkeys(method_name(r.config) for r in runs):
        name = own_tuning(algorithm)[0]
        mine = [r for r in runs if method_name(r.config) == algorithm and r.done and not diverged(r)]
        if not mine:
            raise RuntimeError(f"every tuning run of {algorithm} diverged or is unfinished: nothing to choose from")
        table = final_rows(mine, [name])
        best = table[METRIC].to_numpy().argmax() if table[METRIC].notna().any() else 0
        chosen[algorithm] = (name, table.iloc[int(best)][name].item())
    return chosen


def tuning_table(runs: list[Run]) -> pd.DataFrame:
    """One row per tuning run: method (algorithm, or TIES), tuned parameter and value, final validation accuracy,
    diverged, chosen."""
    chosen = chosen_values(runs)
    rows = []
    for run in runs:
        algorithm = method_name(run.config)
        name = own_tuning(algorithm)[0]
        value = run.config[name]
        final = final_rows([run], []) if run.done else pd.DataFrame()
        rows.append({"method": algorithm, "tuned_param": name, "tuned_value": value,
                     METRIC: final[METRIC].iloc[0] if not final.empty else float("nan"),
                     "diverged": diverged(run), "chosen": chosen.get(algorithm) == (name, value)})  # fmt: skip
    return pd.DataFrame(rows)


def with_tuning(table: pd.DataFrame, chosen: Mapping[str, tuple], grids: Mapping | None = None) -> pd.DataFrame:
    """`table` (tidy rows) with each run's tuned parameter, its grid and the value chosen, for the report (rows of the
    step-0 model, which no method tunes, left empty; a merge=ties row: TIES's)."""
    runs = table["experiment"] != "step0"
    algorithms = table.get("algorithm", pd.Series(None, index=table.index)).fillna("fedavg")
    if "merge" in table:
        algorithms = algorithms.where(table["merge"] != TIES, TIES)
    algorithms = algorithms[runs]
    grid = {a: tuning_grid(a, grids) for a in set(algorithms)}
    return table.assign(
        tuned_param=algorithms.map(lambda a: grid[a][0]),
        tuning_grid=algorithms.map(lambda a: " ".join(f"{v:g}" for v in grid[a][1])),
        tuned_value=algorithms.map(lambda a: chosen[a][1] if a in chosen else float("nan")),
    )


def write_tuning_results(runs: list[Run], chosen: Mapping, name: str, grids: Mapping | None = None) -> Path:
    """results/<profile>/<name>.csv: the tuning runs' tidy rows with the tuned parameter, its grid, the chosen value
    and whether each run diverged."""
    table = with_tuning(editing_table(runs), chosen, grids)
    lost = {r.id for r in runs if diverged(r)}
    return write_results(runs, name, table=table.assign(diverged=table["run_id"].isin(lost)))


def write_remedy_results(runs: list[Run], chosen: Mapping, name: str, grids: Mapping | None = None) -> Path:
    """results/<profile>/<name>.csv: the comparison's tidy rows with each method's tuned parameter and value."""
    return write_results(runs, name, table=with_tuning(editing_table(runs), chosen, grids))
