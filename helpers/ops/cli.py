"""Command line: `python -m helpers run EXPERIMENT --profile smoke --set lr=0.01`, `python -m helpers flower`,
`python -m helpers pipeline`, and for a team of sessions on one run root `python -m helpers status` and `work`.
Exit codes: 0 done, 1 a file could not be read or written, 2 bad input (or environment), 3 the run is held by another
session (try later)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

from helpers.config.experiments import EXPERIMENTS, make_config, resolve_profile
from helpers.config.parsing import describe_parameters, parse_sets
from helpers.core.settings import PROFILES, default_results_root, default_run_root
from helpers.flower.federation import DEFAULT_ADDRESS, DEFAULT_CREDENTIALS, check_address, federation_script
from helpers.ops.pipeline import describe_notebooks, parse_parameters, run_pipeline
from helpers.ops.runners import RUNNERS, runner
from helpers.ops.setup import write_setup
from helpers.ops.study import pick_notebooks, print_status, study_notebooks
from helpers.ops.study import work as work_on
from helpers.reporting.results import read_results, write_results
from helpers.training.leases import LeaseLost

HELD = 3  # exit code: the run is held by another session (not an error: it is being trained)


EXAMPLES = """examples:
  python -m helpers run fedavg --set sharding=noniid --set classes_per_client=1 --set local_steps=8
  python -m helpers run fedavg --set algorithm=fedadam       # FedAdam at its paper's defaults (listed above)
  python -m helpers run sparse_fedavg --profile full --set sparsity=0.95 --results custom/sparse95"""
OTHER_COMMANDS = """the other commands:
  python -m helpers.cost          T4 hours and GPU memory of every notebook's plan
  python -m helpers.report        the report's figures and tables from results/<profile>/ (make report: the PDF)
  python -m helpers.bench         the speed benchmark (--flower: Flower's per-round overhead)
  python -m helpers.gpucheck      every GPU check in one command
  python -m helpers.credentials   a Flower federation's CA, SuperLink certificate and SuperNode keys"""


def _schema_help(experiments: list[str]) -> dict:
    """argparse keywords that list every --set parameter of `experiments` below the options, with examples."""
    epilog = (
        "parameters (--set NAME=VALUE): what each means, its default and its allowed values\n"
        + describe_parameters(experiments)
        + "\n\ncalibration_samples is a total: federated runs give each client ceil(total / num_clients) unless "
        "it is set.\nEach run's config is validated before any compute; a finished run is skipped, an interrupted one "
        "resumes.\n\n" + EXAMPLES
    )
    return {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a number of hours > 0, e.g. 3 or 0.5")
    return hours


def check_results(name: str | None, profile: str) -> None:
    """--results NAME names results/<profile>/NAME.csv (subfolders allowed), nothing outside: not absolute, no '..',
    no symbolic link leading out; else ValueError naming --results (before any run folder is made)."""
    if name is None:
        return
    parts = Path(name).parts
    if not name.strip() or "\0" in name or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ValueError(f"--results {name!r} is invalid: must name a file under results/{profile}/ (e.g. mine or "
                         "custom/mine), without an absolute path or '..'")  # fmt: skip
    folder = (default_results_root() / profile).resolve()
    target = (folder / f"{name}.csv").resolve()  # follows links, dangling ones too
    if folder not in target.parents:
        raise ValueError(f"--results {name!r} is invalid: results/{profile}/{name}.csv leads to {target}, outside "
                         f"{folder} (a symbolic link)")  # fmt: skip


def secure_script(args: argparse.Namespace, command: list[str], num_nodes: int) -> str:
    """--print-flwr-run's output: the `flwr run` line (local simulation) or a real federation's whole script."""
    federation = (args.superlink_address, args.credentials, args.insecure or None)
    if args.print_flwr_run == "local":
        if any(x is not None for x in federation):
            raise ValueError("--superlink-address, --credentials and --insecure are for a real federation: "
                             "--print-flwr-run NAME (a connection name other than local)")  # fmt: skip
        return shlex.join(command)

    credentials = Path(args.credentials or DEFAULT_CREDENTIALS).expanduser().resolve()
    address = check_address(args.superlink_address or DEFAULT_ADDRESS)
    return federation_script(command, num_nodes, credentials, address, insecure=args.insecure)


def build_parser() -> argparse.ArgumentParser:
    """Every command, option and parameter of `python -m helpers`, each with its help text."""
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__, epilog=OTHER_COMMANDS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    experiments = sorted(set(EXPERIMENTS) & set(RUNNERS))
    run = sub.add_parser("run", help="run one experiment (resumes or skips as needed)", **_schema_help(experiments))
    run.add_argument("experiment", choices=experiments, help="what to train: centralized or fedavg, dense or "
                     "sparse (sparse_*: a calibrated mask, SparseSGDM)")  # fmt: skip
    flower = sub.add_parser("flower", help="run fedavg or sparse_fedavg on Flower's simulation engine "
                            "(engine=flower; needs requirements-flower.txt)",
                            **_schema_help(["fedavg", "sparse_fedavg"]))  # fmt: skip
    flower.add_argument("experiment", nargs="?", default="fedavg", choices=["fedavg", "sparse_fedavg"],
                        help="fedavg (default) or sparse_fedavg (a calibrated mask, SparseSGDM)")  # fmt: skip
    flower.add_argument("--print-flwr-run", nargs="?", const="local", default=None, metavar="CONNECTION",
                        help="print the `flwr run` command (Flower's CLI) for this run on a SuperLink connection "
                        "(default: local, Flower's local simulation) instead of running it; with a connection "
                        "NAME, the whole secure federation: credentials, SuperLink, registration, SuperNodes, "
                        "flwr run")  # fmt: skip
    flower.add_argument(
        "--superlink-address",
        default=None,
        metavar="HOST:PORT",
        help="with --print-flwr-run NAME: where nodes reach the SuperLink (default SERVER:8000)",
    )
    flower.add_argument("--credentials", default=None, metavar="DIR",
                        help="with --print-flwr-run NAME: the credentials folder (python -m helpers.credentials; "
                        "default ~/.flme/credentials, outside the repository)")  # fmt: skip
    flower.add_argument(
        "--insecure",
        action="store_true",
        help="with --print-flwr-run NAME: no TLS, no node authentication (a local try-out only)",
    )
    for p in (run, flower):
        p.add_argument("--profile", choices=PROFILES, default=None, help="default: $FLME_PROFILE or smoke")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="override a parameter (listed below; repeatable), e.g. --set rounds=3",
        )
        p.add_argument("--run-root", default=None, help="default: $FLME_RUN_ROOT, Drive in Colab, else ./runs")
        p.add_argument("--results", default=None, metavar="NAME",
                       help="also write results/<profile>/NAME.csv (subfolders allowed, nothing outside)")  # fmt: skip
        p.add_argument("-q", "--quiet", action="store_true", help="print only the final JSON line (and errors): no "
                       "[start]/[skip] line, no progress per epoch or round (by default a bar on a terminal, else a "
                       "line per epoch or round on stderr)")  # fmt: skip
    pipe = sub.add_parser("pipeline", help="execute the notebooks with papermill",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="notebook parameters (-p NAME VALUE) and their defaults; PROFILE comes from "
                          "--profile:\n" + describe_notebooks())  # fmt: skip
    pipe.add_argument("--profile", choices=PROFILES, default="smoke", help="the notebooks' PROFILE (default smoke)")
    pipe.add_argument(
        "--notebooks",
        nargs="*",
        default=None,
        help="only these notebooks, by number or name, e.g. 01 02 (default: all)",
    )
    pipe.add_argument("--output-dir", default="notebooks/executed", help="where the executed notebooks are saved "
                      "(default notebooks/executed)")  # fmt: skip
    pipe.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                      help="a notebook parameter (a Python literal, else text), e.g. -p ROUNDS 3")  # fmt: skip
    notebooks = ", ".join(n.split("_")[0] for n in study_notebooks())
    team = "A team of sessions sharing one run root (e.g. a Drive folder): see docs/team.md."
    status = sub.add_parser("status", help="the study on this run root: done, running (by whom), stale, left, "
                            "T4 hours left, per notebook", description=team)  # fmt: skip
    work = sub.add_parser("work", help="claim and train the study's next unfinished runs (several sessions share "
                          "the study without overlap)", description=team)  # fmt: skip
    for p in (status, work):
        p.add_argument("--profile", choices=PROFILES, default=None, help="default: $FLME_PROFILE or smoke")
        p.add_argument("--run-root", default=None, help="default: $FLME_RUN_ROOT, Drive in Colab, else ./runs")
        p.add_argument("--notebook", action="append", default=None, metavar="N",
                       help=f"only this notebook's runs (repeatable): {notebooks}")  # fmt: skip
        p.add_argument("--reduced", action="store_true", help="the reduced plan (REDUCED=True in 05 and 06; "
                       "docs/reproduce.md: its T4 hours)")  # fmt: skip
    status.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    setup = sub.add_parser("setup", help="write results/<profile>/setup.csv: the study's settings from the "
                           "configs and the notebooks' plans (make report runs it first)")  # fmt: skip
    setup.add_argument("--profile", choices=PROFILES, default=None, help="default: $FLME_PROFILE or smoke")
    setup.add_argument("--results-root", default=None, help="default: $FLME_RESULTS_ROOT, else results/")
    work.add_argument("--hours", type=_hours, default=None, metavar="H",
                      help="start no new run after H hours (default: until nothing is left)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("status", "work"):
            pick_notebooks(args.notebook)  # a bad --notebook fails before any plan is built
            if args.command == "status":
                print_status(args.profile, args.run_root, args.notebook, as_json=args.json, reduced=args.reduced)
            else:
                work_on(args.profile, args.hours, args.notebook, args.run_root, progress=sys.stderr.isatty(),
                        reduced=args.reduced)  # fmt: skip
            return 0
        if args.command == "setup":
            print(f"setup: {write_setup(resolve_profile(args.profile), args.results_root)}")
            return 0
        if args.command in ("run", "flower"):
            sets = parse_sets(args.set, args.experiment)
            if args.command == "flower":
                sets["engine"] = "flower"
            config = make_config(args.experiment, args.profile, **sets)
            check_results(args.results, config["profile"])
            if args.command == "flower" and args.print_flwr_run:
                from helpers.flower.app import flwr_run_command  # lazy: Flower is optional

                root = args.run_root or default_run_root()
                command = flwr_run_command(config, root, superlink=args.print_flwr_run)
                print(secure_script(args, command, config["num_clients"]))
                return 0
            run_fn = runner(args.experiment, config.get("engine", "sequential"))
            # --quiet: the runner's [start]/[skip] lines go nowhere; the final JSON and errors still print
            with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
                result = run_fn(config, run_root=args.run_root, progress=not args.quiet)
            if not result.done:  # another session holds it (the runner said by whom)
                print(json.dumps({"run_dir": str(result.dir), "done": False}))
                return HELD
            if args.results:
                existed = read_results(args.results, config["profile"]) is not None
                path = write_results([result], args.results)
                note = " (replaced: it now holds this run's rows only)" if existed else ""
                print(f"results: {path}{note}", file=sys.stderr)
            print(json.dumps({"run_dir": str(result.dir), **result.summary()}))
        else:
            parameters = parse_parameters(args.parameter)
            run_pipeline(args.profile, args.notebooks, args.output_dir, parameters)
    except LeaseLost as exc:  # another session took the run over: it goes on there
        print(f"stopped: {exc}", file=sys.stderr)
        return HELD
    except OSError as exc:  # a file (a Drive folder, a results CSV) could not be read or written, retries included
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # the user's input or environment (ImportError: Flower not installed): one line, no traceback
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
