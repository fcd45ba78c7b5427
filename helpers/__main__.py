"""Command line: `python -m helpers run EXPERIMENT --profile smoke --set lr=0.01`, `python -m helpers pipeline`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from helpers.config import EXPERIMENTS, PROFILES, make_config, parse_value

# experiment name -> "module:function"; each function takes (config, run_root=..., progress=...) -> Run
RUNNERS = {
    "centralized": "helpers.centralized:run_centralized",
    "fedavg": "helpers.fedavg:run_fedavg",
    "sparse_centralized": "helpers.editing:run_sparse_centralized",
    "sparse_fedavg": "helpers.editing:run_sparse_fedavg",
}


def runner(experiment: str):
    """The function that runs `experiment`."""
    module, func = RUNNERS[experiment].split(":")
    return getattr(importlib.import_module(module), func)


def parse_sets(pairs: list[str], experiment: str) -> dict:
    """['lr=0.1', 'epochs=3'] -> {'lr': 0.1, 'epochs': 3}, typed by each parameter's kind."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r} is invalid: must look like name=value")
        name, text = (part.strip() for part in pair.split("=", 1))
        if name not in EXPERIMENTS[experiment]:
            allowed = ", ".join(sorted(EXPERIMENTS[experiment]))
            raise ValueError(f"unknown parameter {name!r} for experiment {experiment!r}; allowed: {allowed}")
        out[name] = parse_value(name, text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment (resumes or skips as needed)")
    run.add_argument("experiment", choices=sorted(set(EXPERIMENTS) & set(RUNNERS)))
    run.add_argument("--profile", choices=PROFILES, default=None, help="default: $FLME_PROFILE or smoke")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    run.add_argument("--run-root", default=None, help="default: $FLME_RUN_ROOT, Drive in Colab, else ./runs")
    run.add_argument("--results", default=None, metavar="NAME", help="also write results/<profile>/NAME.csv")
    pipe = sub.add_parser("pipeline", help="execute the notebooks with papermill")
    pipe.add_argument("--profile", choices=PROFILES, default="smoke")
    pipe.add_argument("--notebooks", nargs="*", default=None, help="e.g. 01 02 (default: all)")
    pipe.add_argument("--output-dir", default="notebooks/executed")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            config = make_config(args.experiment, args.profile, **parse_sets(args.set, args.experiment))
            result = runner(args.experiment)(config, run_root=args.run_root, progress=sys.stderr.isatty())
            if args.results:
                from helpers.runs import write_results

                print(f"results: {write_results([result], args.results)}", file=sys.stderr)
            print(json.dumps({"run_dir": str(result.dir), **result.summary()}))
        else:
            from helpers.pipeline import run_pipeline

            run_pipeline(profile=args.profile, notebooks=args.notebooks, output_dir=args.output_dir)
    except (ValueError, OSError, RuntimeError) as exc:  # the user's input or environment: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
