"""Notebook support: check papermill parameters against the `parameters` cell, and keep non-study results apart."""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from helpers.config.experiments import check_value, parameters
from helpers.config.parsing import as_list
from helpers.core.settings import REPO, default_run_root
from helpers.training.leases import lease_state
from helpers.training.runs import Run, run_id, run_state

NOTEBOOKS = REPO / "notebooks"
# Parameters that choose where things go or which profile runs, not what the study computes.
PLACEMENT = ("PROFILE", "RUN_ROOT", "RESULTS_ROOT", "FIGURES_ROOT", "TABLES_ROOT", "REPLACE_STUDY")
# Notebook parameter -> the config key its values are checked against, where the name alone does not say it.
CONFIG_KEYS = {
    "GRID_EPOCHS": "epochs", "PROBE_LR": "lr", "GRID_LR": "lr", "GRID_MOMENTUM": "momentum",
    "GRID_WEIGHT_DECAY": "weight_decay", "SCHEDULERS": "scheduler", "SEEDS": "seed", "NC_LIST": "classes_per_client",
    "J_LIST": "local_steps", "SPARSITIES": "sparsity", "RULES": "mask_rule", "SAMPLE_COUNTS": "calibration_samples",
    "REMEDIES": "algorithm", "REMEDY_NC": "classes_per_client", "REMEDY_J": "local_steps", "FED_SEEDS": "seed",
    "REMEDY_CALIBRATION_ROUNDS": "calibration_rounds", "HARDEST_NC": "classes_per_client",
}  # fmt: skip


def code_cells(notebook: str) -> list[dict]:
    """The code cells of notebooks/<notebook>.ipynb (as stored, without papermill's injected cell)."""
    path = NOTEBOOKS / f"{notebook}.ipynb"
    if not path.exists():
        names = ", ".join(p.stem for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
        raise ValueError(f"notebook={notebook!r} is unknown; allowed: {names}")
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def _tree(cell: dict) -> ast.Module:
    source = "".join(cell["source"])
    # IPython magics and shell lines are not Python: blank them (keeps line numbers).
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def declared_parameters(notebook: str) -> dict[str, object]:
    """Name -> default value of each assignment in the notebook's cell tagged `parameters`."""
    cell = next(c for c in code_cells(notebook) if "parameters" in c["metadata"].get("tags", []))
    declared = {}
    for node in _tree(cell).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    declared[target.id] = ast.literal_eval(node.value)
    return declared


def assigned_names(notebook: str) -> set[str]:
    """Every name a code cell of the notebook binds (so a re-run in Colab finds its own globals known)."""
    names = set()
    for cell in code_cells(notebook):
        for node in ast.walk(_tree(cell)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


def undeclared(name: str, notebook: str, declared: list[str]) -> str:
    """The error for a parameter `notebook` does not declare, naming the closest declared one."""
    close = difflib.get_close_matches(name.upper(), declared, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"parameter {name} is not declared by notebook {notebook}: {hint}its parameters are {', '.join(declared)}"


@dataclass
class NotebookParameters:
    """What check_parameters found: the notebook, its declared defaults and the parameters that differ."""

    notebook: str
    defaults: dict
    changed: dict = field(default_factory=dict)
    replace_study: bool = False
    values: dict = field(default_factory=dict)  # every declared parameter's value in this execution

    def results_name(self, name: str, runs: list[Run]) -> str:
        """`name` for the study's runs; custom/<name>-<hash of run ids> for runs with non-default parameters."""
        if not self.changed:
            return name
        what = ", ".join(f"{k}={v!r}" for k, v in self.changed.items())
        if self.replace_study:
            print(f"REPLACE_STUDY=True: the study's results {name}.csv are replaced by runs with {what}")
            return name
        digest = hashlib.sha256(",".join(sorted(r.id for r in runs)).encode()).hexdigest()[:8]
        print(
            f"non-default parameters ({what}): these runs' rows go to custom/{name}-{digest}.csv; the study's "
            f"{name}.csv (what 07 reports) is unchanged. Set REPLACE_STUDY=True to replace it."
        )
        return f"custom/{name}-{digest}"


class ParameterError(ValueError):
    """A bad notebook parameter: in a notebook (IPython, papermill) its error output is this one line, no traceback
    (IPython shows what `_render_traceback_` returns)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def check_parameters(namespace: dict, notebook: str) -> NotebookParameters:
    """Stop on a parameter the notebook does not declare (naming the closest declared one) or an invalid value;
    called right after the `parameters` cell (and papermill's injected one), before any compute."""
    try:
        return _checked_parameters(namespace, notebook)
    except ValueError as exc:  # the message names the parameter: the cell's whole output is that line
        raise ParameterError(str(exc)) from None


def _checked_parameters(namespace: dict, notebook: str) -> NotebookParameters:
    defaults = declared_parameters(notebook)
    known = assigned_names(notebook)
    for name in namespace:
        # papermill -p NAME defines NAME whatever the notebook declares; lower case catches `-p rounds 3` too
        if (name.isupper() or name.upper() in defaults) and name not in known:
            raise ValueError(undeclared(name, notebook, list(defaults)))
    changed = {}
    for name, default in defaults.items():
        value = namespace.get(name, default)
        check_notebook_value(name, value, default)
        if name not in PLACEMENT and _normal(value, default) != _normal(default, default):
            changed[name] = value
    values = {name: namespace.get(name, default) for name, default in defaults.items()}
    return NotebookParameters(notebook, defaults, changed, bool(namespace.get("REPLACE_STUDY", False)), values)


def check_notebook_value(name: str, value: object, default: object) -> None:
    """Validate a notebook parameter's value (each element of a list) against its config key; the error names
    the parameter as the notebook does, the config key in addition."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is invalid: must be True or False")
        return
    key = CONFIG_KEYS.get(name, name.lower())
    params = parameters()
    if key not in params:  # e.g. RUN_ROOT, STEP_BUDGET: checked where they are used
        return
    try:
        if isinstance(default, list) or (isinstance(value, str) and params[key].kind is not str):
            values = as_list(value)  # papermill -p passes lists (and some numbers) as text
        else:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is not None:
                check_value(key, item)
    except ValueError as exc:
        must = str(exc).split(" is invalid: ", 1)[-1]
        raise ValueError(f"{name}={value!r} is invalid: {must} (config key {key})") from None


def _normal(value: object, default: object) -> object:
    """Lists passed as text (papermill -p NAME "[1, 5]") compare equal to the list they spell."""
    if isinstance(default, list) and isinstance(value, str):
        try:
            return as_list(value)
        except ValueError:
            return value
    return value


def plan_progress(plan: list[tuple[str, dict]], run_root: str | Path | None = None, what: str = "runs") -> str:
    """E.g. "2 of 5 runs of this notebook already done (skipped), 1 resumes from a checkpoint, 2 start fresh"
    (and how many of those another session trains now: this one skips them)."""
    root = Path(run_root) if run_root is not None else default_run_root()
    states = [run_state(experiment, config, root) for experiment, config in plan]
    done, started = states.count("done"), states.count("started")
    held = sum(
        lease_state(root / experiment / run_id(config))[0] == "running"
        for (experiment, config), state in zip(plan, states)
        if state != "done"
    )
    text = (
        f"{done} of {len(states)} {what} of this notebook already done (skipped), "
        f"{started} resume{'s' if started == 1 else ''} from a checkpoint, {states.count('new')} start fresh"
    )
    return text + (f"; {held} of them trained by another session now (skipped here)" if held else "")


def require_done(runs: list[Run], what: str) -> None:
    """Stop the notebook before a choice that needs every run of `what` (e.g. the best lr of a grid) while another
    session still trains some of them."""
    missing = [r.id for r in runs if not r.done]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(runs)} {what} runs are not finished (another session trains them: "
            f"{', '.join(missing)}; see `python -m helpers status`). The choice made from them needs all: "
            "run this notebook again when they are done."
        )
