"""Batch execution of the notebooks with papermill (the README's smoke command and grid runs): per notebook its time
and what its runs did, then what was written where and the next command."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers.core.settings import (
    REPO,
    default_figures_root,
    default_results_root,
    default_run_root,
    default_tables_root,
)
from helpers.ops.notebook import check_notebook_value, declared_parameters, undeclared
from helpers.ops.plans import PLANS

# The README's figure: what 07 draws from the smoke results, copied by every smoke pipeline (with the rows it shows,
# so that tests/test_docs.py can redraw it with the same function and compare).
README_FIGURE = "fedavg_heatmap"
README_IMAGE = REPO / "docs" / "img" / f"smoke_{README_FIGURE}.png"
README_DATA = ("fedavg_noniid", ["run_id", "experiment", "profile", "sharding", "classes_per_client", "local_steps",
                                 "seed", "round", "test_acc"])  # fmt: skip
# What the runs of a notebook print (helpers.training.runs.open_run / announce_start, helpers.training.leases.claim)
RUN_LINE = re.compile(r"^\[(start|resume|skip|held)\] (\S+) ([0-9a-f]{6,}) (.*)$", re.MULTILINE)
HEAD_RUN = ", head only, "  # helpers.training.runs.describe: a sparse FedAvg run's step 0, trained by that run


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


def check_pipeline_parameters(parameters: dict, paths: list[Path], profile: str = "smoke") -> None:
    """Every parameter must be declared by every selected notebook (papermill would pass it to all of them) and
    valid there: each value, then the notebook's whole plan (helpers.ops.plans), so a bad value is one line before
    the first kernel starts, never a traceback from inside a notebook."""
    for path in paths:
        declared = declared_parameters(path.stem)
        for name in parameters:
            if name not in declared:
                raise ValueError(undeclared(name, path.stem, list(declared)) + " (choose notebooks with --notebooks)")
        for name, value in parameters.items():
            check_notebook_value(name, value, declared[name])
        if path.stem in PLANS:
            PLANS[path.stem]({**declared, **parameters, "PROFILE": profile}, None)


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
    """Execute each notebook in order with PROFILE=profile (plus `parameters`); returns the executed copies.

    Prints one line per notebook (its time and what its runs did), then what was written where and the next command.
    """
    import papermill

    paths = notebook_paths(notebooks)
    check_pipeline_parameters(parameters or {}, paths, profile)  # before the first kernel starts
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if profile == "smoke":  # tiny models: one thread per kernel; more fight over the cores and run 10x slower
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The kernel warns at start that TCP is unencrypted: talk to it over a local socket file instead (POSIX only).
    ipc = {"config": _ipc_config()} if os.name == "posix" else {}
    print(f"[pipeline] profile={profile}: {len(paths)} notebook{'s' * (len(paths) != 1)} -> {_shown(out)}/", flush=True)
    start, done, counts = time.perf_counter(), [], RunCount()
    width = max(len(p.stem) for p in paths)
    for path in paths:
        target = out / path.name
        print(f"  {path.stem:<{width}} ", end="", flush=True)  # the line ends when the notebook does
        began = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(path),
                str(target),
                parameters={"PROFILE": profile, **(parameters or {})},
                cwd=str(path.parent),
                progress_bar=False,
                kernel_manager_class=_quiet_shutdown_kernel_manager(),
                **ipc,
            )
        except BaseException as exc:
            print("stopped" if isinstance(exc, KeyboardInterrupt) else "failed", flush=True)
            raise
        runs = RunCount.from_notebook(target)
        counts.add(runs)
        print(f"{duration(time.perf_counter() - began):>10}  {runs.describe()}", flush=True)
        done.append(target)
    refreshed = _refresh_readme_figure(profile, [p.stem for p in paths])
    print(closing_summary(profile, done, counts, time.perf_counter() - start, parameters or {}, refreshed), flush=True)
    return done


@dataclass
class RunCount:
    """What runs did, by run id, from the lines they print: trained from scratch, resumed, skipped because they
    were done before, held by another session."""

    new: set = field(default_factory=set)
    resumed: set = field(default_factory=set)
    skipped: set = field(default_factory=set)
    held: set = field(default_factory=set)
    heads: RunCount | None = None  # the step-0 head runs that sparse runs trained first (not in the plans' count)

    @classmethod
    def from_text(cls, text: str) -> RunCount:
        """Counts from a notebook's printed lines; a run trained here and opened again later counts as trained."""
        lines = [(event, rid, HEAD_RUN in rest) for event, _experiment, rid, rest in RUN_LINE.findall(text)]
        counts = [{"start": set(), "resume": set(), "skip": set(), "held": set()} for _ in range(2)]
        for event, rid, head in lines:
            counts[head][event].add(rid)
        runs, heads = (cls(f["start"], f["resume"] - f["start"], f["skip"] - f["start"] - f["resume"],
                           f["held"] - f["start"] - f["resume"]) for f in counts)  # fmt: skip
        runs.heads = heads
        return runs

    @classmethod
    def from_notebook(cls, path: Path) -> RunCount:
        """Counts from the stdout of an executed notebook."""
        cells = json.loads(Path(path).read_text()).get("cells", [])
        outputs = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
        return cls.from_text("".join("".join(o.get("text", "")) for o in outputs if o.get("name") == "stdout"))

    def add(self, other: RunCount) -> None:
        """Fold in another notebook's counts (a run skipped here but trained in an earlier notebook stays new)."""
        self.new |= other.new
        self.resumed |= other.resumed - self.new
        trained = self.new | self.resumed
        self.skipped = (self.skipped | other.skipped) - trained
        self.held = (self.held | other.held) - trained - self.skipped
        if other.heads is not None:
            if self.heads is None:
                self.heads = RunCount()
            self.heads.add(other.heads)

    def describe(self) -> str:
        """E.g. '15 runs: 12 new, 1 resumed, 2 skipped (done before)', then the step-0 head runs apart."""
        parts = [(self.new, "new"), (self.resumed, "resumed"), (self.skipped, "skipped (done before)"),
                 (self.held, "held by another session")]  # fmt: skip
        total = sum(len(ids) for ids, _ in parts)
        text = "no runs"
        if total:
            text = f"{total} run{'s' * (total != 1)}: " + ", ".join(f"{len(ids)} {what}" for ids, what in parts if ids)
        heads = self.heads.describe() if self.heads is not None else "no runs"
        if heads != "no runs":  # e.g. '(and 8 step-0 head runs: 8 new)'
            text += f" (and {heads.replace(' run', ' step-0 head run', 1)})"
        return text


def closing_summary(profile: str, executed: list[Path], counts: RunCount, seconds: float, parameters: dict,
                    readme_refreshed: bool | None) -> str:  # fmt: skip
    """What the pipeline did and wrote where, and the next command."""
    figures = default_figures_root() / profile
    tables = default_tables_root() / profile
    run_root = Path(parameters.get("RUN_ROOT") or default_run_root())
    rows = [
        ("executed notebooks", executed[0].parent if executed else None, "*.ipynb"),
        ("results (tidy CSV)", default_results_root() / profile, "*.csv"),
        ("figures (PNG, PDF)", figures, "*.*"),
        ("report tables", tables, "*.tex"),
        ("run folders", run_root if run_root.is_absolute() else REPO / run_root, None),
    ]
    lines = [f"[pipeline] done in {duration(seconds)}: {counts.describe()}"]
    for what, folder, pattern in rows:
        if folder is not None and folder.is_dir():
            files = len(list(folder.glob(pattern))) if pattern else None
            count = "" if files is None else f" ({files} file{'s' * (files != 1)})"
            lines.append(f"  {what:<20}{_shown(folder)}/{count}")
    if readme_refreshed is not None:
        state = "updated" if readme_refreshed else "unchanged"
        lines.append(f"  {'README figure':<20}{_shown(README_IMAGE)} ({state})")
    command = "make report" + ("" if profile == "smoke" else f" PROFILE={profile}")
    lines.append(f"next: {command}   (the PDF report/main-{profile}.pdf from these results)")
    return "\n".join(lines)


def refresh_readme_figure(figures_root: Path, results_root: Path, image: Path = README_IMAGE) -> bool:
    """Copy the smoke profile's README figure (and the rows it shows) beside the README; True if it changed."""
    source = Path(figures_root) / "smoke" / f"{README_FIGURE}.png"
    name, columns = README_DATA
    table = Path(results_root) / "smoke" / f"{name}.csv"
    if not source.is_file() or not table.is_file():
        return False
    import pandas as pd

    rows = pd.read_csv(table, dtype=str, keep_default_na=False)  # values copied as written (4 stays 4)
    rows = rows.loc[rows["test_acc"] != "", [c for c in columns if c in rows]]
    data = image.with_suffix(".csv")
    changed = not image.is_file() or image.read_bytes() != source.read_bytes()
    if changed:
        shutil.copyfile(source, image)
    text = rows.to_csv(index=False)
    if not data.is_file() or data.read_text() != text:
        data.write_text(text)
        changed = True
    return changed


def _refresh_readme_figure(profile: str, stems: list[str]) -> bool | None:
    """After a smoke pipeline that drew the figures in the repository's own folders: refresh the README's figure.
    None where it does not apply (another profile, 07 not run, figures or results written elsewhere)."""
    own = default_figures_root() == REPO / "figures" and default_results_root() == REPO / "results"
    if profile != "smoke" or not own or not any(s.startswith("07") for s in stems):
        return None
    return refresh_readme_figure(REPO / "figures", REPO / "results")


def duration(seconds: float) -> str:
    """41 s, 3 min 12 s, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _shown(path: Path) -> str:
    """`path` relative to the working folder where it lies inside it, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _ipc_config():
    from traitlets.config import Config

    return Config({"KernelManager": {"transport": "ipc"}})


def _quiet_shutdown_kernel_manager():
    """nbclient's kernel manager, minus the interrupt jupyter_client sends before it asks a kernel to shut down.

    The SIGINT reaches an idle ipykernel, which then logs "ERROR | KeyboardInterrupt caught in kernel" on this
    process's stderr. Every cell has finished at shutdown: there is nothing to interrupt.
    """
    from jupyter_client.manager import AsyncKernelManager

    class QuietShutdownKernelManager(AsyncKernelManager):
        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return QuietShutdownKernelManager
