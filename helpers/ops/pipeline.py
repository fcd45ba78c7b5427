"""Batch execution of the notebooks with papermill (the README's smoke command and grid runs)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from helpers.core.settings import REPO
from helpers.ops.notebook import declared_parameters, undeclared


def notebook_paths(selection: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, optionally only those whose name starts with one of `selection`."""
    paths = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if selection:
        paths = [p for p in paths if any(p.name.startswith(s) for s in selection)]
        if not paths:
            raise ValueError(f"notebooks={selection} matches no notebook in {REPO / 'notebooks'}")
    return paths


def parse_parameters(pairs: list[list[str]]) -> dict:
    """[['ROUNDS', '3'], ['NC_LIST', '[1, 5]']] -> {'ROUNDS': 3, 'NC_LIST': [1, 5]} (Python literals, else text)."""
    out = {}
    for name, text in pairs:
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out


def check_pipeline_parameters(parameters: dict, paths: list[Path]) -> None:
    """Every parameter must be declared by every selected notebook: papermill would pass it to all of them."""
    for path in paths:
        declared = declared_parameters(path.stem)
        for name in parameters:
            if name not in declared:
                raise ValueError(undeclared(name, path.stem, list(declared)) + " (choose notebooks with --notebooks)")


def describe_notebooks() -> str:
    """Each notebook's parameters and defaults, for `python -m helpers pipeline --help`."""
    lines = []
    for path in notebook_paths():
        params = ", ".join(f"{k}={v!r}" for k, v in declared_parameters(path.stem).items())
        lines.append(f"{path.stem}: {params}")
    return "\n".join(lines)


def run_pipeline(
    profile: str = "smoke",
    notebooks: list[str] | None = None,
    output_dir: str | Path = "notebooks/executed",
    parameters: dict | None = None,
) -> list[Path]:
    """Execute each notebook in order with PROFILE=profile (plus `parameters`); returns the executed copies."""
    import papermill

    paths = notebook_paths(notebooks)
    check_pipeline_parameters(parameters or {}, paths)  # before the first kernel starts
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if profile == "smoke":  # tiny models: one thread per kernel; more fight over the cores and run 10x slower
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The kernel warns at start that TCP is unencrypted: talk to it over a local socket file instead (POSIX only).
    ipc = {"config": _ipc_config()} if os.name == "posix" else {}
    done = []
    for path in paths:
        target = out / path.name
        print(f"[pipeline] {path.name} (profile={profile})", flush=True)
        papermill.execute_notebook(
            str(path),
            str(target),
            parameters={"PROFILE": profile, **(parameters or {})},
            cwd=str(path.parent),
            progress_bar=False,
            **ipc,
        )
        done.append(target)
    return done


def _ipc_config():
    from traitlets.config import Config

    return Config({"KernelManager": {"transport": "ipc"}})
