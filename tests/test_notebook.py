"""The first hour: notebook parameters checked by name and value, non-study results kept apart, resume lines."""

import json
import re
from pathlib import Path

import pandas as pd
import papermill
import pytest

from helpers.config.experiments import (
    EXPERIMENTS,
    algorithm_params,
    experiment_parameters,
    make_config,
    parameters,
    profile_defaults,
)
from helpers.federated.rounds import run_fedavg
from helpers.ops.notebook import assigned_names, check_parameters, declared_parameters, plan_progress
from helpers.ops.pipeline import check_pipeline_parameters, notebook_paths
from helpers.reporting.results import write_results
from helpers.training.runs import checkpoint_files

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = [p.stem for p in notebook_paths()]


def tiny_fedavg(**kw) -> dict:
    small = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, num_clients=10, rounds=2)
    return make_config("fedavg", "smoke", device="cpu", **{**small, **kw})


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_notebook_checks_its_parameters_right_after_the_parameters_cell(notebook):
    import nbformat

    cells = [c for c in nbformat.read(REPO / "notebooks" / f"{notebook}.ipynb", 4).cells if c.cell_type == "code"]
    i = next(k for k, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    assert f'check_parameters(globals(), "{notebook}")' in cells[i + 1].source
    defaults = declared_parameters(notebook)
    assert set(defaults) <= assigned_names(notebook)
    params = check_parameters(dict(defaults), notebook)  # the shipped defaults pass and are the study
    assert params.changed == {} and not params.replace_study


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_an_undeclared_parameter_names_the_closest_declared_one(notebook):
    defaults = declared_parameters(notebook)
    for declared in defaults:
        typo = declared[:-1]  # ROUND for ROUNDS, SEED for SEEDS, ...
        if typo in defaults or typo in assigned_names(notebook) or len(typo) < 3:
            continue
        with pytest.raises(ValueError, match=f"parameter {typo} is not declared.*did you mean {declared}\\?"):
            check_parameters({**defaults, typo: 1}, notebook)
    lower = next(iter(defaults)).lower()  # `-p profile smoke` is not PROFILE either
    with pytest.raises(ValueError, match=f"parameter {lower} is not declared"):
        check_parameters({**defaults, lower: "smoke"}, notebook)


def test_every_notebook_parameter_with_a_config_key_is_validated_under_its_own_name():
    cases = {
        "02_fedavg_iid": ("ROUNDS", 0, "rounds"),
        "03_fedavg_noniid": ("NC_LIST", "[0, 5]", "classes_per_client"),
        "04_model_editing": ("SPARSITIES", [0.9, 1.0], "sparsity"),
        "06_mask_strategies": ("RULES", ["best"], "mask_rule"),
        "01_centralized": ("GRID_LR", [-0.1], "lr"),
        "05_federated_editing": ("MASK_SCOPE", "both", "mask_scope"),
        "07_report_figures": ("PROFILE", "ful", "profile"),
    }
    for notebook, (name, value, key) in cases.items():
        defaults = declared_parameters(notebook)
        with pytest.raises(ValueError) as err:
            check_parameters({**defaults, name: value}, notebook)
        message = str(err.value)
        assert message.startswith(f"{name}={value!r} is invalid: must") and message.endswith(f"(config key {key})")
        assert parameters()[key].allowed() in message
    with pytest.raises(ValueError, match="INCLUDE_IID='yes' is invalid: must be True or False"):
        check_parameters({**declared_parameters("03_fedavg_noniid"), "INCLUDE_IID": "yes"}, "03_fedavg_noniid")


def test_non_default_parameters_keep_their_own_results_and_replacing_the_study_is_said(tmp_path, capsys):
    defaults = declared_parameters("02_fedavg_iid")
    runs = [run_fedavg(tiny_fedavg(), run_root=tmp_path / "runs", progress=False)]
    study = write_results(runs, check_parameters(dict(defaults), "02_fedavg_iid").results_name("fedavg_iid", runs),
                          root=tmp_path)  # fmt: skip
    assert study == tmp_path / "smoke" / "fedavg_iid.csv"
    before = study.read_bytes()
    # PROFILE and RUN_ROOT place things; papermill's text lists equal to the default are the study too
    same = check_parameters({**defaults, "PROFILE": "smoke", "RUN_ROOT": "/x", "SEEDS": "[0]"}, "02_fedavg_iid")
    assert same.changed == {}
    other = [run_fedavg(tiny_fedavg(rounds=3), run_root=tmp_path / "runs", progress=False)]
    custom = check_parameters({**defaults, "ROUNDS": 3}, "02_fedavg_iid")
    assert custom.changed == {"ROUNDS": 3}
    capsys.readouterr()
    path = write_results(other, custom.results_name("fedavg_iid", other), root=tmp_path)
    assert "ROUNDS=3" in capsys.readouterr().out
    assert path.parent == tmp_path / "smoke" / "custom" and path.name.startswith("fedavg_iid-")
    assert study.read_bytes() == before, "the study's CSV was replaced by a run of non-default parameters"
    assert set(pd.read_csv(path)["run_id"]) == {other[0].id}
    assert sorted(p.name for p in (tmp_path / "smoke").glob("*.csv")) == ["fedavg_iid.csv"]  # what 07 reads
    replace = check_parameters({**defaults, "ROUNDS": 3, "REPLACE_STUDY": True}, "02_fedavg_iid")
    assert write_results(other, replace.results_name("fedavg_iid", other), root=tmp_path) == study
    assert "REPLACE_STUDY=True" in capsys.readouterr().out and set(pd.read_csv(study)["run_id"]) == {other[0].id}


def test_resume_and_skip_lines_and_the_notebook_count(tmp_path, capsys):
    root = tmp_path / "runs"
    done, fresh = tiny_fedavg(), tiny_fedavg(seed=1)
    plan = [("fedavg", done), ("fedavg", fresh)]
    assert plan_progress(plan, root).startswith("0 of 2 runs of this notebook already done")
    run = run_fedavg(done, run_root=root, progress=False)
    out = capsys.readouterr().out
    assert f"[start] fedavg {run.id} (K=10 C=0.1 J=4 iid, lr=0.05, seed 0): 2 rounds" in out
    assert plan_progress(plan, root) == (
        "1 of 2 runs of this notebook already done (skipped), 0 resume from a checkpoint, 1 start fresh"
    )
    run_fedavg(done, run_root=root, progress=False)
    assert capsys.readouterr().out.strip() == f"[skip] fedavg {run.id} (K=10 C=0.1 J=4 iid, lr=0.05, seed 0): done"
    # interrupted after round 1: the previous checkpoint is the newest, no done marker
    (run.dir / "done.json").unlink()
    checkpoint_files(run.dir)[0].unlink()
    assert "1 resumes from a checkpoint" in plan_progress(plan, root)
    run_fedavg(done, run_root=root, progress=False)
    assert (
        f"[resume] fedavg {run.id} (K=10 C=0.1 J=4 iid, lr=0.05, seed 0): from round 1 of 2" in capsys.readouterr().out
    )


def test_pipeline_refuses_a_parameter_a_selected_notebook_does_not_declare():
    paths = notebook_paths(["02", "03"])
    check_pipeline_parameters({"NUM_CLIENTS": 100}, paths)  # both declare it (and their plans hold with it)
    with pytest.raises(ValueError, match="classes_per_client=1 with num_clients=50 is invalid"):
        check_pipeline_parameters({"NUM_CLIENTS": 50}, paths)  # 03's Nc=1 needs 100 clients: refused before 02 runs
    with pytest.raises(
        ValueError, match="ROUNDS is not declared by notebook 03_fedavg_noniid: its parameters are PROFILE"
    ):
        check_pipeline_parameters({"ROUNDS": 3}, paths)


def test_papermill_stops_at_a_misspelt_parameter(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="parameter ROUND is not declared.*did you mean ROUNDS"):
        papermill.execute_notebook(
            str(REPO / "notebooks" / "02_fedavg_iid.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"ROUND": 3}, cwd=str(REPO / "notebooks"), progress_bar=False,
        )  # fmt: skip


def test_every_schema_parameter_is_in_the_help_of_its_commands(capsys):
    """`run --help` and `flower --help` explain every parameter from the schema: its meaning, type, defaults (each
    algorithm's own, for an algorithm's parameter) and allowed values; and end with examples."""
    from helpers.ops.cli import main

    params, owners = parameters(), algorithm_params()
    for argv, experiments in ((["run"], list(EXPERIMENTS)), (["flower"], ["fedavg", "sparse_fedavg"])):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        block = out[out.index("parameters (--set NAME=VALUE)") : out.index("\n\ncalibration_samples")].splitlines()[1:]
        entries = {line.split()[0]: (line, block[i + 1]) for i, line in enumerate(block) if not line.startswith("    ")}
        wanted = {n for e in experiments for n in experiment_parameters(e)}
        assert set(entries) == wanted
        for name in wanted:
            line, detail = entries[name]
            assert params[name].meaning and params[name].meaning in line and f"({params[name].kind.__name__})" in line
            assert params[name].allowed() in detail, detail
            by_algorithm = [f"{a} {own[name].default:g}" if isinstance(own[name].default, float) else
                            f"{a} {own[name].default}" for a, own in owners.items() if name in own]  # fmt: skip
            if by_algorithm:
                assert all(d in detail for d in by_algorithm), detail
            elif name not in ("profile", "calibration_samples", "eval_every"):  # derived or set by an option
                experiment = next(e for e in experiments if name in experiment_parameters(e))
                assert str(profile_defaults(experiment, "smoke")[name]).split(".0")[0] in detail, detail
        assert "\nexamples:\n  python -m helpers run " in out
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    out = capsys.readouterr().out
    for notebook in NOTEBOOKS:
        assert all(f"{name}=" in out for name in declared_parameters(notebook))


def test_executing_02_with_other_rounds_leaves_the_study_csv_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("FLME_RESULTS_ROOT", str(tmp_path / "results"))
    study = tmp_path / "results" / "smoke" / "fedavg_iid.csv"
    study.parent.mkdir(parents=True)
    study.write_text("run_id,round\nstudy,1\n")  # stands for the study's rows that 07 reads
    papermill.execute_notebook(
        str(REPO / "notebooks" / "02_fedavg_iid.ipynb"), str(tmp_path / "out.ipynb"),
        parameters={"ROUNDS": 1, "NUM_CLIENTS": 10, "RUN_ROOT": str(tmp_path / "runs")},
        cwd=str(REPO / "notebooks"), progress_bar=False,
    )  # fmt: skip
    assert study.read_text() == "run_id,round\nstudy,1\n"
    (custom,) = (tmp_path / "results" / "smoke" / "custom").glob("fedavg_iid-*.csv")
    rows = pd.read_csv(custom)
    assert set(rows["rounds"]) == {1} and set(rows["num_clients"]) == {10}


def test_cli_results_says_when_it_replaces_a_file(tmp_path, capsys, monkeypatch):
    from helpers.ops.cli import main

    monkeypatch.setenv("FLME_RESULTS_ROOT", str(tmp_path / "results"))
    argv = ["run", "centralized", "--run-root", str(tmp_path / "runs"), "--results", "demo",
            "--set", "synthetic_train_size=400", "--set", "epochs=1", "--set", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "replaced" not in capsys.readouterr().err
    assert main([*argv, "--set", "lr=0.2"]) == 0
    assert "demo.csv (replaced: it now holds this run's rows only)" in capsys.readouterr().err


def test_cli_run_shows_a_line_per_epoch_off_a_terminal_and_nothing_with_quiet(tmp_path, capsys):
    from helpers.ops.cli import main

    argv = ["run", "centralized", "--run-root", str(tmp_path / "runs"), "--set", "synthetic_train_size=400",
            "--set", "epochs=2", "--set", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    epochs = re.findall(r"(?m)^\[epoch (\d)/2\] centralized \w+: train_loss=\S+ val_acc=\S+ .*\(\d+\.\d s\)$", err)
    assert epochs == ["1", "2"], err  # stderr is no terminal here: lines, not a bar
    assert out.startswith("[start] centralized ") and json.loads(out.splitlines()[-1])["epoch"] == 2
    for extra in ([], ["--set", "lr=0.2"]):  # done (skipped), then a new run: the JSON line alone either way
        assert main([*argv, *extra, "--quiet"]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 1 and json.loads(out)["epoch"] == 2 and "[epoch" not in err, (out, err)


@pytest.mark.parametrize(
    "name, says",
    [
        ("/tmp/elsewhere", "must name a file under results/smoke/"),
        ("../../x", "without an absolute path or '..'"),
        ("custom/../../x", "'..'"),
        ("", "must name a file"),
        ("linked/x", "outside"),
        ("dangling", "outside"),
    ],
)
def test_cli_results_names_a_file_under_results_of_the_profile_only(name, says, tmp_path, capsys, monkeypatch):
    from helpers.ops.cli import main

    results = tmp_path / "results" / "smoke"
    (results / "custom").mkdir(parents=True)
    (results / "linked").symlink_to(tmp_path, target_is_directory=True)  # a folder link leading out
    (results / "dangling.csv").symlink_to(tmp_path / "outside.csv")  # a file link to a file not there yet
    monkeypatch.setenv("FLME_RESULTS_ROOT", str(tmp_path / "results"))
    argv = ["run", "centralized", "--run-root", str(tmp_path / "runs"), "--set", "epochs=1", "--results", name]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --results {name!r} is invalid") and says in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outside.csv").exists()  # before any run folder


def test_cli_results_may_name_a_subfolder(tmp_path, capsys, monkeypatch):
    from helpers.ops.cli import main

    monkeypatch.setenv("FLME_RESULTS_ROOT", str(tmp_path / "results"))
    argv = ["run", "centralized", "--run-root", str(tmp_path / "runs"), "--results", "mine/demo",
            "--set", "synthetic_train_size=400", "--set", "epochs=1", "--set", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    assert len(pd.read_csv(tmp_path / "results" / "smoke" / "mine" / "demo.csv")) == 1
