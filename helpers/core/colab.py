"""The notebooks' bootstrap, second half: once their first cell has found or cloned this repository, use it.

The first half stays in the cell because it runs before `helpers` exists on a fresh Colab runtime: mount Drive,
take the repository from Drive (MyDrive/fl-model-editing) or clone REPO_URL. Standard library only, for the same
reason: nothing from requirements.txt is installed yet when this runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def on_colab() -> bool:
    """True inside a Colab runtime (it imports google.colab at start-up)."""
    return "google.colab" in sys.modules


def use_repository(root: str | Path, *, colab: bool | None = None, run: Callable | None = None) -> Path:
    """Install requirements.txt (Colab only), put `root` first on sys.path and make it the working directory."""
    root = Path(root)
    if not (root / "helpers").is_dir():
        raise ValueError(f"root={str(root)!r} is invalid: it has no helpers/ folder (not this repository)")
    if on_colab() if colab is None else colab:
        # Nothing in requirements.txt is pinned, so pip keeps what Colab ships (torch above all) and adds the rest.
        run = run or subprocess.run
        run([sys.executable, "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")], check=True)
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    os.chdir(root)
    return root
