"""A team of sessions on one run root: leases (one trainer per run, stale takeover, the loser stops), Drive faults
retried without changing a result, `status` and `work` on the smoke profile."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import helpers.core.storage as storage
import helpers.federated.rounds as fedavg
from helpers.config.experiments import make_config
from helpers.ops.cli import main
from helpers.ops.notebook import declared_parameters
from helpers.ops.plans import best_hyperparameters, best_scheduler, final_configs, notebook_plan, scheduler_configs
from helpers.ops.study import plan_status, run_status, study_plan, study_status
from helpers.training.centralized import run_centralized
from helpers.training.leases import LEASE_FILE, LeaseInfo, LeaseLost, claim, lease_state, read_lease
from helpers.training.runs import (
    describe,
    load_checkpoint,
    metrics_file,
    open_run,
    run_id,
    save_checkpoint,
    write_metrics,
)

REPO = Path(__file__).resolve().parent.parent
SETS = {"synthetic_train_size": 600, "synthetic_test_size": 100, "batch_size": 16, "device": "cpu",
        "num_clients": 10, "participation": 0.3, "local_steps": 2, "rounds": 4}  # fmt: skip
ARGS = ["run", "fedavg", "--profile", "smoke", *[a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]]
FAST = {"FLME_IO_RETRY_WAIT_S": "0.001", "FLME_LEASE_SETTLE_S": "0.5"}
# A worker process: logs every round it trains; with GO set, says it is ready (imports done) and waits for GO to
# appear, so that two workers claim at the same moment; then runs the CLI.
DRIVER = """
import os, signal, sys, time
import helpers.federated.rounds as fedavg
from helpers.ops.cli import main
original = fedavg.fedavg_round
def logged(model, data, shards, rnd, config, **kwargs):
    with open(os.environ["ROUND_LOG"], "a") as log:
        log.write(f"{os.getpid()} {rnd}\\n")
    if rnd == int(os.environ.get("KILL_AT_ROUND", -1)):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(model, data, shards, rnd, config, **kwargs)
fedavg.fedavg_round = logged
if os.environ.get("GO"):
    open(os.environ["GO"] + f".{os.getpid()}", "w").close()
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.001)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def fast_io(monkeypatch):
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)


def worker(root: Path, log: Path, **env: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLME_PROFILE": "smoke", "ROUND_LOG": str(log), **FAST, **env}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER), *ARGS, "--run-root", str(root)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def final_metrics(root: Path) -> pd.DataFrame:
    folder = root / "fedavg" / run_id(make_config("fedavg", "smoke", **SETS))
    assert (folder / "done.json").exists() and not (folder / LEASE_FILE).exists()
    return pd.read_csv(metrics_file(folder), dtype={"clients": str}).drop(columns="elapsed_s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run made alone, without faults."""
    root = tmp_path_factory.mktemp("alone")
    assert main([*ARGS, "--run-root", str(root)]) == 0
    return final_metrics(root)


def rounds_by_process(log: Path) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for line in log.read_text().split("\n"):
        if line:
            pid, rnd = map(int, line.split())
            found.setdefault(pid, []).append(rnd)
    return found


def test_two_sessions_start_the_same_run_at_once_one_trains_it(tmp_path, reference):
    log, go = tmp_path / "rounds.log", tmp_path / "go"
    procs = [worker(tmp_path / "root", log, GO=str(go)) for _ in range(2)]
    while len(list(tmp_path.glob("go.*"))) < 2:  # both imported everything
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs  # 3: held by another session
    held = outs[[p.returncode for p in procs].index(3)]
    assert "[held]" in held and "trained by" in held
    trained = rounds_by_process(log)
    assert len(trained) == 1 and sorted(next(iter(trained.values()))) == list(range(SETS["rounds"])), trained
    pd.testing.assert_frame_equal(final_metrics(tmp_path / "root"), reference)  # no duplicate rows, same numbers


def test_killed_holder_is_taken_over_after_the_stale_time(tmp_path, reference, monkeypatch):
    stale = 6.0
    monkeypatch.setenv("FLME_LEASE_STALE_S", str(stale))
    log, root = tmp_path / "rounds.log", tmp_path / "root"
    # the holder poses as another machine: only the stale time (not a dead pid on this machine) frees its run
    killed = worker(root, log, KILL_AT_ROUND="2", FLME_HOST="colab-a", FLME_LEASE_STALE_S=str(stale))
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    folder = next((root / "fedavg").iterdir())
    state, info = lease_state(folder)
    assert state == "running" and info.host == "colab-a"  # fresh: another session skips it
    assert main([*ARGS, "--run-root", str(root)]) == 3
    while lease_state(folder)[0] != "stale":
        time.sleep(0.2)
    assert time.time() - info.heartbeat >= stale
    second = worker(root, log, FLME_LEASE_STALE_S=str(stale))
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0 and "[take over]" in out and "colab-a" in out, out
    first, then = rounds_by_process(log).values()
    assert first == [0, 1, 2] and then[0] <= 2 and then[-1] == SETS["rounds"] - 1  # resumed from its checkpoint
    pd.testing.assert_frame_equal(final_metrics(root), reference)


def test_dead_process_on_this_machine_frees_its_run_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = open_run("fedavg", make_config("fedavg", "smoke", **SETS), tmp_path)
    now = time.time()
    info = LeaseInfo("old kernel", read_host(), gone.pid, "t0", now, now)
    (run.dir / LEASE_FILE).write_text(json.dumps(info.__dict__))
    assert lease_state(run.dir)[0] == "stale"
    assert claim(run) and read_lease(run.dir).pid == os.getpid()


def read_host() -> str:
    from helpers.training.leases import this_host

    return this_host()


def test_a_session_whose_lease_was_replaced_writes_nothing(tmp_path, capsys):
    run = open_run("fedavg", make_config("fedavg", "smoke", **SETS), tmp_path)
    assert claim(run)
    save_checkpoint(run, {"round": 1})
    write_metrics(run, [{"round": 1}])
    now = time.time()
    rival = LeaseInfo("bob@colab-b", "colab-b", 4242, "their-token", now, now)  # a late write from another machine
    (run.dir / LEASE_FILE).write_text(json.dumps(rival.__dict__))
    before = {p.name: p.read_bytes() for p in run.dir.iterdir()}
    for write in (lambda: save_checkpoint(run, {"round": 2}), lambda: write_metrics(run, [{"round": 1}, {"round": 2}])):
        with pytest.raises(LeaseLost, match="bob@colab-b.*stops and writes nothing"):
            write()
    assert {p.name: p.read_bytes() for p in run.dir.iterdir()} == before
    run.claim.release()  # not ours any more: the rival's lease stays
    assert read_lease(run.dir).token == "their-token"
    assert main([*ARGS, "--run-root", str(tmp_path)]) == 3  # another session skips the rival's fresh lease
    assert "[held]" in capsys.readouterr().out


def test_training_stops_when_another_session_takes_the_run(tmp_path, monkeypatch):
    original = fedavg.fedavg_round

    def takeover_at_round_2(model, data, shards, rnd, config, **kwargs):
        if rnd == 2:
            now = time.time()
            rival = LeaseInfo("bob@colab-b", "colab-b", 4242, "their-token", now, now)
            (folder / LEASE_FILE).write_text(json.dumps(rival.__dict__))
        return original(model, data, shards, rnd, config, **kwargs)

    monkeypatch.setattr(fedavg, "fedavg_round", takeover_at_round_2)
    folder = tmp_path / "fedavg" / run_id(make_config("fedavg", "smoke", **SETS))
    with pytest.raises(LeaseLost):
        fedavg.run_fedavg(make_config("fedavg", "smoke", **SETS), run_root=tmp_path, progress=False)
    assert not (folder / "done.json").exists()
    assert len(pd.read_csv(metrics_file(folder))) == 2  # rows of rounds 1-2 only: round 3's was never written
    assert read_lease(folder).token == "their-token"


class FaultyOps(storage.FileOps):
    """Drive as it misbehaves: delays, OSErrors before an operation, timeouts after one that happened, files
    briefly missing on read; after a fault the next `quiet` operations pass (so a retry gets through)."""

    def __init__(self, rate: float, quiet: int = 4):
        import random

        self.random, self.rate, self.quiet, self.calm, self.hits = random.Random(0), rate, quiet, 0, []

    def fault(self, op: str, path: Path, after: bool = False) -> None:
        time.sleep(self.random.random() * 0.002)
        self.calm -= 1
        if self.calm < 0 and self.random.random() < self.rate:
            self.calm = self.quiet
            self.hits.append((op, Path(path).name, after))
            if op == "read":
                raise FileNotFoundError(errno.ENOENT, "briefly missing", str(path))
            raise TimeoutError(errno.ETIMEDOUT, "Drive timed out") if after else OSError(errno.EIO, "I/O error")

    def write(self, path, data):
        self.fault("write", path)
        super().write(path, data)
        self.fault("write", path, after=True)

    def replace(self, src, dst):
        self.fault("replace", dst)
        super().replace(src, dst)
        self.fault("replace", dst, after=True)  # it happened, but the caller hears a timeout

    def read(self, path):
        self.fault("read", path)
        return super().read(path)


def test_drive_faults_during_checkpoint_and_metrics_writes_leave_the_result_unchanged(tmp_path, reference, monkeypatch):
    faults = FaultyOps(rate=0.3)
    monkeypatch.setattr(storage, "OPS", faults)
    assert main([*ARGS, "--run-root", str(tmp_path)]) == 0
    monkeypatch.setattr(storage, "OPS", storage.FileOps())
    hit = {name for _, name, _ in faults.hits}
    for target in ("checkpoint-", "metrics-", "lease.json"):  # each written through faults, and retried
        assert any(target in name for name in hit), (target, hit)
    assert any(after for _, _, after in faults.hits)  # a rename that happened but reported a timeout
    pd.testing.assert_frame_equal(final_metrics(tmp_path), reference)


def test_a_write_that_keeps_failing_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, reference, monkeypatch):
    class DriveGone(storage.FileOps):
        def replace(self, src, dst):
            if Path(dst).name.startswith("metrics-") and len(list(Path(dst).parent.glob("checkpoint-*.pt"))) == 2:
                raise OSError(errno.EIO, "Transport endpoint is not connected")
            super().replace(src, dst)

    monkeypatch.setattr(storage, "OPS", DriveGone())
    config = make_config("fedavg", "smoke", **SETS)
    with pytest.raises(storage.StorageError, match=r"metrics-\w+\.csv failed 6 times"):
        fedavg.run_fedavg(config, run_root=tmp_path, progress=False)
    monkeypatch.setattr(storage, "OPS", storage.FileOps())
    run = open_run("fedavg", config, tmp_path)
    assert not run.done and load_checkpoint(run)["round"] == 2
    assert read_lease(run.dir) is None  # released: another session may resume at once
    assert main([*ARGS, "--run-root", str(tmp_path)]) == 0  # resumes from the last good checkpoint
    pd.testing.assert_frame_equal(final_metrics(tmp_path), reference)


def test_status_and_work_on_the_smoke_profile(tmp_path, capsys):
    root = str(tmp_path)
    assert main(["work", "--profile", "smoke", "--notebook", "02", "--run-root", root]) == 0
    out = capsys.readouterr().out
    assert "this session finished 1 run;" in out and " on 1 planned run of profile smoke" in out
    assert main(["status", "--profile", "smoke", "--notebook", "02", "--run-root", root]) == 0
    out = capsys.readouterr().out  # work and status count the same runs; a finished study says so
    assert re.search(r"(?m)^total \(distinct runs\) +1 +1 +0 ", out), out
    assert "finished: every run of this study is done (1 run)" in out and "waiting:" not in out
    assert main(["status", "--profile", "smoke", "--run-root", root, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    rows = {row["notebook"]: row for row in status["notebooks"]}
    assert rows["02_fedavg_iid"]["done"] == rows["02_fedavg_iid"]["runs"] == 1
    assert rows["03_fedavg_noniid"]["done"] == 1  # its J=4 IID run is 02's run
    total = status["total"]
    assert rows["02_fedavg_iid"]["finished"] and not total["finished"]  # the other notebooks' runs are left
    assert total["done"] == 1 and total["runs"] == sum(total[s] for s in ("done", "running", "stale", "interrupted",
                                                                         "new", "waiting"))  # fmt: skip
    # 01's scheduler and seed runs wait for its grid's best lr: work leaves them to the notebook
    assert rows["01_centralized"]["waiting"] == 7 and total["t4_hours_left"] >= 0
    assert main(["work", "--profile", "smoke", "--notebook", "02", "--run-root", root]) == 0
    assert "this session finished 0 runs;" in capsys.readouterr().out  # nothing left: nothing retrained
    table = plan_status(study_plan_of("02_fedavg_iid"), root)  # the notebook's status cell
    assert table[["state", "holder"]].values.tolist() == [["done", ""]]


def test_status_names_the_holder_of_a_running_and_a_stale_run(tmp_path, monkeypatch):
    """Stale is judged by this machine's clock: a lease whose heartbeat claims to be hours old (the holder's clock
    is off) runs until this machine has seen it unchanged for the stale time, and a heartbeat resets that."""
    monkeypatch.setenv("FLME_LEASE_STALE_S", "1")
    planned = study_plan("smoke", ["02"])[0]
    folder = tmp_path / planned.experiment / planned.id
    folder.mkdir(parents=True)
    hours_ago = time.time() - 10_000
    info = LeaseInfo("alice@colab-a", "colab-a", 7, "tok", hours_ago, hours_ago)
    (folder / LEASE_FILE).write_text(json.dumps(info.__dict__))

    def state() -> str:
        status = run_status(planned.experiment, planned.config, tmp_path)
        assert "alice@colab-a" in status["holder"]
        held = study_status("smoke", tmp_path, ["02"])["total"]["held"]
        assert [h["state"] for h in held] == [status["state"]]
        return status["state"]

    assert state() == "running"  # first seen now, whatever its heartbeat says
    time.sleep(1.1)
    assert state() == "stale"
    (folder / "heartbeat-tok.json").write_text(json.dumps({"heartbeat": hours_ago, "beats": 1}))  # it beat
    assert state() == "running"


@pytest.mark.parametrize(
    "args,message",
    [(["work", "--notebook", "9"], "--notebook '9' is unknown; allowed: 01_centralized"),
     (["status", "--notebook", "08_x"], "--notebook '08_x' is unknown"),
     (["work", "--hours", "0"], "--hours: '0' is invalid: must be a number of hours > 0"),
     (["status", "--profile", "huge"], "--profile: invalid choice: 'huge' (choose from")],
)  # fmt: skip
def test_bad_status_and_work_options_exit_2_naming_the_option(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err


def study_plan_of(notebook: str) -> list[tuple[str, dict]]:
    return [(p.experiment, p.config) for p in study_plan("smoke", [notebook])]


def test_01s_later_runs_are_planned_exactly_once_the_results_they_need_are_done(tmp_path):
    """01's scheduler runs take the grid's best hyperparameters and its seed runs the best scheduler: placeholders
    (waiting) until those runs are done on the run root, then the very runs the notebook trains (status finishes)."""
    params = dict(GRID_LR=[0.05, 0.01], GRID_WEIGHT_DECAY=[0.0], SCHEDULERS=["cosine", "constant"], SEEDS=[0, 1],
                  EPOCHS=1, PROBE_LR=0.1)  # fmt: skip
    plan = notebook_plan("01_centralized", "smoke", tmp_path, **params)
    assert plan.waiting == ("schedulers", "final")
    grid = [run_centralized(c, run_root=tmp_path, progress=False) for c in plan["grid"]]
    best = best_hyperparameters(grid)
    plan = notebook_plan("01_centralized", "smoke", tmp_path, **params)
    values = {**declared_parameters("01_centralized"), **params, "PROFILE": "smoke"}
    assert plan.waiting == ("final",) and plan["schedulers"] == scheduler_configs(values, best)
    schedulers = [run_centralized(c, run_root=tmp_path, progress=False) for c in plan["schedulers"]]
    plan = notebook_plan("01_centralized", "smoke", tmp_path, **params)
    assert plan.waiting == () and plan["final"] == final_configs(values, best, best_scheduler(schedulers))
    assert {c["seed"] for c in plan["final"]} == {0, 1} and best["lr"] in (0.05, 0.01)


def test_status_counts_what_the_pipeline_counts_each_run_once(tmp_path):
    """Status counts a notebook's planned runs, each distinct run once, as the pipeline counts the runs the notebook
    prints; the step-0 head runs that sparse FedAvg runs train first print as head runs and count apart in both."""
    from helpers.editing.step0 import head_fedavg_config
    from helpers.ops.pipeline import HEAD_RUN, RunCount

    planned = study_plan("smoke", ["05"], tmp_path)
    sparse = [p for p in planned if p.experiment == "sparse_fedavg" and p.config["step0"] == "sgd"]
    assert sparse and not [p for p in planned if p.config.get("train_mode") == "head"]
    head = head_fedavg_config(sparse[0].config)
    assert HEAD_RUN in describe("fedavg", head) and HEAD_RUN not in describe(sparse[0].experiment, sparse[0].config)
    printed = "".join(f"[start] {describe(p.experiment, p.config, p.id)}: 2 rounds\n" for p in planned)
    printed += f"[start] {describe('fedavg', head)}: 1 round\n"
    counts = RunCount.from_text(printed)
    (row,) = study_status("smoke", tmp_path, ["05"])["notebooks"]
    assert row["runs"] == len({p.id for p in planned}) == len(counts.new) and len(counts.heads.new) == 1
