"""The report's settings: setup.csv agrees with the configs and the notebooks' plans, main.tex quotes every setting
through a generated macro (never a literal), and the macros, the setup table and the seed counts read right."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from helpers.config.experiments import make_config, train_split_size
from helpers.ops.notebook import declared_parameters
from helpers.ops.setup import HOWS, setup_rows, write_setup
from helpers.reporting.setup import seed_counts, seeds_text, setup_macros, setup_table, tex_value
from helpers.reporting.summaries import load_results

REPO = Path(__file__).resolve().parent.parent
# Numbers the prose may state as written: names (ViT-S/16, CIFAR-100, 8-bit images, step 0, notebooks 01-07), not
# settings. Inside math, 0, 1 and 2 are the formulas' own constants (max(1, .), eta_s = 1, a square).
NAMES = (r"ViT-S/16", r"CIFAR-100", r"8-bit", r"[Ss]tep[~ -]0", r"\(0\d(?:(?:, |--)0\d)*\)")
MATH_CONSTANTS = {"0", "1", "2"}


@pytest.fixture
def full(monkeypatch) -> pd.DataFrame:
    monkeypatch.delenv("FLME_PROFILE", raising=False)  # the test runner's smoke profile would win over `full`
    return setup_rows("full").set_index("key")


def prose(tex: str) -> str:
    """main.tex's body as a reader sees it: no comments, no preamble or bibliography, no macro arguments that are
    names (labels, references, citations, files, settings' keys)."""
    body = tex[tex.index(r"\begin{document}") : tex.index(r"\label{body-end}")]
    body = re.sub(r"(?m)(?<!\\)%.*$", "", body)
    return re.sub(r"\\(?:label|ref|citep?|citet|cfg|seeds|reportfig|reporttable|input|texttt)\{[^}]*\}", "", body)


def numeric_literals(tex: str) -> list[str]:
    """The numbers main.tex's prose states itself (outside the allowed names and the formulas' constants)."""
    text = prose(tex)
    for name in NAMES:
        text = re.sub(name, "", text)
    found = []
    for i, part in enumerate(re.split(r"(?<!\\)\$", text)):  # odd parts are inline math
        numbers = re.findall(r"(?<![A-Za-z_^])\d+(?:[.,]\d+)*", part)
        found += [n for n in numbers if not (i % 2 and n in MATH_CONSTANTS)]
    return found


def test_main_tex_states_no_setting_as_a_literal():
    tex = (REPO / "report" / "main.tex").read_text()
    assert numeric_literals(tex) == []


def test_the_literal_check_catches_a_number_in_the_text_and_in_math():
    tex = (REPO / "report" / "main.tex").read_text()
    for literal in ("with 100 clients", "$K=100$", "a learning rate of 0.01", "over 3 seeds"):
        changed = tex.replace(r"\section{Experiments}", r"\section{Experiments}" + literal, 1)
        assert numeric_literals(changed), literal


def test_every_setting_main_tex_quotes_is_generated_for_every_profile(monkeypatch):
    keys = set(re.findall(r"\\cfg\{(\w+)\}", prose_with_cfg()))
    assert keys, "main.tex quotes no setting"
    monkeypatch.delenv("FLME_PROFILE", raising=False)
    for profile in ("full", "smoke"):
        assert keys <= set(setup_rows(profile)["key"]), (profile, keys - set(setup_rows(profile)["key"]))


def prose_with_cfg() -> str:
    tex = (REPO / "report" / "main.tex").read_text()
    return re.sub(r"(?m)(?<!\\)%.*$", "", tex[tex.index(r"\begin{document}") :])


def test_the_settings_agree_with_the_configs_and_the_plans(full):
    fed = make_config("fedavg", "full")
    nb2, nb3, nb5 = (declared_parameters(n) for n in ("02_fedavg_iid", "03_fedavg_noniid", "05_federated_editing"))
    value = full["value"]
    assert value["NumClients"] == str(fed["num_clients"]) == str(nb2["NUM_CLIENTS"]) == "100"
    assert value["Participation"] == f"{fed['participation']:g}" == "0.1"
    assert value["ClientsPerRound"] == "10"
    assert value["ClientLr"] == f"{fed['lr']:g}" and value["Rounds"] == str(fed["rounds"])
    assert value["Batch"] == str(fed["batch_size"]) and value["ImgSize"] == str(fed["img_size"])
    assert value["EvalEvery"] == str(fed["eval_every"])
    assert value["NcList"] == ", ".join(map(str, nb3["NC_LIST"]))
    budget = fed["rounds"] * nb2["LOCAL_STEPS"]
    assert value["RoundsPerJ"] == ", ".join(str(math.ceil(budget / j)) for j in nb3["J_LIST"])
    assert value["GridSeeds"] == str(len(nb3["SEEDS"]))
    assert value["HardestNc"] == str(nb3["HARDEST_NC"])
    edit = make_config("sparse_fedavg", "full")
    assert value["FedCalSamples"] == str(math.ceil(make_config("sparse_centralized", "full")["calibration_samples"] /
                                                   edit["num_clients"]))  # fmt: skip
    per_round = 10 * nb5["LOCAL_STEPS"] * edit["batch_size"]  # step 0's FedAvg on the head: step0_epochs passes
    assert value["StepZeroRounds"] == str(math.ceil(edit["step0_epochs"] * train_split_size(edit) / per_round))
    samples = fed["rounds"] * 10 * fed["local_steps"] * fed["batch_size"]
    assert value["FedPasses"] == f"{samples / train_split_size(fed):.1f}"
    assert value["GridMomentum"] == "0.9"  # one value: momentum is not searched (the text must not claim it)
    assert set(full["how"]) <= set(HOWS)
    assert set(full.index[full["how"] == "tuned"]) >= {"GridLr", "GridWeightDecay", "Schedulers", "GridTIES"}
    assert "GridMomentum" not in set(full.index[full["how"] == "tuned"])


def test_the_seed_counts_are_those_the_plans_run(full, tmp_path: Path):
    """Counted on the plans' own configs (an empty run root: nothing done), not through the code that writes them."""
    from helpers.ops.plans import notebook_plan

    def seeds(notebook: str, group: str, **match) -> str:
        configs = notebook_plan(notebook, "full", tmp_path)[group]
        cells: dict[tuple, set] = {}  # (R, algorithm) -> its seeds
        for c in configs:
            if all(c.get(k) == v for k, v in match.items()):
                cells.setdefault((c.get("calibration_rounds"), c.get("algorithm")), set()).add(c["seed"])
        return ", ".join(str(n) for n in sorted({len(s) for s in cells.values()}))

    value = full["value"]
    assert value["IidSeeds"] == seeds("02_fedavg_iid", "runs") == "3"
    hardest = int(value["HardestNc"])
    assert value["KeySeeds"] == seeds("03_fedavg_noniid", "grid", classes_per_client=hardest, local_steps=8) == "3"
    assert value["GridSeeds"] == seeds("03_fedavg_noniid", "grid", classes_per_client=10, local_steps=8)
    assert value["RulesSeeds"] == seeds("06_mask_strategies", "grid", mask_rule="random", sharding="iid")
    assert value["RemedySeeds"] == seeds("05_federated_editing", "extension", sharding="noniid")
    assert value["FedEditSeeds"] == seeds("05_federated_editing", "grid", sparsity=0.9, sharding="iid")
    assert setup_rows("full").set_index("key")["how"]["RemedyCalRounds"] == "tuned"  # R: best of 05's grid


def test_write_setup_is_deterministic_and_not_a_results_file(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FLME_PROFILE", raising=False)
    path = write_setup("full", tmp_path)
    first = path.read_bytes()
    assert write_setup("full", tmp_path).read_bytes() == first and path == tmp_path / "full" / "setup.csv"
    assert load_results("full", tmp_path).empty  # settings, not runs: the report finds no results here


def test_macros_and_table_read_right(full):
    table = full.reset_index()
    macros = setup_macros(table)
    assert r"\expandafter\def\csname cfg@NumClients\endcsname{100}" in macros
    assert tex_value("5e-05") == r"\ensuremath{5\times 10^{-5}}" and tex_value("45,000") == "45,000"
    assert tex_value("cosine, warmup_cosine") == "cosine, warm-up + cosine"
    text = setup_table(table)
    assert "warmup_cosine" not in text and "fedadam" not in text and "FedAdam, FedYogi: beta1 = 0.9" in text
    assert r"\label{tab:setup}" in text and "not generated" in setup_table(None)
    with pytest.raises(ValueError, match="key="):
        setup_macros(table.assign(key="Num1"))


def test_seed_counts_per_configuration():
    rows = pd.DataFrame({
        "source": ["a"] * 4 + ["b"] * 2, "run_id": ["r1", "r2", "r3", "r4", "r5", "r6"],
        "experiment": ["fedavg"] * 6, "seed": [0, 1, 2, 0, 0, 0], "lr": [0.1, 0.1, 0.1, 0.2, 0.1, 0.2],
    })  # fmt: skip
    counts = seed_counts(rows)
    assert counts == {"a": [1, 3], "b": [1]}
    assert [seeds_text(c) for c in counts.values()] == ["1--3 seeds", "1 seed"] and seeds_text([3]) == "3 seeds"


def test_tables_name_methods_schedules_and_parameters_readably(tmp_path: Path):
    from test_report import write_fixture  # the smoke-like results of the report tests

    from helpers.reporting import report

    root = write_fixture(tmp_path / "results")
    paths = report.write_report_inputs("smoke", root, tmp_path / "figures", tmp_path / "generated")
    text = "\n".join(p.read_text() for p in paths if p.suffix == ".tex" and p.name != "settings.tex")
    raw = re.findall(r"\b(?:fedavgm?|fedprox|scaffold|fedadam|fedyogi|fedadagrad|warmup\\?_cosine|server\\?_lr|"
                     r"prox\\?_mu|merge\\?_density)\b", text)  # fmt: skip
    assert raw == [], sorted(set(raw))
    assert "seed" in text.split(r"\label{tab:remedies}")[0].rsplit(r"\caption", 1)[-1]  # its caption counts seeds


def test_the_communication_figure_counts_step_0_and_calibration_uploads():
    from helpers.reporting import report

    rows = pd.DataFrame({
        "source": "editing_federated", "run_id": "r", "experiment": "sparse_fedavg", "profile": "smoke",
        "sharding": "iid", "classes_per_client": float("nan"), "sparsity": 0.9, "calibration_rounds": 1, "seed": 0,
        "round": [1, 2, 3], "upload_bytes": 1e6, "val_acc": [0.1, 0.2, 0.3],
        "step0_upload_bytes": 5e6, "calibration_upload_bytes": 2e6,
    })  # fmt: skip
    fig = report.make_figure(rows, "communication", strict=True)
    xs = sorted({round(float(x), 6) for ax in fig.axes for line in ax.lines for x in line.get_xdata()})
    assert xs[:3] == [8.0, 9.0, 10.0]  # MB: step 0 (5) + calibration (2) + each round's upload (1)
