"""Every environment variable the toolkit reads, in one place: what it does and its default (`SETTINGS`), and the
function that reads it. Each is read when needed, never at import, so a notebook or a test may set it late."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]  # the repository: notebooks/, results/, figures/, report/ under it
PROFILES = ("smoke", "full")
DRIVE_ROOT = Path("/content/drive/MyDrive/fl-model-editing")  # the project's folder on a mounted Google Drive


class Setting(NamedTuple):
    """One environment variable: what it changes and what holds when it is unset."""

    meaning: str
    default: str


SETTINGS: dict[str, Setting] = {
    "FLME_PROFILE": Setting("the profile of every run and notebook (wins over a notebook's PROFILE)", "PROFILE's"),
    "FLME_RUN_ROOT": Setting("where run folders live", "Drive in Colab, else ./runs"),
    "FLME_RESULTS_ROOT": Setting("where results CSVs go", "Drive in Colab, else results/"),
    "FLME_FIGURES_ROOT": Setting("where the report's figures go", "figures/"),
    "FLME_TABLES_ROOT": Setting("where the report's generated LaTeX goes", "report/generated/"),
    "FLME_NO_TRAIN_DATA": Setting("1 on a federation's server: it refuses to load the training split", "0"),
    "FLME_NODE_STATE": Setting(
        "a Flower node's state folder when its --node-config has no state-dir", "~/.cache/flme/flower-nodes"
    ),  # fmt: skip
    "FLME_LEASE_STALE_S": Setting("seconds without a heartbeat after which a run's lease is taken over", "1800"),
    "FLME_LEASE_SETTLE_S": Setting("seconds between writing a lease and reading it back", "5 on Drive, else 0.2"),
    "FLME_WORKER": Setting("this session's name in leases and `status`", "user@host"),
    "FLME_HOST": Setting("this machine's name in leases (tests pose as another machine)", "the host name"),
    "FLME_IO_RETRY_WAIT_S": Setting("first wait before retrying a failed file operation (doubles each time)", "0.5"),
    "FLME_FLOWER_POLL_S": Setting("seconds between a Flower server's pulls for its nodes' replies", "0.2"),
    "FLME_NODE_CACHE": Setting("0: a Flower node rebuilds its client's data at every message (no disk cache)", "1"),
    "FLME_FLOWER_TIMING": Setting(
        "a file where Flower's server and nodes append the timestamps of a round's parts", "none (off)"
    ),  # fmt: skip
}


def env_value(name: str) -> str | None:
    """The variable's value, or None where it is unset or empty (only names of SETTINGS)."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a setting of helpers.core.settings (add it to SETTINGS)")
    return os.environ.get(name) or None


def profile_override() -> str | None:
    """$FLME_PROFILE: wins over the profile a notebook or command asks for."""
    return env_value("FLME_PROFILE")


def default_run_root() -> Path:
    """$FLME_RUN_ROOT if set; Google Drive when mounted in Colab; else ./runs."""
    if env_value("FLME_RUN_ROOT"):
        return Path(env_value("FLME_RUN_ROOT"))
    if DRIVE_ROOT.parent.is_dir():
        return DRIVE_ROOT / "runs"
    if "google.colab" in sys.modules:
        warnings.warn(
            "Google Drive is not mounted: runs go to ./runs and are lost when the Colab runtime ends. "
            "Run the notebook's first cell (it mounts Drive) to keep them.",
            stacklevel=2,
        )
    return Path("runs")


def default_results_root() -> Path:
    """$FLME_RESULTS_ROOT if set (tests point it elsewhere); Drive when mounted in Colab, so results outlive the
    runtime's clone; else results/ in the repository."""
    if env_value("FLME_RESULTS_ROOT"):
        return Path(env_value("FLME_RESULTS_ROOT"))
    if DRIVE_ROOT.parent.is_dir():
        return DRIVE_ROOT / "results"
    return REPO / "results"


def default_figures_root() -> Path:
    """$FLME_FIGURES_ROOT, else figures/ in the repository."""
    return Path(env_value("FLME_FIGURES_ROOT") or REPO / "figures")


def default_tables_root() -> Path:
    """$FLME_TABLES_ROOT, else report/generated/ in the repository."""
    return Path(env_value("FLME_TABLES_ROOT") or REPO / "report" / "generated")


def no_train_data() -> bool:
    """True in a process started with FLME_NO_TRAIN_DATA=1 (a Flower server); values other than 1, 0, "" raise."""
    value = env_value("FLME_NO_TRAIN_DATA") or ""
    if value not in ("", "0", "1"):
        raise ValueError(f"FLME_NO_TRAIN_DATA={value!r} is invalid: must be 1 (no training data here) or 0")
    return value == "1"


def node_state_root() -> Path:
    """$FLME_NODE_STATE, else ~/.cache/flme/flower-nodes: a node's state-dir when its node config names none."""
    return Path(env_value("FLME_NODE_STATE") or "~/.cache/flme/flower-nodes").expanduser()


def io_retry_wait_seconds(default: float) -> float:
    """$FLME_IO_RETRY_WAIT_S, else `default`: the first wait before a failed file operation is tried again."""
    return float(env_value("FLME_IO_RETRY_WAIT_S") or default)
