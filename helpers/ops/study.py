"""The study as a team of sessions sees it: per notebook, runs done, running (by whom), stale and left, with the T4
hours left (`python -m helpers status`); and a worker that claims and trains the next unfinished run of the study
in the notebooks' order (`python -m helpers work`), so that several sessions share it without overlap.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from helpers.config.experiments import resolve_profile
from helpers.core.settings import default_run_root
from helpers.ops.cost import estimate_plan
from helpers.ops.notebook import NOTEBOOKS
from helpers.ops.plans import notebook_plan
from helpers.ops.runners import runner
from helpers.training.leases import LeaseLost, lease_state, worker_name
from helpers.training.runs import Run, checkpoint_files, describe, run_id

STATES = ("done", "running", "stale", "interrupted", "new", "waiting")
CLAIMABLE = ("stale", "interrupted", "new")  # what `work` may take: nobody's, or a dead session's


def study_notebooks() -> list[str]:
    """The notebooks that train runs, in the study's order (07 only draws)."""
    return [p.stem for p in sorted(NOTEBOOKS.glob("0[1-6]_*.ipynb"))]


def pick_notebooks(selected: list[str] | None) -> list[str]:
    """Full names of the selected notebooks ("02" or "02_fedavg_iid"), all by default; a clear error otherwise."""
    names = study_notebooks()
    if not selected:
        return names
    picked = []
    for name in selected:
        match = [n for n in names if n == name or n.split("_")[0] == name]
        if not match:
            raise ValueError(f"--notebook {name!r} is unknown; allowed: {', '.join(names)} (or their numbers)")
        picked.append(match[0])
    return [n for n in names if n in picked]


@dataclass
class PlannedRun:
    """One run of a notebook's PLAN; `waiting`: its config depends on earlier results (the notebook runs it)."""

    notebook: str
    experiment: str
    config: dict
    waiting: bool = False

    @property
    def id(self) -> str:
        return run_id(self.config)


def study_plan(
    profile: str, notebooks: list[str] | None = None, run_root: str | Path | None = None, reduced: bool = False
) -> list[PlannedRun]:
    """Every run of the selected notebooks' default plans (`reduced`: the reduced plan), in order; a run whose
    config depends on results not on `run_root` yet (helpers.ops.plans) is flagged waiting. A sparse FedAvg run's
    step-0 head run is not one: the sparse run trains it (the pipeline counts head runs apart)."""
    planned = []
    for name in pick_notebooks(notebooks):
        plan = notebook_plan(name, profile, run_root, reduced=reduced)
        planned += [PlannedRun(name, plan.experiments[g], c, plan.is_waiting(g)) for g in plan.groups for c in plan[g]]
    return planned


def plural(n: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_status(experiment: str, config: dict, run_root: str | Path | None = None) -> dict:
    """A run's state ("done", "running", "stale", "interrupted", "new") and, if leased, its holder and heartbeat."""
    folder = Path(run_root if run_root is not None else default_run_root()) / experiment / run_id(config)
    state, info = lease_state(folder)
    if (folder / "done.json").exists():
        state = "done"
    elif state == "free":
        state = "interrupted" if checkpoint_files(folder) else "new"
    status = {"state": state, "holder": None, "heartbeat_age_s": None}
    if info is not None and state in ("running", "stale"):
        status.update(holder=f"{info.holder} (pid {info.pid} on {info.host})", heartbeat_age_s=round(info.age()))
    return status


def plan_status(plan: list[tuple[str, dict]], run_root: str | Path | None = None) -> pd.DataFrame:
    """One row per distinct run of a notebook's plan: state, holder, seconds since its heartbeat, what it is (a
    notebook's status cell)."""
    rows = {}
    for experiment, config in plan:
        rid, status = run_id(config), run_status(experiment, config, run_root)
        what = describe(experiment, config, rid).split(" ", 2)[-1].strip("()")
        rows[(experiment, rid)] = {"run_id": rid, "experiment": experiment, **status, "what": what}
    columns = ["run_id", "experiment", "state", "holder", "heartbeat_age_s", "what"]
    return pd.DataFrame(list(rows.values()), columns=columns).fillna("")


def study_status(
    profile: str | None, run_root: str | Path | None = None, notebooks: list[str] | None = None, reduced: bool = False
) -> dict:
    """Per notebook and in total (each distinct run once): counts by state, runs held by others, T4 hours left."""
    root, profile = Path(run_root) if run_root is not None else default_run_root(), resolve_profile(profile)
    planned = study_plan(profile, notebooks, root, reduced)
    states = {(p.experiment, p.id): run_status(p.experiment, p.config, root) for p in planned}

    def summary(runs: list[PlannedRun]) -> dict:
        runs = list({(p.experiment, p.id): p for p in runs}.values())  # a run planned twice is one run
        counts = dict.fromkeys(STATES, 0)
        held = []
        for p in runs:
            status = states[(p.experiment, p.id)]
            state = "waiting" if p.waiting and status["state"] == "new" else status["state"]
            counts[state] += 1
            if state in ("running", "stale"):
                held.append({"run": describe(p.experiment, p.config, p.id), **status})
        left = estimate_plan([(p.experiment, p.config) for p in runs], root).left_s if runs else 0.0
        finished = bool(runs) and counts["done"] == len(runs)  # nothing waiting, running or left
        return {"runs": len(runs), **counts, "finished": finished, "t4_hours_left": round(left / 3600, 2),
                "held": held}  # fmt: skip

    names = pick_notebooks(notebooks)
    by_notebook = [{"notebook": n, **summary([p for p in planned if p.notebook == n])} for n in names]
    return {"profile": profile, "run_root": str(root), "reduced": reduced, "notebooks": by_notebook,
            "total": summary(planned)}  # fmt: skip


def format_status(status: dict) -> str:
    """status as a table, then the runs that are running or stale."""
    head = f"{'notebook':<22}{'runs':>5}" + "".join(f"{s:>12}" for s in STATES) + f"{'T4 h left':>11}"
    plan = ", the reduced plan" if status.get("reduced") else ""
    lines = [f"profile {status['profile']}{plan}, run root {status['run_root']}", head]
    for row in [*status["notebooks"], {"notebook": "total (distinct runs)", **status["total"]}]:
        counts = "".join(f"{row[s]:>12}" for s in STATES)
        lines.append(f"{row['notebook']:<22}{row['runs']:>5}{counts}{row['t4_hours_left']:>11.2f}")
    for held in status["total"]["held"]:
        age = held["heartbeat_age_s"]
        lines.append(f"{held['state']}: {held['run']} by {held['holder']}, last heartbeat {age} s ago")
    total = status["total"]
    if total["finished"]:
        lines.append(f"finished: every run of this study is done ({plural(total['runs'], 'run')})")
    if status["total"]["waiting"]:
        lines.append("waiting: runs whose config comes from earlier results (01's best lr and scheduler; 05's tuned "
                     "values, TIES's density, the sparse arms' R): planned exactly, and claimable by `work`, once "
                     "those results are done")  # fmt: skip
    return "\n".join(lines)


def print_status(profile: str | None, run_root: str | Path | None = None, notebooks: list[str] | None = None,
                 as_json: bool = False, reduced: bool = False) -> dict:  # fmt: skip
    """Print the study's status (a table, or JSON for scripts) and return it."""
    status = study_status(profile, run_root, notebooks, reduced)
    print(json.dumps(status, indent=1) if as_json else format_status(status), flush=True)
    return status


def work(
    profile: str | None,
    hours: float | None = None,
    notebooks: list[str] | None = None,
    run_root: str | Path | None = None,
    progress: bool = True,
    reduced: bool = False,
) -> list[Run]:
    """Claim and train the study's next unfinished run, again and again, until nothing is left for this session
    or `hours` have passed (a run started before then finishes). Returns the runs this session finished."""

    if hours is not None and hours <= 0:
        raise ValueError(f"--hours {hours!r} is invalid: must be a number > 0 (hours of training for this session)")
    root, profile = Path(run_root) if run_root is not None else default_run_root(), resolve_profile(profile)
    planned = study_plan(profile, notebooks, root, reduced)
    deadline = time.monotonic() + hours * 3600 if hours is not None else None
    distinct = len({(p.experiment, p.id) for p in planned})  # a run two notebooks share is one run, as in status
    print(f"work: {worker_name()} on {plural(distinct, 'planned run')} of profile {profile} in {root}", flush=True)
    finished, tried = [], set()
    while deadline is None or time.monotonic() < deadline:
        if finished:  # a finished run may have decided waiting ones (01's best lr): plan again
            planned = study_plan(profile, notebooks, root, reduced)
        todo = [p for p in planned if not p.waiting and (p.experiment, p.id) not in tried]
        nxt = next((p for p in todo if run_status(p.experiment, p.config, root)["state"] in CLAIMABLE), None)
        if nxt is None:
            break
        tried.add((nxt.experiment, nxt.id))  # once per call: a run lost to another session is not retried
        print(f"work: {nxt.notebook}: {describe(nxt.experiment, nxt.config, nxt.id)}", flush=True)
        try:
            run = runner(nxt.experiment, nxt.config.get("engine", "sequential"))(
                nxt.config, run_root=root, progress=progress
            )
        except LeaseLost as exc:
            print(f"work: {exc}", flush=True)
            continue
        if run.done:
            finished.append(run)
    else:
        print(f"work: {hours:g} h are up; no new run starts", flush=True)
    status = study_status(profile, root, notebooks, reduced)["total"]
    left = status["stale"] + status["interrupted"] + status["new"]
    print(f"work: this session finished {plural(len(finished), 'run')}; the study has {status['done']} of "
          f"{status['runs']} done, {status['running']} running elsewhere, {left} not started or interrupted, "
          f"{status['waiting']} waiting for earlier results", flush=True)  # fmt: skip
    return finished
