"""What a grid costs on a free Colab T4, printed by every notebook before its grid starts.

Work is counted in images through the model (forward+backward for training, the same in fp32 for per-sample
scoring, forward only for evaluation and feature caching) from the config alone; seconds = work / throughput.
Throughput comes from a benchmark measured on a T4 (`python -m helpers.bench --profile full --device cuda` on
Colab, JSON in results/bench/) when one exists, else from the model's FLOP count at an ASSUMED fraction of the T4's
peak.

`python -m helpers.cost [--profile full]` prints the estimate of every notebook's default grid.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from helpers.config.experiments import make_config, setting, split_sizes
from helpers.core.models import forward_flops
from helpers.core.settings import REPO, default_run_root
from helpers.editing.step0 import head_fedavg_config
from helpers.federated.clients import clients_per_round
from helpers.federated.stragglers import expected_local_steps
from helpers.ops.coverage import ADDITIONS, BEFORE_ADDITIONS
from helpers.ops.memory import estimate_phases, memory_table
from helpers.ops.plans import PLANS, notebook_plan
from helpers.sparse.masks import one_shot
from helpers.training.runs import metrics_file, run_id

T4_PEAK_FLOPS = 65e12  # dense fp16 tensor-core peak of a T4 (datasheet)
T4_FP32_PEAK_FLOPS = 8.1e12  # its fp32 peak: per-sample scoring runs without autocast, so it runs at this rate
ASSUMED_T4_MFU = 0.25  # an assumption until a T4 benchmark exists: no T4 was available to measure it
BENCH_DIR = REPO / "results" / "bench"


@dataclass
class Work:
    """Images through the backbone: `train` forward+backward, `forward` forward only, `scored` fp32 per-sample
    gradients; `shared` is work several runs reuse (cached features, the step-0 head run), counted once per key."""

    train: float = 0.0
    forward: float = 0.0
    scored: float = 0.0
    shared: dict[str, float] = field(default_factory=dict)


def _evaluations(steps: int, every: int, test_each: bool) -> tuple[int, int]:
    """How many val and test passes a run of `steps` epochs/rounds makes (val every `every` and at the end)."""
    val = steps // every + (1 if steps % every else 0)
    return val, (val if test_each else 1)


def _features_key(config: dict) -> str:
    seed = "" if config["pretrained"] else f"-seed{config['seed']}"  # random-init backbones differ by seed
    data = config["dataset"] if config["dataset"] == "cifar100" else f"synthetic{config['synthetic_train_size']}"
    return f"features:{config['model']}-{config['img_size']}-{data}{seed}"


def run_work(experiment: str, config: dict) -> Work:
    """The images one run pushes through the backbone, from its config."""
    n_train, n_val, n_test = split_sizes(config)
    work = Work()
    federated = experiment in ("fedavg", "sparse_fedavg")
    if federated:
        steps = config["rounds"]
        images = steps * clients_per_round(config["num_clients"], config["participation"])
        images *= expected_local_steps(config) * config["batch_size"]  # stragglers stop early
        val, test = _evaluations(steps, config["eval_every"], config["eval_test"])
    else:
        steps, images = config["epochs"], config["epochs"] * n_train
        val, _ = _evaluations(steps, config["eval_every"], False)
        test = steps if config["eval_test"] else 1
    evaluation = val * n_val + test * n_test
    if federated:  # the interference diagnostic: each client's probe through its own model and the new global one
        m = clients_per_round(config["num_clients"], config["participation"])
        evaluation += steps * 2 * m * setting(config, "interference_probe")
    if config.get("train_mode") == "head":
        if config["head_features"] == "cached":  # one pass over every split; the head's epochs are negligible
            work.shared[_features_key(config)] = n_train + n_val + n_test
        else:  # the frozen backbone runs forward at every step; the head's backward is negligible
            work.forward += images + evaluation
        return work
    work.train += images
    work.forward += evaluation
    if experiment.startswith("sparse_"):
        _add_editing(work, experiment, config, n_train, n_val + n_test)
    return work


def _add_editing(work: Work, experiment: str, config: dict, n_train: int, n_eval: int) -> None:
    """Step 0 (shared between runs on the same backbone/shards) and calibration (per-sample gradients)."""
    if experiment == "sparse_fedavg" and config["step0"] == "sgd":
        head = head_fedavg_config(config)
        work.shared[f"step0:{run_id(head)}"] = sum(run_work("fedavg", head).shared.values())
    else:
        work.shared[_features_key(config)] = n_train
    work.forward += n_eval  # the step-0 model on val and test (the no-training control)
    if one_shot(config["mask_rule"]) or config["sparsity"] == 0:
        return  # one-shot masks (magnitude, random) need no scoring, nor does the dense control
    pools = config["num_clients"] if experiment == "sparse_fedavg" else 1
    samples = config["calibration_rounds"] * min(pools * config["calibration_samples"], n_train)
    # Per-sample gradients come from one batched forward+backward per chunk (plus per-layer products), so a
    # scored sample costs about one training image, in fp32; talos draws its labels from that same forward.
    work.scored += samples


def t4_throughput(model: str, img_size: int) -> tuple[float, float, float, str]:
    """(train, forward, scored images/s, where the numbers come from) on a T4 for `model` at `img_size`."""
    for path in sorted(BENCH_DIR.glob("full-cuda-*.json"), reverse=True):
        measured = json.loads(path.read_text())
        if "T4" in measured.get("device", "") and model == "vit_small_patch16_224.dino" and img_size == 224:
            scored = measured["scoring_samples"] / measured["scoring_vectorised_s"]
            return measured["train_images_per_s"], measured["eval_images_per_s"], scored, f"measured ({path.name})"
    flops = forward_flops(model, img_size)
    rate = T4_PEAK_FLOPS * ASSUMED_T4_MFU
    scored = T4_FP32_PEAK_FLOPS * ASSUMED_T4_MFU / (3 * flops)
    return rate / (3 * flops), rate / flops, scored, f"FLOP count at an assumed {ASSUMED_T4_MFU:.0%} of the T4 peak"


def run_seconds(experiment: str, config: dict) -> tuple[float, dict[str, float]]:
    """T4 seconds of a run's own work, and of its shared work by key."""
    train_ips, forward_ips, scored_ips, _ = t4_throughput(config["model"], config["img_size"])
    work = run_work(experiment, config)
    own = work.train / train_ips + work.forward / forward_ips + work.scored / scored_ips
    return own, {key: images / forward_ips for key, images in work.shared.items()}


def _progress(experiment: str, config: dict, run_root: Path) -> float:
    """Fraction of a run already on disk: 1 when done, metrics rows / epochs|rounds when interrupted."""
    folder = run_root / experiment / run_id(config)
    if (folder / "done.json").exists():
        return 1.0
    metrics = metrics_file(folder)
    if metrics is None:
        return 0.0
    rows = max(0, len(metrics.read_text().strip().splitlines()) - 1)
    return min(1.0, rows / config.get("rounds", config.get("epochs", 1)))


@dataclass
class Estimate:
    runs: int
    done: int
    started: int
    total_s: float
    left_s: float
    source: str

    def __str__(self) -> str:
        started = f", {self.started} started" if self.started else ""
        return (
            f"this grid ({self.runs} runs) needs about {_duration(self.total_s)} of T4 time; "
            f"{self.done} are already done{started}, about {_duration(self.left_s)} left "
            f"[{self.source}]"
        )


def _shared_done(key: str, root: Path) -> bool:
    """A step-0 head run done on disk is paid, whichever run trained it (its sparse runs may not have started)."""
    kind, _, rid = key.partition(":")
    return kind == "step0" and (root / "fedavg" / rid / "done.json").exists()


def estimate_plan(plan: Iterable[tuple[str, dict]], run_root: str | Path | None = None) -> Estimate:
    """T4 time of every run in `plan` and what is left given the runs already under `run_root`."""
    root = Path(run_root) if run_root is not None else default_run_root()
    plan = list(plan)
    total = left = 0.0
    shared: dict[str, list] = {}  # key -> [seconds, already paid]
    done = started = 0
    for experiment, config in plan:
        own, by_key = run_seconds(experiment, config)
        progress = _progress(experiment, config, root)
        done += progress == 1.0
        started += 0.0 < progress < 1.0
        total, left = total + own, left + own * (1 - progress)
        for key, seconds in by_key.items():
            entry = shared.setdefault(key, [seconds, _shared_done(key, root)])
            entry[1] |= progress > 0  # a run that started has computed its shared part
    total += sum(s for s, _ in shared.values())
    left += sum(s for s, paid in shared.values() if not paid)
    source = t4_throughput(plan[0][1]["model"], plan[0][1]["img_size"])[-1] if plan else "empty plan"
    return Estimate(len(plan), done, started, total, left, source)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} GPU-hours"
    if seconds >= 60:
        return f"{seconds / 60:.0f} GPU-minutes"
    return f"{seconds:.0f} GPU-seconds"


# ----------------------------------------------------------------------------- notebooks' default grids


APART = {"tuning": "{} tuning", "extension_tuning": "{} extension", "extension": "{} extension"}  # group -> row


NOWHERE = Path("/nonexistent-run-root")  # a run root with nothing done: every run counted


def notebook_table(profile: str = "full", reduced: bool = False) -> list[dict]:
    """One row per notebook: runs in its default grid (`reduced`: the reduced plan's) and their T4 hours (nothing
    counted as done)."""
    rows = []
    for name in PLANS:
        plan = notebook_plan(name, profile, run_root=NOWHERE, reduced=reduced)
        parts: dict[str, list[str]] = {}
        for group in plan.groups:  # the remedies' tuning apart (the price of a fair comparison), the extension apart
            parts.setdefault(APART.get(group, "").format(name[:2]) or name, []).append(group)
        counted: set[str] = set()
        for label, groups in parts.items():  # a run two parts share (FedAvg's in the extension) counts in the first
            runs = [(e, c) for e, c in plan.runs_of(*groups) if run_id(c) not in counted]
            counted |= {run_id(c) for _, c in runs}
            if runs:
                estimate = estimate_plan(runs, run_root=NOWHERE)
                rows.append({"notebook": label, "runs": estimate.runs, "t4_hours": estimate.total_s / 3600})
    return rows


def plan_total(profile: str, parameters: dict[str, dict]) -> tuple[int, float]:
    """Distinct runs and T4 hours of the notebooks of `parameters` ({notebook: its parameters}), nothing done."""
    runs, seconds = 0, 0.0
    for name, given in parameters.items():
        distinct = {run_id(c): (e, c) for e, c in notebook_plan(name, profile, NOWHERE, **given).runs}
        estimate = estimate_plan(distinct.values(), run_root=NOWHERE)
        runs, seconds = runs + estimate.runs, seconds + estimate.total_s
    return runs, seconds / 3600


def additions_table(profile: str = "full") -> list[dict]:
    """What each of issue 33's additions (seeds, coverage: helpers.ops.coverage.ADDITIONS) adds to the default
    plans in runs and T4 hours, added one after the other to the plans before them (coverage.BEFORE_ADDITIONS)."""
    restored: set[str] = set()

    def total() -> tuple[int, float]:
        return plan_total(profile, {nb: {k: v for k, v in before.items() if k not in restored}
                                    for nb, before in BEFORE_ADDITIONS.items()})  # fmt: skip

    rows, (runs, hours) = [], total()
    for label, names in ADDITIONS:
        restored |= names
        now = total()
        rows.append({"addition": label, "runs": now[0] - runs, "t4_hours": now[1] - hours})
        runs, hours = now
    return rows


MARKDOWN_BEGIN = "<!-- generated by `python -m helpers.cost --markdown`: do not edit, a test compares it -->"
MARKDOWN_END = "<!-- end of the generated table -->"


def cost_markdown(profile: str = "full") -> str:
    """The study's default plans as a markdown table (runs and estimated T4 hours per notebook, the total; the same
    for the reduced plan), then what each addition of seeds and coverage costs, between the markers that
    docs/reproduce.md keeps them in."""
    rows, reduced = notebook_table(profile), {r["notebook"]: r for r in notebook_table(profile, reduced=True)}
    lines = [MARKDOWN_BEGIN, "", "| notebook | runs | estimated T4 time | reduced plan: runs | reduced plan: T4 time |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        small = reduced.get(r["notebook"], {"runs": 0, "t4_hours": 0.0})
        lines.append(f"| {r['notebook']} | {r['runs']} | {_duration(r['t4_hours'] * 3600)} | {small['runs']} | "
                     f"{_duration(small['t4_hours'] * 3600)} |")  # fmt: skip
    total, small = (sum(r["t4_hours"] for r in rs) for rs in (rows, reduced.values()))
    lines += [f"| total | {sum(r['runs'] for r in rows)} | {_duration(total * 3600)} | "
              f"{sum(r['runs'] for r in reduced.values())} | {_duration(small * 3600)} |", ""]  # fmt: skip
    lines += ["| what the complete plan adds (in this order) | runs | estimated T4 time |", "|---|---:|---:|"]
    lines += [
        f"| {a['addition']} | {a['runs']} | {_duration(a['t4_hours'] * 3600)} |" for a in additions_table(profile)
    ]
    return "\n".join([*lines, "", MARKDOWN_END])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("full", "smoke"), default="full", help="whose default plans (full)")
    parser.add_argument("--markdown", action="store_true", help="print the table docs/reproduce.md holds")
    parser.add_argument("--reduced", action="store_true", help="the reduced plan (REDUCED=True in 05 and 06)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(cost_markdown(args.profile))
        return
    rows = notebook_table(args.profile, reduced=args.reduced)
    print("the reduced plan (REDUCED=True)" if args.reduced else "the complete plan (--reduced: the reduced one)")
    for row in [*rows, {"notebook": "total", **{k: sum(r[k] for r in rows) for k in ("runs", "t4_hours")}}]:
        print(f"{row['notebook']:<24} {row['runs']:>4} runs  {_duration(row['t4_hours'] * 3600):>18}")
    if not args.reduced:
        print("what the complete plan adds to the plans before seeds and coverage (issue 33), in this order:")
        for row in additions_table(args.profile):
            print(f"  {row['addition']:<58} {row['runs']:>+5} runs  {_duration(row['t4_hours'] * 3600):>18}")
    print(t4_throughput(*_model_of(args.profile))[-1])
    print(memory_table(estimate_phases(make_config("fedavg", args.profile, pretrained=False))))


def _model_of(profile: str) -> tuple[str, int]:
    config = make_config("centralized", profile)
    return config["model"], config["img_size"]


if __name__ == "__main__":
    main()
