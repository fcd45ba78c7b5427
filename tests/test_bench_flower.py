"""Flower's per-round overhead in the benchmark: both engines time the same run; the ratio is theirs."""

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from helpers.config.experiments import make_config  # noqa: E402
from helpers.ops.bench_flower import bench_flower  # noqa: E402


def test_flower_round_time_is_measured_against_the_sequential_engine():
    config = make_config("fedavg", "smoke", synthetic_train_size=600, synthetic_test_size=100, device="cpu",
                         num_clients=10, participation=0.3, rounds=3)  # fmt: skip
    out = bench_flower(config)
    assert out["flower_round_s"] > 0 and out["sequential_round_s"] > 0 and out["flower_fixed_s"] > 0
    assert out["flower_round_overhead_ratio"] == pytest.approx(out["flower_round_s"] / out["sequential_round_s"])
    with pytest.raises(ValueError, match=r"^rounds=1 is invalid for bench_flower: must be >= 2"):
        bench_flower({**config, "rounds": 1})


def test_a_real_rounds_parts_come_from_the_timestamps_and_add_up_to_the_round():
    """helpers.ops.bench_federation on timestamps written by hand (the benchmark itself starts a SuperLink): each round
    is split along the node that answered last, from the SuperNodes' stamped log lines and our timing marks."""
    from helpers.flower.federation import POLL_ENV
    from helpers.ops import bench_federation

    timing, logs = [], ["", ""]
    for rnd, start in enumerate((100.0, 120.0, 140.0)):
        ids = [f"m{rnd}a", f"m{rnd}b"]
        timing += [{"t": start, "pid": 1, "event": "push", "label": f"train {rnd}", "load": 2.5},
                   {"t": start + 0.5, "pid": 1, "event": "pushed", "label": f"train {rnd}", "ids": ids}]  # fmt: skip
        for node, (message, late) in enumerate(zip(ids, (0.0, 2.0), strict=True)):  # node 1 answers 2 s later
            t, pid = start + late, 10 * rnd + node + 2
            logs[node] += f"{t + 2:.3f} \x1b[32mINFO\x1b[0m :      Receiving: train message (ID: {message})\n"
            timing += [{"t": t + 9, "pid": pid, "event": "handler", "id": message, "started": t + 3, "imported": t + 6},
                       {"t": t + 11, "pid": pid, "event": "imports"}, {"t": t + 11.5, "pid": pid, "event": "inputs"},
                       {"t": t + 12, "pid": pid, "event": "computed"},
                       {"t": t + 12.25, "pid": pid, "event": "replied", "id": message}]  # fmt: skip
            logs[node] += f"{t + 13:.3f} INFO :      Sending: train message (ID: x{message})\n"
            logs[node] += f"{t + 14:.3f} INFO :      Sent successfully\n"
            timing.append({"t": t + 15, "pid": 1, "event": "pulled", "label": f"train {rnd}", "ids": [message],
                           "asked": t + 14.75})  # fmt: skip
    rounds = bench_federation.round_parts(sorted(timing, key=lambda e: e["t"]), logs)
    assert len(rounds) == 2  # the last round has no next push
    want = {"round_s": 20, "load": 2.5, "push": 0.5, "node_idle": 3.5, "superexec_wait": 1, "clientapp_start": 3,
            "app_imports": 3, "train_imports": 2, "setup": 0.5, "compute": 0.5, "reply": 0.25,
            "reply_to_supernode": 0.75, "node_send": 1, "server_wait": 0.75, "server_pull": 0.25,
            "server_step": 3}  # fmt: skip
    assert all(r == pytest.approx(want) for r in rounds)
    assert sum(v for k, v in rounds[0].items() if k not in ("round_s", "load")) == pytest.approx(rounds[0]["round_s"])
    early = [{**e, "t": e["t"] - 1.5, "asked": e["asked"] - 1.5} if e["event"] == "pulled" and e["label"] == "train 0"
             else e for e in timing]  # fmt: skip
    overlapping = bench_federation.round_parts(early, logs)[0]  # pulled before the node logged "Sent"
    assert overlapping["server_wait"] == 0 and overlapping["server_pull"] == 0 and overlapping["server_step"] == 4
    out = {f"federation_{m}_{k}_s": v for m in bench_federation.MODES for k, v in want.items()}
    out |= {f"federation_{m}_{k}": 20 for m in bench_federation.MODES for k in ("round_s", "ratio", "load")}
    out["federation_sequential_round_s"] = 0.1
    table = bench_federation.breakdown_table(out)
    assert all(f"| {name} | " in table for name, *_ in bench_federation.PARTS)
    assert "start_client_internal.py:263" in table and "run_superexec.py:280" in table
    before = bench_federation.MODES["before"]
    assert before["link"][POLL_ENV] == "3" and before["nodes"]["FLME_NODE_CACHE"] == "0"
