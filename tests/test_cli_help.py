"""What a newcomer meets at the command line: every entry point listed by `python -m helpers --help`, a help text
for every option of every command, `credentials --help` without Flower's extras, and one error style (one line that
names the parameter, exit 2)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.ops.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
# `python -m helpers.X`: every module of the package's top level that runs as a command (other than __main__)
ENTRY_POINTS = sorted(p.stem for p in (REPO / "helpers").glob("*.py")
                      if p.stem != "__main__" and 'if __name__ == "__main__"' in p.read_text())  # fmt: skip


def entry_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `python -m helpers.<module>` builds, caught as it parses (nothing runs)."""
    caught = []

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught):
        importlib.import_module(f"helpers.{module}").main([])
    monkeypatch.undo()
    return caught[0]


def options_without_help(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """'command option' for every argument (positional ones too) and subcommand that has no help text."""
    missing = []
    for action in parser._actions:  # argparse keeps a parser's arguments only here
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            missing += [f"{command} {sub}" for sub in action.choices if sub not in helped]
            for sub, subparser in action.choices.items():
                missing += options_without_help(subparser, f"{command} {sub}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{command} {name}")
    return missing


def test_the_entry_points_are_the_ones_helpers_help_lists(capsys):
    assert {"cost", "report", "bench", "gpucheck", "credentials"} <= set(ENTRY_POINTS)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for module in ENTRY_POINTS:  # each with what it does, after its name
        assert re.search(rf"(?m)^  python -m helpers\.{module} +\S", out), module


def test_every_option_of_every_command_has_a_help_text(monkeypatch):
    missing = options_without_help(build_parser(), "python -m helpers")
    for module in ENTRY_POINTS:
        missing += options_without_help(entry_parser(module, monkeypatch), f"python -m helpers.{module}")
    assert not missing, f"options without a help text: {missing}"


def test_the_help_check_catches_an_option_without_help():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fine", help="explained")
    parser.add_argument("--bare")
    sub = parser.add_subparsers()
    sub.add_parser("go", help="explained").add_argument("target")
    sub.add_parser("quiet")
    assert options_without_help(parser, "x") == ["x --bare", "x quiet", "x go target"]


# Imports of these packages fail in the child, as if Flower's extras were not installed.
BLOCKER = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flwr", "cryptography"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

sys.meta_path.insert(0, NotInstalled())
"""


def test_credentials_help_works_without_flower_and_says_what_to_install(tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)  # loaded by the child at start, before helpers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    check = [sys.executable, "-c", "import flwr"]
    assert "hidden by the test" in subprocess.run(check, env=env, capture_output=True, text=True).stderr
    done = subprocess.run([sys.executable, "-m", "helpers.credentials", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m helpers.credentials"), done.stderr
    assert "pip install -r requirements-flower.txt" in " ".join(done.stdout.split())


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["pipeline", "--notebooks", "04", "-p", "SPARSITIES", "[1.5]"],
         "SPARSITIES=[1.5] is invalid: must be a number in [0, 1) (config key sparsity)"),
        (["pipeline", "-p", "SPARSITIES", "[1.5]"], "parameter SPARSITIES is not declared by notebook 01_centralized"),
        (["pipeline", "--notebooks", "02", "-p", "ROUND", "3"], "did you mean ROUNDS?"),
        (["pipeline", "--notebooks", "99"], "notebooks=['99'] matches no notebook"),
        (["run", "fedavg", "--set", "rond=3"], "unknown parameter 'rond' for experiment 'fedavg' (did you mean "
         "rounds?)"),
        (["run", "fedavg", "--set", "rounds=three"], "rounds='three' is invalid: must be an integer >= 1"),
        (["run", "fedavg", "--set", "rounds"], "--set 'rounds' is invalid: must look like name=value"),
        (["flower", "--set", "local_step=2"], "(did you mean local_steps?)"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_the_parameter_and_exit_2(argv: list[str], says: str, capsys, tmp_path):
    assert main([*argv, *(["--run-root", str(tmp_path)] if argv[0] != "pipeline" else [])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and says in err, err
    assert not list(tmp_path.iterdir())  # refused before any run folder


def test_the_command_itself_exits_2_with_one_line():
    """The whole process, as `make` or a shell sees it: no traceback, exit status 2."""
    done = subprocess.run([sys.executable, "-m", "helpers", "pipeline", "--notebooks", "04", "-p", "SPARSITIES",
                           "[1.5]"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == ["error: SPARSITIES=[1.5] is invalid: must be a number in [0, 1) "
                                        "(config key sparsity)"]  # fmt: skip


def test_papermill_shows_a_bad_parameter_as_one_line_not_a_traceback(tmp_path: Path):
    """A plain papermill call: the failed cell's error output is the message alone (IPython's custom traceback)."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as failed:
        papermill.execute_notebook(str(REPO / "notebooks" / "02_fedavg_iid.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"ROUNDS": 0}, cwd=str(REPO / "notebooks"), progress_bar=False,
                                   kernel_name="python3")  # fmt: skip
    message = "ROUNDS=0 is invalid: must be an integer >= 1 (config key rounds)"
    assert failed.value.evalue == message
    assert failed.value.traceback == [f"ParameterError: {message}"]


def test_close_names_are_suggested_for_a_misspelt_set():
    from helpers.config.parsing import close_names

    assert close_names("rond", ["rounds", "lr", "seed"]) == " (did you mean rounds?)"
    assert close_names("xyz", ["rounds", "lr"]) == ""
    assert close_names("sparsty", ["sparsity", "seed"]) == " (did you mean sparsity?)"
