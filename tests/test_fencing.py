"""Fencing on an eventually consistent store: a session that lost its run but still sees an old view of the folder
(its own lease, no done.json) writes late and changes nothing; its heartbeat never replaces the lease of the session
that took over; SCAFFOLD's c_i files go through the lease check and the retries; runs from before files were named
by their session still resume and read."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import helpers.core.storage as storage
from helpers.config.experiments import make_config
from helpers.federated import rounds as fedavg
from helpers.federated.clients import sample_clients
from helpers.reporting.results import tidy_results
from helpers.training.leases import LEASE_FILE, LeaseInfo, LeaseLost, claim, lease_state, read_lease
from helpers.training.runs import DONE, Run, checkpoint_files, load_checkpoint, metrics_file, open_run, run_id

SETS = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", num_clients=10,
            participation=0.3, local_steps=2, rounds=4, checkpoint_every=1)  # fmt: skip


@pytest.fixture(autouse=True)
def fast_io(monkeypatch):
    monkeypatch.setenv("FLME_IO_RETRY_WAIT_S", "0.001")
    monkeypatch.setenv("FLME_LEASE_SETTLE_S", "0.05")


def config(**overrides) -> dict:
    return make_config("fedavg", "smoke", **{**SETS, **overrides})


class StaleView(storage.FileOps):
    """This machine's view of a run folder as it was when made, minutes behind the others: lease.json reads as it
    was, and done.json (written since by another machine) is not there yet. Writes go through."""

    def __init__(self, folder: Path):
        self.folder, self.lease = folder, (folder / LEASE_FILE).read_bytes()

    def read(self, path):
        if Path(path) == self.folder / LEASE_FILE:
            return self.lease
        if Path(path) == self.folder / DONE:
            raise FileNotFoundError(errno.ENOENT, "not synced yet", str(path))
        return super().read(path)

    def exists(self, path):
        return Path(path) != self.folder / DONE and (Path(path) == self.folder / LEASE_FILE or super().exists(path))


class AnotherMachine:
    """Environment of a session on another machine that finds the lease stale at once."""

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in ("FLME_HOST", "FLME_LEASE_STALE_S")}
        os.environ.update(FLME_HOST="colab-b", FLME_LEASE_STALE_S="0")
        storage.OPS = storage.FileOps()  # it sees the folder as it is

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fedavg.run_fedavg(config(), run_root=tmp_path_factory.mktemp("reference"), progress=False)


def without_time(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.drop(columns="elapsed_s")


class Killed(Exception):
    pass


@pytest.mark.parametrize("lost_session", ["dies after a late round", "finishes late"])
def test_a_lost_sessions_late_writes_change_nothing(lost_session, tmp_path, reference, monkeypatch):
    """Session A trains rounds 1-2; B (another machine) takes the run over from A's checkpoint and finishes it; A,
    whose view still shows its own lease and no done.json, trains on and writes its files late (then dies, or
    finishes too). The run reads as the reference: done.json's metrics and checkpoint are a whole run's."""
    original, folder, late = fedavg.fedavg_round, tmp_path / "fedavg" / run_id(config()), {}
    monkeypatch.setattr(storage, "OPS", storage.FileOps())

    def takeover(model, data, shards, rnd, cfg, **kwargs):
        if rnd == 2 and not late:
            late["view"] = StaleView(folder)  # A's view freezes here: its own lease, no done.json
            with AnotherMachine():
                late["winner"] = fedavg.run_fedavg(config(), run_root=tmp_path, progress=False)
            late["done"] = (folder / DONE).read_bytes()
            storage.OPS = late["view"]
        if rnd == 3 and "done" in late and lost_session.startswith("dies"):
            raise Killed  # A wrote round 3's checkpoint and metrics after B's done.json
        return original(model, data, shards, rnd, cfg, **kwargs)

    monkeypatch.setattr(fedavg, "fedavg_round", takeover)
    if lost_session.startswith("dies"):
        with pytest.raises(Killed):
            fedavg.run_fedavg(config(), run_root=tmp_path, progress=False)
    else:
        fedavg.run_fedavg(config(), run_root=tmp_path, progress=False)
    storage.OPS = storage.FileOps()
    winner = json.loads(late["done"])["files"]
    if lost_session.startswith("dies"):
        assert (folder / DONE).read_bytes() == late["done"]  # the winner's done.json stands
        (late_metrics,) = [p for p in folder.glob("metrics-*.csv") if p.name != winner["metrics"]]
        assert len(pd.read_csv(late_metrics)) == 3  # A's truncated curve is on disk, and ignored
    else:  # A's done.json replaced B's: it names A's own files, a whole run's as well
        assert json.loads((folder / DONE).read_text())["files"]["metrics"] != winner["metrics"]
    run = Run("fedavg", config(), folder.name, folder)
    pd.testing.assert_frame_equal(without_time(run.metrics()), without_time(reference.metrics()))
    state, want = load_checkpoint(run), load_checkpoint(reference)
    assert state["round"] == 4 and all(torch.equal(state["model"][n], t) for n, t in want["model"].items())
    table = tidy_results([run])
    pd.testing.assert_frame_equal(table.drop(columns="elapsed_s"), tidy_results([reference]).drop(columns="elapsed_s"))


def test_a_heartbeat_never_replaces_the_lease_of_the_session_that_took_over(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "OPS", storage.FileOps())
    lost = open_run("fedavg", config(), tmp_path)
    assert claim(lost)
    view = StaleView(lost.dir)
    with AnotherMachine():
        rightful = open_run("fedavg", config(), tmp_path)
        assert claim(rightful)
    storage.OPS = view
    lost.claim.beat_at = -1e9  # a heartbeat is due
    lost.claim.check()  # its stale view shows its own token: it goes on, and beats
    storage.OPS = storage.FileOps()
    assert (lost.dir / f"heartbeat-{lost.claim.token}.json").exists()
    assert read_lease(lost.dir).token == rightful.claim.token
    rightful.claim.check()  # still the holder
    with pytest.raises(LeaseLost, match="colab-b"):  # the lost session stops once its view catches up
        lost.claim.check()


def test_a_lease_is_stale_after_this_machine_saw_it_unchanged_whatever_the_holders_clock(tmp_path, monkeypatch):
    monkeypatch.setenv("FLME_LEASE_STALE_S", "0.5")
    folder = tmp_path / "run"
    folder.mkdir()
    ahead = time.time() + 3600  # the holder's clock is an hour fast: by its heartbeat, fresh for an hour
    (folder / LEASE_FILE).write_text(json.dumps(LeaseInfo("alice", "colab-a", 7, "tok", ahead, ahead).__dict__))
    assert lease_state(folder)[0] == "running"
    time.sleep(0.6)
    assert lease_state(folder)[0] == "stale"
    (folder / "heartbeat-tok.json").write_text(json.dumps({"heartbeat": ahead, "beats": 1, "released": False}))
    assert lease_state(folder)[0] == "running"  # it beat: seen changing
    (folder / "heartbeat-tok.json").write_text(json.dumps({"heartbeat": ahead, "beats": 2, "released": True}))
    assert lease_state(folder) == ("free", None)  # released: another session may take it at once


def test_control_variates_are_written_under_the_lease(tmp_path, monkeypatch):
    """A SCAFFOLD session whose lease was replaced in round 2 writes no c_i of round 2 (the check comes first)."""
    original, cfg = fedavg.fedavg_round, config(algorithm="scaffold")
    folder = tmp_path / "fedavg" / run_id(cfg)

    def rival_in_round_2(model, data, shards, rnd, c, **kwargs):
        if rnd == 1:
            now = time.time()
            rival = LeaseInfo("bob@colab-b", "colab-b", 4242, "their-token", now, now)
            (folder / LEASE_FILE).write_text(json.dumps(rival.__dict__))
        return original(model, data, shards, rnd, c, **kwargs)

    monkeypatch.setattr(fedavg, "fedavg_round", rival_in_round_2)
    with pytest.raises(LeaseLost, match="bob@colab-b"):
        fedavg.run_fedavg(cfg, run_root=tmp_path, progress=False)
    written = sorted(p.name for p in (folder / "control_variates").iterdir())
    assert written and all(name.endswith("_1.pt") for name in written), written


class FlakyControlVariates(storage.FileOps):
    """Every c_i write, rename, read and removal fails once with a transient error before it goes through."""

    def __init__(self):
        self.failed: set[tuple[str, str]] = set()

    def flaky(self, op: str, path) -> None:
        key = (op, Path(path).name)
        if "control_variates" in str(path) and key not in self.failed:
            self.failed.add(key)
            raise OSError(errno.EIO, "Drive I/O error", str(path))

    def write(self, path, data):
        self.flaky("write", path)
        super().write(path, data)

    def replace(self, src, dst):
        self.flaky("replace", dst)
        super().replace(src, dst)

    def read(self, path):
        self.flaky("read", path)
        return super().read(path)

    def remove(self, path):
        self.flaky("remove", path)
        super().remove(path)


def test_control_variates_are_retried_and_change_no_result(tmp_path, monkeypatch):
    cfg = config(algorithm="scaffold", checkpoint_every=2)
    clean = fedavg.run_fedavg(cfg, run_root=tmp_path / "clean", progress=False)
    flaky = FlakyControlVariates()
    monkeypatch.setattr(storage, "OPS", flaky)
    run = fedavg.run_fedavg(cfg, run_root=tmp_path / "flaky", progress=False)
    assert {op for op, _ in flaky.failed} == {"write", "replace", "read", "remove"}
    pd.testing.assert_frame_equal(without_time(run.metrics()), without_time(clean.metrics()))
    got, want = load_checkpoint(run)["algorithm"]["c"], load_checkpoint(clean)["algorithm"]["c"]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_control_variate_the_checkpoint_needs_is_never_taken_as_zero(tmp_path, monkeypatch):
    """A resumed SCAFFOLD run whose needed c_i version is gone (removed late by a session that lost the run) stops
    naming the file instead of training with c_i = 0."""
    cfg, original = config(algorithm="scaffold", rounds=8), fedavg.fedavg_round

    def killed(model, data, shards, rnd, c, **kwargs):
        if rnd == 2:
            raise Killed
        return original(model, data, shards, rnd, c, **kwargs)

    monkeypatch.setattr(fedavg, "fedavg_round", killed)
    with pytest.raises(Killed):
        fedavg.run_fedavg(cfg, run_root=tmp_path, progress=False)
    monkeypatch.setattr(fedavg, "fedavg_round", original)
    (folder,) = (tmp_path / "fedavg").iterdir()
    needed = load_checkpoint(Run("fedavg", cfg, folder.name, folder))["algorithm"]["versions"]
    later = [k for rnd in range(2, 8) for k in sample_clients(cfg["seed"], rnd, 10, 0.3)]
    client = next(k for k in later if k in needed)  # the first client trained again that has a c_i
    (folder / "control_variates" / f"{client}_{needed[client]}.pt").unlink()
    with pytest.raises(RuntimeError, match=rf"{client}_{needed[client]}\.pt is missing, and the checkpoint"):
        fedavg.run_fedavg(cfg, run_root=tmp_path, progress=False)


def legacy(folder: Path) -> None:
    """Rename a run folder's files as runs wrote them before files carried a session's token."""
    newest, *rest = checkpoint_files(folder)
    newest.rename(folder / "checkpoint.pt")
    if rest:
        rest[0].rename(folder / "checkpoint.prev.pt")
    metrics_file(folder).rename(folder / "metrics.csv")
    if (folder / DONE).exists():
        summary = json.loads((folder / DONE).read_text())
        del summary["files"]
        (folder / DONE).write_text(json.dumps(summary))


def test_runs_from_before_tokens_resume_and_read_as_before(tmp_path, reference, monkeypatch, capsys):
    done_root = tmp_path / "done"
    done = fedavg.run_fedavg(config(), run_root=done_root, progress=False)
    legacy(done.dir)
    assert sorted(p.name for p in done.dir.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "config.json",
                                                          DONE, "metrics.csv"]  # fmt: skip
    got, want = (tidy_results([r]).drop(columns="elapsed_s") for r in (done, reference))
    pd.testing.assert_frame_equal(got, want)  # read from metrics.csv, as before
    original = fedavg.fedavg_round

    def killed(model, data, shards, rnd, c, **kwargs):
        if rnd == 2:
            raise Killed
        return original(model, data, shards, rnd, c, **kwargs)

    monkeypatch.setattr(fedavg, "fedavg_round", killed)
    with pytest.raises(Killed):
        fedavg.run_fedavg(config(), run_root=tmp_path / "cut", progress=False)
    monkeypatch.setattr(fedavg, "fedavg_round", original)
    (folder,) = (tmp_path / "cut" / "fedavg").iterdir()
    legacy(folder)
    run = fedavg.run_fedavg(config(), run_root=tmp_path / "cut", progress=False)
    assert f"[resume] fedavg {run.id}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(without_time(run.metrics()), without_time(reference.metrics()))
    assert not any((folder / name).exists() for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.csv"))


def test_metrics_that_do_not_match_done_json_are_an_error_naming_the_file(tmp_path, reference):
    run = fedavg.run_fedavg(config(), run_root=tmp_path, progress=False)
    path = metrics_file(run.dir)
    path.write_text(path.read_text().rsplit("\n", 2)[0] + "\n")  # a copy missing its last row
    with pytest.raises(storage.StorageError, match=rf"reading {path} failed 6 times.*not the one expected"):
        run.metrics()
