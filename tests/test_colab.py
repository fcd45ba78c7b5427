"""The notebooks' bootstrap cell and helpers.core.colab, run as on a fresh Colab runtime (fake google.colab, fake
subprocess, /content moved to a temporary folder) and as locally (papermill, nbval): what is cloned, installed,
put on sys.path, and the errors."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from helpers.core.colab import use_repository

REPO = Path(__file__).resolve().parent.parent
PLACEHOLDER = "https://github.com/your-team/fl-model-editing.git"


def first_cells() -> dict[str, str]:
    cells = {}
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        cells[path.name] = code[0].source
    return cells


def test_every_notebook_starts_with_the_same_short_bootstrap():
    cells = first_cells()
    assert len(cells) == 7 and len(set(cells.values())) == 1, "the first code cells differ"
    source = next(iter(cells.values()))
    assert len(source.splitlines()) <= 20 and "from helpers.core.colab import use_repository" in source


class FakeColab:
    """google.colab with a recording drive.mount, and a subprocess.run that records commands; `git clone` makes
    a folder that looks like the repository."""

    def __init__(self, monkeypatch, tmp_path: Path):
        self.mounts, self.commands, self.content = [], [], tmp_path / "content"
        module = types.ModuleType("google.colab")
        module.drive = types.SimpleNamespace(mount=self.mounts.append)
        monkeypatch.setitem(sys.modules, "google.colab", module)
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.chdir(tmp_path)  # Colab starts in /content; no helpers/ above tmp_path
        self.content.mkdir()

    def run(self, command, check=False):
        self.commands.append(list(command))
        if command[:2] == ["git", "clone"]:
            fake_repository(Path(command[-1]))
        return subprocess.CompletedProcess(command, 0)

    def bootstrap(self) -> dict:
        """Execute the bootstrap cell with every /content path moved under the temporary folder."""
        source = next(iter(first_cells().values()))
        moved = source.replace('"/content/', f'"{self.content}/')
        assert source.count('"/content/') == 3 and moved.count(str(self.content)) == 3
        namespace = {}
        exec(moved, namespace)
        return namespace


def fake_repository(root: Path) -> Path:
    (root / "helpers").mkdir(parents=True)
    (root / "requirements.txt").write_text("tqdm\n")
    return root


def pip_install(root: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")]


def test_colab_with_the_placeholder_url_and_no_copy_on_drive_stops_before_cloning(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    monkeypatch.delenv("FLME_REPO_URL", raising=False)
    with pytest.raises(RuntimeError, match="REPO_URL is still the placeholder.*MyDrive/fl-model-editing"):
        colab.bootstrap()
    assert colab.mounts == [f"{colab.content}/drive"] and colab.commands == []


def test_colab_fresh_runtime_clones_then_installs_requirements(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    monkeypatch.setenv("FLME_REPO_URL", "https://example.org/team/fl-model-editing.git")
    root = colab.bootstrap()["ROOT"]
    clone = colab.content / "fl-model-editing"
    assert root == clone and colab.commands == [
        ["git", "clone", "-q", "https://example.org/team/fl-model-editing.git", str(clone)],
        pip_install(clone),
    ]
    assert sys.path[0] == str(clone) and sys.path.count(str(clone)) == 1 and Path.cwd() == clone
    colab.commands.clear()
    assert colab.bootstrap()["ROOT"] == clone and colab.commands == [pip_install(clone)]  # Run all again: no clone


def test_colab_uses_the_copy_on_drive_without_cloning(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    monkeypatch.delenv("FLME_REPO_URL", raising=False)  # the placeholder is fine when Drive has the repository
    drive_copy = fake_repository(colab.content / "drive" / "MyDrive" / "fl-model-editing")
    fake_repository(colab.content / "fl-model-editing")  # an older clone: Drive's copy wins
    assert colab.bootstrap()["ROOT"] == drive_copy
    assert colab.commands == [pip_install(drive_copy)] and Path.cwd() == drive_copy


def test_locally_the_repository_root_goes_on_sys_path_and_nothing_runs(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(REPO / "notebooks")  # where papermill and nbval run a notebook
    namespace = {}
    exec(next(iter(first_cells().values())), namespace)
    assert namespace["ROOT"] == REPO and sys.path[0] == str(REPO) and Path.cwd() == REPO


def test_use_repository_refuses_a_folder_without_helpers(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"root='.*' is invalid: it has no helpers/ folder"):
        use_repository(tmp_path, colab=True, run=lambda *a, **k: pytest.fail("installed"))
    assert Path.cwd() == tmp_path
