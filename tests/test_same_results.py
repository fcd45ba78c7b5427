"""The before/after check of structural changes finds every kind of difference and ignores only wall-clock columns."""

from __future__ import annotations

import pandas as pd
from same_results import differences, main


def _write(folder, rows):
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "fedavg_iid.csv", index=False)


def test_same_results_ignore_wall_clock_only(tmp_path):
    rows = [{"run_id": "a", "round": 1, "val_acc": 0.25, "elapsed_s": 1.5}]
    _write(tmp_path / "before", rows)
    _write(tmp_path / "after", [{**rows[0], "elapsed_s": 9.0}])
    assert differences(tmp_path / "before", tmp_path / "after") == []
    assert main([str(tmp_path / "before"), str(tmp_path / "after")]) == 0


def test_a_changed_value_column_row_or_file_is_reported(tmp_path):
    rows = [{"run_id": "a", "round": 1, "val_acc": 0.25, "elapsed_s": 1.5}]
    _write(tmp_path / "before", rows)
    for name, after in {
        "value": [{**rows[0], "val_acc": 0.250001}],
        "column": [{**rows[0], "extra": 1}],
        "row": rows * 2,
    }.items():
        _write(tmp_path / name, after)
        assert len(differences(tmp_path / "before", tmp_path / name)) == 1, name
    (tmp_path / "value" / "more.csv").write_text("a\n1\n")
    assert any("only in" in d for d in differences(tmp_path / "before", tmp_path / "value"))
    assert main([str(tmp_path / "before"), str(tmp_path / "value")]) == 1
