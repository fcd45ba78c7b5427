"""Runs: config-hash folders, atomic checkpoints with fallback, skip when done, exact resume."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import helpers.training.centralized as centralized
from helpers.config.experiments import make_config
from helpers.reporting.results import last_rows, write_results
from helpers.training.runs import checkpoint_files, load_checkpoint, open_run, run_id, save_checkpoint


def small(**kw):
    return make_config("centralized", "smoke", synthetic_train_size=400, epochs=3, device="cpu", **kw)


def test_run_id_ignores_bookkeeping_and_tracks_everything_else():
    a = small()
    assert run_id(a) == run_id({**a, "device": "cpu", "checkpoint_every": 5})
    assert run_id(a) != run_id({**a, "lr": 0.2}) and run_id(a) != run_id({**a, "seed": 1})


def test_existing_folder_with_other_config_is_refused(tmp_path):
    run = open_run("centralized", small(), tmp_path)
    stored = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps({**stored, "lr": 9.0}))
    with pytest.raises(ValueError, match="different config"):
        open_run("centralized", small(), tmp_path)


def test_unwritable_run_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable.*FLME_RUN_ROOT"):
        open_run("centralized", small(), blocker / "runs")


def test_checkpoint_fallback_to_previous_then_start_over(tmp_path):
    run = open_run("centralized", small(), tmp_path)
    assert load_checkpoint(run) is None
    for epoch in (1, 2, 3):
        save_checkpoint(run, {"epoch": epoch})
    newest, previous = checkpoint_files(run.dir)  # the two newest are kept
    assert load_checkpoint(run)["epoch"] == 3 and previous.name == "checkpoint-local-2.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated by a crash
    with pytest.warns(UserWarning, match=f"{newest.name} is unreadable .*resuming from {previous.name}"):
        assert load_checkpoint(run)["epoch"] == 2
    previous.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=f"no readable checkpoint .*{previous.name} is unreadable.*starts over"):
        assert load_checkpoint(run) is None


def test_done_run_is_skipped(tmp_path, monkeypatch):
    run = centralized.run_centralized(small(), run_root=tmp_path, progress=False)
    assert run.done
    monkeypatch.setattr(centralized, "train_steps", lambda *a, **k: pytest.fail("a finished run trained again"))
    again = centralized.run_centralized(small(), run_root=tmp_path, progress=False)
    assert again.summary() == run.summary()


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    reference = centralized.run_centralized(small(), run_root=tmp_path / "a", progress=False)
    real, calls = centralized.train_steps, []

    def crash_on_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Colab died mid-epoch
        return real(*args, **kwargs)

    monkeypatch.setattr(centralized, "train_steps", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        centralized.run_centralized(small(), run_root=tmp_path / "b", progress=False)
    monkeypatch.setattr(centralized, "train_steps", real)
    resumed = centralized.run_centralized(small(), run_root=tmp_path / "b", progress=False)
    cols = [c for c in reference.metrics().columns if c != "elapsed_s"]
    pd.testing.assert_frame_equal(reference.metrics()[cols], resumed.metrics()[cols])
    a, b = load_checkpoint(reference)["model"], load_checkpoint(resumed)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_write_results_is_tidy_and_refuses_mixed_profiles(tmp_path):
    runs = [centralized.run_centralized(small(seed=s), run_root=tmp_path, progress=False) for s in (0, 1)]
    path = write_results(runs, "demo", root=tmp_path / "results")
    df = pd.read_csv(path)
    assert path == tmp_path / "results" / "smoke" / "demo.csv"
    assert len(df) == 6 and df.groupby("run_id").size().tolist() == [3, 3]
    assert {"seed", "lr", "epoch", "test_acc", "profile", "experiment"} <= set(df.columns)
    runs[1].config = {**runs[1].config, "profile": "full"}
    with pytest.raises(ValueError, match="mix profiles"):
        write_results(runs, "demo", root=tmp_path / "results")


def test_colab_without_drive_warns_and_falls_back(monkeypatch):
    import sys

    from helpers.core import settings

    monkeypatch.delenv("FLME_RUN_ROOT", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setattr(settings, "DRIVE_ROOT", settings.Path("/nonexistent-drive/MyDrive/x"))
    with pytest.warns(UserWarning, match="Drive is not mounted"):
        assert settings.default_run_root() == settings.Path("runs")


def test_last_rows_is_each_runs_greatest_step_in_table_order():
    """Against a loop over the runs: one row per (source, run), the one with the largest round (or epoch), in the
    order the table lists them; rows shuffled, federated (round) and centralized (epoch) runs mixed."""
    rng = np.random.default_rng(0)
    rows = []
    for source in ("a", "b"):
        for run in range(5):
            step = "round" if run % 2 else "epoch"
            for s in rng.permutation(np.arange(1, rng.integers(2, 7))):
                rows.append({"source": source, "run_id": f"r{run}", step: s, "acc": rng.random()})
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=1).reset_index(drop=True)
    expected, seen = [], set()
    for _, row in table.iterrows():
        key = (row["source"], row["run_id"])
        if key in seen:
            continue
        seen.add(key)
        same = table[(table["source"] == row["source"]) & (table["run_id"] == row["run_id"])]
        steps = same["round"].fillna(same["epoch"])
        expected.append(steps.idxmax())
    got = last_rows(table)
    pd.testing.assert_frame_equal(got, table.loc[sorted(expected)].reset_index(drop=True))
    assert len(got) == 10 and last_rows(table.drop(columns="source"))["run_id"].is_unique
