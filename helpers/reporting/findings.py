"""The report's findings: each question of the course spec answered in words from results/<profile>/, with its numbers,
its seeds (mean +- std where there are several) and a verdict that respects the spread, written as LaTeX macros
(report/generated/<profile>/findings.tex). Torch-free."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from helpers.reporting.extension import extension_rows
from helpers.reporting.labels import algorithm_order, algorithm_title, sharding_label, with_algorithm
from helpers.reporting.results import last_rows
from helpers.reporting.summaries import MissingResults, select, setting_order, tables_dir
from helpers.reporting.tables import latex_escape
from helpers.reporting.verdicts import MIN_GAP, Stat, best_of, change, compare, differs, seeds_said, stats

CIFAR100_TRAIN = 50_000  # torchvision's CIFAR-100 training set, before the validation split
SMOKE = "Smoke numbers: "  # each sentence; SMOKE_NOTE once (\\findingNote)
SMOKE_NOTE = (
    "Smoke numbers come from synthetic data and a tiny random model: they mean nothing about DINO on CIFAR-100."
)


def readable(name: object) -> str:
    """A rule's or schedule's identifier as words: least_sensitive -> least-sensitive."""
    return str(name).replace("_", "-")


@dataclass(frozen=True)
class Finding:
    """One question's answer: its macro name, the full text (plain, escaped when written) and a short form."""

    name: str
    text: str
    short: str


def runs(df: pd.DataFrame, source: str, **match: object) -> pd.DataFrame:
    """One row per run of results file `source` (its last row), step-0 rows left out; raises MissingResults."""
    part = select(df, source, **match)
    part = part[part["experiment"] != "step0"] if "experiment" in part else part
    if part.empty:
        raise MissingResults(f"{source}.csv")
    return last_rows(part)


def round_means(df: pd.DataFrame, source: str, metric: str) -> pd.Series:
    """Each run's mean of `metric` over its rounds (run_id -> value)."""
    return select(df, source, (metric,)).groupby("run_id")[metric].mean()


def with_setting(final: pd.DataFrame) -> pd.DataFrame:
    """`setting` per row: 'IID' or 'Nc=k'."""
    nc = final["classes_per_client"] if "classes_per_client" in final else pd.Series(math.nan, index=final.index)
    return final.assign(
        setting=["IID" if s == "iid" else f"Nc={sharding_label(s, n)}" for s, n in zip(final["sharding"], nc)]
    )


def on_epochs(df: pd.DataFrame) -> tuple[str, str]:
    part = select(df, "centralized_final", ("epoch", "val_acc"))
    final = last_rows(part)
    total = int(final["epoch"].max())
    curve = part.dropna(subset=["val_acc"]).groupby("epoch")["val_acc"].mean()
    last = Stat.of(final["val_acc"])
    spread = max(last.std if last.n > 1 else 0.0, MIN_GAP)
    enough = int(curve.index[curve >= curve.max() - spread][0])
    test = Stat.of(final["test_acc"])
    name = readable(final["scheduler"].iloc[0])
    text = (f"The final centralized runs ({name} schedule, {total} epochs) end at test accuracy {test.text()}; "
            f"their mean validation accuracy is within {spread:.3f} of its best from epoch {enough} "
            f"on, so about {enough} of the {total} epochs are needed under this schedule (no shorter schedule, whose "
            f"learning rate would decay sooner, was trained).{seeds_said(test)}")  # fmt: skip
    return text, f"centralized fine-tuning needs about {enough} of {total} epochs (test accuracy {test.brief()})"


def on_scheduler(df: pd.DataFrame) -> tuple[str, str]:
    final = runs(df, "centralized_schedulers")
    val = stats(final, ["scheduler"], "val_acc")
    best, ties = best_of(val)
    listed = ", ".join(f"{readable(k)} {v.text()}" for k, v in val.items())
    head = f"Final validation accuracy per learning-rate schedule: {listed}. "
    if "centralized_grid" in set(df["source"]):  # the search the schedules start from (its table is out of print)
        grid = runs(df, "centralized_grid").sort_values("val_acc", ascending=False).iloc[0]
        head = f"The search chose lr {grid['lr']:g} and weight decay {grid['weight_decay']:g} on validation. " + head
    best, others = readable(best), ", ".join(map(readable, ties))
    if ties:
        verdict = (
            f"The {best} schedule ends highest, but no difference is established with {others} (within the spread)."
        )
        short = f"no schedule is established as best ({best} ends highest, within the spread of {others})"
    else:
        verdict = f"The {best} schedule is best, ahead of every other by more than the spread."
        short = f"the {best} schedule is best"
    return head + verdict + seeds_said(*val.values()), short


def on_iid_gap(df: pd.DataFrame) -> tuple[str, str]:
    fed = runs(df, "fedavg_iid")
    central = runs(df, "centralized_final")
    a, b = Stat.of(fed["test_acc"]), Stat.of(central["test_acc"])
    c = fed.iloc[0]
    clients = max(1, round(c["participation"] * c["num_clients"]))
    images = int(c["rounds"]) * clients * int(c["local_steps"]) * int(c["batch_size"])
    size = c.get("synthetic_train_size") if c.get("dataset") == "synthetic" else CIFAR100_TRAIN
    passes = images / (float(size) * (1 - float(c.get("val_fraction", 0.0))))
    schedule = c.get("client_lr_schedule", "constant")
    text = (f"Final test accuracy, {compare('FedAvg on IID shards', a, 'centralized fine-tuning', b)}. This is "
            f"confounded: FedAvg ran {int(c['rounds'])} rounds of {clients} clients x J={int(c['local_steps'])} steps "
            f"of {int(c['batch_size'])} images, about {passes:.1f} passes over the train split, at a {schedule} "
            f"client learning rate {c['lr']:g} fixed a priori, against {int(central['epoch'].max())} epochs of a "
            f"tuned schedule centrally; the gap is not the price of federation alone.{seeds_said(a, b)}")  # fmt: skip
    word = "differs from" if differs(a, b) else "is not established to differ from"
    return text, f"FedAvg on IID shards ({a.brief()}) {word} centralized training ({b.brief()})"


def on_noniid(df: pd.DataFrame) -> tuple[str, str]:
    final = with_setting(runs(df, "fedavg_noniid"))
    cos = final["run_id"].map(round_means(df, "fedavg_noniid", "drift_cos"))
    parts, lower, seeds = [], set(), []
    for j in sorted(final["local_steps"].unique()):
        acc = stats(final[final["local_steps"] == j], ["setting"], "test_acc")
        if "IID" not in acc:
            continue
        seeds += acc.values()
        groups: dict[str, list[str]] = {}
        for s in setting_order(k for k in acc if k != "IID"):
            groups.setdefault(change(acc["IID"], acc[s]), []).append(s)
        lower |= set(groups.get("lower", []))
        cells = "; ".join(f"{w} at " + ", ".join(f"{s} ({acc[s].text()})" for s in c) for w, c in groups.items())
        parts.append(f"J={j}, IID {acc['IID'].text()}: {cells}")
    if not parts:
        raise MissingResults("fedavg_noniid.csv (no IID row)")
    drift = final.assign(cos=cos).groupby("setting")["cos"].mean()
    hard, easy = setting_order(drift.index)[0], setting_order(drift.index)[-1]
    text = (f"Final test accuracy of non-IID shards against IID at the same J: {'. '.join(parts)}. The mean cosine "
            f"between the clients' updates is {drift[hard]:.3f} at {hard} against {drift[easy]:.3f} at {easy}; "
            f"client drift growing as clients hold fewer classes is a plausible cause of any loss, a hypothesis "
            f"these runs do not test, since drift and accuracy change together.{seeds_said(*seeds)}")  # fmt: skip
    worst = ", ".join(setting_order(lower)) or "no Nc"
    return text, f"non-IID shards lower FedAvg's accuracy against IID at {worst}"


def on_local_steps(df: pd.DataFrame) -> tuple[str, str]:
    final = with_setting(runs(df, "fedavg_noniid"))
    js = sorted(final["local_steps"].unique())
    if len(js) < 2:
        raise MissingResults("fedavg_noniid.csv (one J)")
    lo, hi = js[0], js[-1]
    cells, seeds, changed = [], [], []
    for s in setting_order(final["setting"]):
        acc = stats(final[final["setting"] == s], ["local_steps"], "test_acc")
        if lo in acc and hi in acc:
            seeds += [acc[lo], acc[hi]]
            changed += [f"{s} ({change(acc[lo], acc[hi])})"] if differs(acc[hi], acc[lo]) else []
            cells.append(f"{s} {acc[lo].text()} to {acc[hi].text()} ({change(acc[lo], acc[hi])})")
    rounds = final.groupby("local_steps")["rounds"].first()
    text = (f"Raising the local steps from J={lo} to J={hi} at a fixed budget of local steps ({int(rounds[lo])} and "
            f"{int(rounds[hi])} rounds), final test accuracy: {'; '.join(cells)}.{seeds_said(*seeds)}")  # fmt: skip
    where = ", ".join(changed) if changed else "no sharding"
    return text, f"more local steps at the same budget change the accuracy at {where}"  # with its direction


def _editing(final: pd.DataFrame) -> tuple[dict, object]:
    """Test accuracy per sparse cell (sparsity, R) and the cell best on validation: chosen there, reported on test."""
    sparse, keys = final[final["sparsity"].fillna(0) > 0], ["sparsity", "calibration_rounds"]
    val = stats(sparse, keys, "val_acc")
    return stats(sparse, keys, "test_acc"), best_of(val)[0] if val else None


def on_editing_central(df: pd.DataFrame) -> tuple[str, str]:
    final = runs(df, "editing_centralized", experiment="sparse_centralized")
    grid, best = _editing(final)
    dense = Stat.of(final.loc[final["sparsity"] == 0, "test_acc"])
    name = f"sparse s={best[0]:g} R={int(best[1])}"
    rs = sorted({r for _, r in grid})
    effects = []
    for s in sorted({s for s, _ in grid}):
        if (s, rs[0]) in grid and (s, rs[-1]) in grid and rs[0] != rs[-1]:
            a, b = grid[(s, rs[0])], grid[(s, rs[-1])]
            effects.append(f"s={s:g} {a.text()} to {b.text()} ({change(a, b)})")
    ss, r = sorted({s for s, _ in grid}), rs[-1]
    spars = compare(f"s={ss[-1]:g}", grid[(ss[-1], r)], f"s={ss[0]:g}", grid[(ss[0], r)]) if len(ss) > 1 else ""
    against = "the dense control with the step-0 head"
    best_cell = compare(name, grid[best], against, dense) if dense.n else f"{name} {grid[best].text()}"
    text = (f"Centralized sparse fine-tuning, final test accuracy: the cell best on validation, {best_cell}. "
            + (f"Sparsity at R={int(r)}: {spars}. " if spars else "")
            + (f"From R={int(rs[0])} to R={int(rs[-1])}: {'; '.join(effects)}." if effects else "")
            + seeds_said(*grid.values()))  # fmt: skip
    verdict = "no difference established" if not dense.n or not differs(grid[best], dense) else "a difference"
    return text, f"centrally, the sparse run best on validation ({name}) shows {verdict} against the dense control"


def on_editing_federated(df: pd.DataFrame) -> tuple[str, str]:
    final = with_setting(runs(df, "editing_federated", experiment="sparse_fedavg"))
    cells, seeds, wins = [], [], []
    for s in setting_order(final["setting"]):
        mine = final[final["setting"] == s]
        (grid, best), dense = _editing(mine), Stat.of(mine.loc[mine["sparsity"] == 0, "test_acc"])
        if not grid:
            continue
        seeds += [*grid.values(), *([dense] if dense.n else [])]
        name = f"the sparse run best on validation (s={best[0]:g} R={int(best[1])} of {len(grid)})"
        against = compare(name, grid[best], "the dense control", dense) if dense.n else f"{name} {grid[best].text()}"
        wins += [s] if dense.n and differs(grid[best], dense) and grid[best].mean > dense.mean else []
        cells.append(f"{s}: {against}")
    text = f"Federated sparse fine-tuning, final test accuracy: {'; '.join(cells)}.{seeds_said(*seeds)}"
    where = ", ".join(wins) if wins else "no sharding"
    return text, f"in FedAvg, the sparse run best on validation beats the dense control (same step-0 head) at {where}"


def on_mask_rules(df: pd.DataFrame) -> tuple[str, str]:
    final = with_setting(runs(df, "mask_strategies"))
    final = final.assign(cos=final["run_id"].map(round_means(df, "mask_strategies", "drift_cos")))
    sparse = final[final["sparsity"].fillna(0) > 0]
    cells, seeds, aligned = [], [], []
    for s in setting_order(sparse["setting"]):
        mine = sparse[sparse["setting"] == s]
        acc, cos = stats(mine, ["mask_rule"], "test_acc"), stats(mine, ["mask_rule"], "cos")
        seeds += acc.values()
        best, ties = best_of(acc)
        top, cos_ties = best_of(cos)
        rank = f"{readable(best)} {acc[best].text()} ends highest" + (
            f", no difference established with {', '.join(map(readable, ties))}" if ties else ""
        )
        rest = ", ".join(readable(r) for r in sorted(acc, key=lambda r: -acc[r].mean) if r != best)  # numbers: figure
        cells.append(
            f"{s}: {rank} (then {rest}); highest update cosine: {readable(top)} {cos[top].mean:.3f}"
            + (f" (within the spread of {', '.join(map(readable, cos_ties))})" if cos_ties else "")
        )
        aligned += [s] if top == "least_sensitive" and not cos_ties else []
    hypothesis = ("The hypothesis that the least-sensitive rule keeps the clients' updates most aligned holds at "
                  + (", ".join(aligned) if aligned else "no sharding") + ".")  # fmt: skip
    text = f"Mask rules at one sparsity, final test accuracy per rule: {'. '.join(cells)}. {hypothesis}"
    text += seeds_said(*seeds)
    return text, f"the least-sensitive rule aligns the updates best at {', '.join(aligned) or 'no sharding'}"


def on_remedies(df: pd.DataFrame) -> tuple[str, str]:
    final = with_algorithm(with_setting(runs(df, "remedies")))
    final = final.assign(kind=["sparse" if s > 0 else "dense" for s in final["sparsity"].fillna(0)])
    cells, seeds, better = [], [], set()
    for (s, kind), mine in final.groupby(["setting", "kind"], sort=False):
        acc = stats(mine, ["algorithm"], "test_acc")
        if "fedavg" not in acc:
            continue
        seeds += acc.values()
        up = [a for a in algorithm_order(acc) if a != "fedavg" and differs(acc[a], acc["fedavg"])
              and acc[a].mean > acc["fedavg"].mean]  # fmt: skip
        better |= set(up)
        rest = [a for a in algorithm_order(acc) if a not in ("fedavg", *up)]
        above = ", ".join(f"{algorithm_title(a)} {acc[a].text()}" for a in up) or "none"
        within = ", ".join(f"{algorithm_title(a)} {acc[a].text()}" for a in rest)
        cells.append(f"{s} {kind}: FedAvg {acc['fedavg'].text()}; above it beyond the spread: {above}"
                     + (f"; the others: {within}" if rest else ""))  # fmt: skip
    text = f"Remedies at their tuned values, final test accuracy: {'. '.join(cells)}.{seeds_said(*seeds)}"
    names = ", ".join(algorithm_title(a) for a in algorithm_order(better)) or "no remedy"
    return text, f"{names} beat FedAvg beyond the spread in at least one setting"


def on_ties(df: pd.DataFrame) -> tuple[str, str]:
    final = _extension(df)
    cells, seeds, wins = [], [], []
    for (s, kind), mine in final.groupby(["setting", "kind"], sort=False):
        acc = stats(mine, ["merge"], "test_acc")
        if {"mean", "ties"} <= set(acc):
            seeds += [acc["ties"], acc["mean"]]
            wins += [f"{s} {kind}"] if differs(acc["ties"], acc["mean"]) and acc["ties"].mean > acc["mean"].mean else []
            cells.append(f"{s} {kind}: " + compare("TIES", acc["ties"], "the mean", acc["mean"]))
    text = f"TIES-merging against FedAvg's mean inside the round, final test accuracy: {'; '.join(cells)}."
    jobs = []  # does the merge do the mask's job without a mask, and do their gains add?
    for s, mine in final.groupby("setting", sort=False):
        acc = stats(mine, ["kind", "merge"], "test_acc")
        pairs = [(("dense", "ties"), ("sparse", "mean"), "dense TIES", "the sparse mean"),
                 (("sparse", "ties"), ("dense", "ties"), "sparse TIES", "dense TIES")]  # fmt: skip
        found = [(a, acc[x], b, acc[y]) for x, y, a, b in pairs if x in acc and y in acc]
        seeds += [st for f in found for st in (f[1], f[3])]
        jobs += [f"{s}: " + "; ".join(compare(*f) for f in found)] if found else []
    text += (
        f" TIES without a mask against the mask without TIES, then the mask added to TIES: {'. '.join(jobs)}."
        if jobs
        else ""
    )
    return text + seeds_said(*seeds), f"TIES beats FedAvg's mean at {', '.join(wins) or 'no setting'}"


def on_interference(df: pd.DataFrame) -> tuple[str, str]:
    final = _extension(df).dropna(subset=["mean_interference"])
    if final.empty:
        raise MissingResults("extension.csv (no interference)")
    cells, seeds, lowered = [], [], []
    for s, mine in final.groupby("setting", sort=False):
        by = stats(mine, ["kind", "merge"], "mean_interference")
        pairs = [(("sparse", "mean"), ("dense", "mean"), "sparse", "dense"),
                 (("dense", "ties"), ("dense", "mean"), "dense TIES", "the mean")]  # fmt: skip
        mine_ = [(name_a, by[a], name_b, by[b]) for a, b, name_a, name_b in pairs if a in by and b in by]
        for name_a, a, _, b in mine_:
            seeds += [a, b]
            lowered += (
                [f"{name_a.replace('sparse', 'sparse editing')} at {s}"] if differs(a, b) and a.mean < b.mean else []
            )
        cells += [f"{s}: " + "; ".join(compare(*m) for m in mine_)] if mine_ else []
    text = f"Interference, mean over rounds (hypothesis: sparse editing and TIES each lower it): {'. '.join(cells)}."
    lowered_by = ", ".join(lowered) or "neither sparse editing nor TIES"
    return text + seeds_said(*seeds), f"interference is lowered by {lowered_by}"


def _extension(df: pd.DataFrame) -> pd.DataFrame:
    final = with_setting(last_rows(extension_rows(select(df, "extension"))))
    return final.assign(kind=["sparse" if s > 0 else "dense" for s in final["sparsity"].fillna(0)])


def on_scaling(df: pd.DataFrame) -> tuple[str, str]:
    scaling = extension_rows(select(df, "extension_scaling", ("alpha", "chosen")))
    chosen, own = scaling[scaling["chosen"].astype(bool)], pd.Series(dtype=float)
    if "extension" in set(df["source"]):  # the runs' own final test accuracy: alpha 1
        own = last_rows(select(df, "extension")).set_index("run_id")["test_acc"]
    cells, seeds, helped = [], [], []
    for variant, mine in chosen.groupby("variant", sort=False):
        scaled = Stat.of(mine["test_acc"])
        seeds.append(scaled)
        cell = f"{variant}: alpha {', '.join(f'{a:g}' for a in dict.fromkeys(mine['alpha']))}, "  # each value once
        if mine["run_id"].isin(own.index).all():
            base = Stat.of(own[mine["run_id"]])
            helped += [variant] if differs(scaled, base) and scaled.mean > base.mean else []
            cell += compare("test", scaled, "unscaled", base)
        else:
            cell += f"test {scaled.text()}"
        cells.append(cell)
    text = f"Post-hoc scaling w0 + alpha (wT - w0), alpha chosen on validation, test accuracy: {'; '.join(cells)}."
    return text + seeds_said(*seeds), f"post-hoc scaling helps {', '.join(helped) or 'no variant'} beyond the spread"


# name -> (what ran, the function); the name is the macro's (\finding<Name>, \finding<Name>Short)
FINDINGS: dict[str, tuple[str, Callable[[pd.DataFrame], tuple[str, str]]]] = {
    "Epochs": ("The final centralized runs", on_epochs),
    "Scheduler": ("The scheduler comparison", on_scheduler),
    "IidGap": ("FedAvg on IID shards or the centralized baseline", on_iid_gap),
    "NonIid": ("The FedAvg grid over Nc and J", on_noniid),
    "LocalSteps": ("The FedAvg grid over J", on_local_steps),
    "EditingCentral": ("Centralized sparse fine-tuning", on_editing_central),
    "EditingFederated": ("Federated sparse fine-tuning", on_editing_federated),
    "MaskRules": ("The mask-rule comparison", on_mask_rules),
    "Remedies": ("The remedies comparison", on_remedies),
    "Ties": ("The TIES-merging comparison", on_ties),
    "Interference": ("The interference measurement", on_interference),
    "Scaling": ("Post-hoc task-vector scaling", on_scaling),
}


def findings(df: pd.DataFrame, profile: str) -> list[Finding]:
    """Every finding of FINDINGS from the results `df` of `profile` (a 'not run' sentence where its CSV is absent)."""
    out = []
    for name, (what, make) in FINDINGS.items():
        try:
            text, short = make(df)
        except MissingResults as exc:  # its results file is absent (or lacks the columns it needs)
            text = f"{what}: not run for this profile (results/{profile}/{exc.args[0]} is absent)."
            short = f"{what[0].lower()}{what[1:]}: not run"
        except (KeyError, ValueError, IndexError) as exc:  # partial results: say so rather than guess
            text = f"{what}: its results in results/{profile}/ are incomplete ({exc!r}); no finding is drawn, not run."
            short = f"{what[0].lower()}{what[1:]}: incomplete, not run"
        prefix = SMOKE if profile == "smoke" else ""
        out.append(Finding(name, prefix + text, short))
    return out


def to_latex(text: str) -> str:
    """Plain text as LaTeX: special characters escaped, then ± and Nc=, J=, R=, s= as math."""
    tex = latex_escape(text).replace("±", r"$\pm$")
    return re.sub(r"\b(Nc|J|R|s)=(\d+(?:\.\d+)?)", lambda m: f"${'N_c' if m[1] == 'Nc' else m[1]}={m[2]}$", tex)


def findings_latex(found: list[Finding], profile: str) -> str:
    """The macros file: \\finding<Name> (full text) and \\finding<Name>Short per finding, \\findingNote (smoke: what
    its numbers are), and \\finding{<Name>}."""
    note = to_latex(SMOKE_NOTE) + " " if profile == "smoke" else ""  # a space: the macro ends a sentence
    lines = ["% generated by helpers/reporting/findings.py from results/<profile>/: do not edit",
             rf"\newcommand{{\findingNote}}{{{note}}}",
             r"\newcommand{\finding}[1]{\ifcsname finding#1\endcsname\csname finding#1\endcsname"
             r"\else\textbf{finding #1 not generated}\fi}"]  # fmt: skip
    for f in found:
        lines.append(rf"\newcommand{{\finding{f.name}}}{{{to_latex(f.text)}}}")
        lines.append(rf"\newcommand{{\finding{f.name}Short}}{{{to_latex(f.short)}}}")
    return "\n".join(lines) + "\n"


def write_findings(df: pd.DataFrame, profile: str, root: str | Path | None = None) -> Path:
    """report/generated/<profile>/findings.tex from the results `df`."""
    path = tables_dir(profile, root) / "findings.tex"
    path.write_text(findings_latex(findings(df, profile), profile))
    return path
