"""Batch execution of the notebooks with papermill (the README's smoke command and grid runs)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def notebook_paths(selection: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, optionally only those whose name starts with one of `selection`."""
    paths = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if selection:
        paths = [p for p in paths if any(p.name.startswith(s) for s in selection)]
        if not paths:
            raise ValueError(f"notebooks={selection} matches no notebook in {REPO / 'notebooks'}")
    return paths


def run_pipeline(
    profile: str = "smoke",
    notebooks: list[str] | None = None,
    output_dir: str | Path = "notebooks/executed",
    parameters: dict | None = None,
) -> list[Path]:
    """Execute each notebook in order with PROFILE=profile (plus `parameters`); returns the executed copies."""
    import papermill

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if profile == "smoke":  # tiny models: one thread per kernel; more fight over the cores and run 10x slower
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    done = []
    for path in notebook_paths(notebooks):
        target = out / path.name
        print(f"[pipeline] {path.name} (profile={profile})", flush=True)
        papermill.execute_notebook(
            str(path),
            str(target),
            parameters={"PROFILE": profile, **(parameters or {})},
            cwd=str(path.parent),
            progress_bar=False,
        )
        done.append(target)
    return done
