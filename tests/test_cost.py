"""Colab cost estimator: work counted from configs matches what the runs do, shared work is counted once, runs on
disk count as done, a measured T4 benchmark replaces the FLOP assumption, notebooks expose their plans."""

from __future__ import annotations

import json
import math

import pytest
import torch
from smallrun import SMALL
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers.config.experiments import make_config, split_sizes, train_split_size
from helpers.core.models import build_model, forward_flops
from helpers.federated.clients import clients_per_round
from helpers.ops import cost
from helpers.ops.coverage import ADDITIONS
from helpers.ops.memory import LABEL
from helpers.ops.notebook import NOTEBOOKS
from helpers.ops.plans import notebook_plan
from helpers.training.centralized import run_centralized


@pytest.mark.parametrize("name, img_size", [("vit_tiny_smoke", 32), ("vit_small_patch16_224.dino", 224)])
def test_flops_from_the_shape_equal_a_counted_forward(name, img_size):
    # The math attention backend runs attention as explicit matmuls, which FlopCounterMode counts in every torch
    # version (a fused CPU kernel is not counted in some): the counted forward is the independent reference.
    model = build_model(name, pretrained=False, img_size=img_size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, 3, img_size, img_size))
    assert forward_flops(name, img_size) == counter.get_total_flops() > 0
    with pytest.raises(ValueError, match="model="):
        forward_flops("resnet50", 224)


def test_dino_vit_s16_flops_match_the_published_figure():
    # timm lists ViT-S/16 at 224 px as 4.6 GMACs per image (about 9.2 GFLOP): a check of the formula's scale.
    assert 9.1e9 < forward_flops("vit_small_patch16_224.dino", 224) < 9.3e9


def test_work_counts_follow_the_training_loops():
    c = make_config("centralized", "smoke", **SMALL, epochs=3, eval_every=2)
    n_train, n_val, n_test = split_sizes(c)
    assert n_train == train_split_size(c) and n_train + n_val == 600 and n_test == 100
    w = cost.run_work("centralized", c)
    assert w.train == 3 * n_train and w.forward == 2 * n_val + n_test and not w.shared  # val at epochs 2 and 3
    f = make_config("fedavg", "smoke", **SMALL, rounds=5, eval_every=5, num_clients=20, participation=0.2)
    w = cost.run_work("fedavg", f)
    assert w.train == 5 * clients_per_round(20, 0.2) * f["local_steps"] * 16 and w.forward == n_val + n_test
    probe = cost.run_work("centralized", make_config("centralized", "smoke", **SMALL, train_mode="head"))
    assert probe.train == probe.forward == 0 and list(probe.shared.values()) == [n_train + n_val + n_test]
    through = make_config("centralized", "smoke", **SMALL, train_mode="head", head_features="backbone")
    assert cost.run_work("centralized", through).forward == 2 * n_train + 2 * n_val + n_test


def test_editing_work_counts_calibration_only_for_sensitivity_rules():
    base = dict(**SMALL, num_clients=10, rounds=2, calibration_samples=16)
    talos = cost.run_work("sparse_fedavg", make_config("sparse_fedavg", "smoke", **base, calibration_rounds=3))
    magnitude = cost.run_work(
        "sparse_fedavg",
        make_config("sparse_fedavg", "smoke", **base, mask_rule="lowest_magnitude", calibration_rounds=1),
    )
    samples = 3 * min(10 * 16, 540)
    assert talos.scored - magnitude.scored == samples and magnitude.scored == 0
    assert talos.train == magnitude.train and talos.forward == magnitude.forward
    assert talos.shared == magnitude.shared  # the same step-0 head run serves both


def test_plan_counts_shared_work_once_and_runs_on_disk_as_done(tmp_path):
    probes = [make_config("centralized", "smoke", **SMALL, train_mode="head", lr=lr) for lr in (0.1, 0.2)]
    plan = [("centralized", c) for c in probes]
    one = cost.estimate_plan(plan[:1], tmp_path)
    two = cost.estimate_plan(plan, tmp_path)
    assert one.total_s > 0 and math.isclose(two.total_s, one.total_s)  # only the features cost anything
    full = make_config("centralized", "smoke", **SMALL, epochs=1)
    plan.append(("centralized", full))
    before = cost.estimate_plan(plan, tmp_path)
    assert before.done == 0 and math.isclose(before.left_s, before.total_s)
    run_centralized(full, run_root=tmp_path, progress=False)
    after = cost.estimate_plan(plan, tmp_path)
    own = cost.run_seconds("centralized", full)[0]
    assert after.done == 1 and math.isclose(after.left_s, before.total_s - own)
    assert "3 runs" in str(after) and "1 are already done" in str(after)


def test_measured_t4_benchmark_replaces_the_assumption(tmp_path, monkeypatch):
    flops = forward_flops("vit_small_patch16_224.dino", 224)
    train, forward, scored, source = cost.t4_throughput("vit_small_patch16_224.dino", 224)
    assert "assumed" in source and math.isclose(forward, cost.T4_PEAK_FLOPS * cost.ASSUMED_T4_MFU / flops)
    assert math.isclose(train * 3, forward)
    assert math.isclose(scored / train, cost.T4_FP32_PEAK_FLOPS / cost.T4_PEAK_FLOPS)  # scoring runs in fp32
    measured = {"device": "Tesla T4", "train_images_per_s": 123.0, "eval_images_per_s": 456.0}
    measured |= {"scoring_samples": 64, "scoring_vectorised_s": 2.0}
    (tmp_path / "full-cuda-2026-01-01.json").write_text(json.dumps(measured))
    (tmp_path / "full-cuda-2026-02-01.json").write_text(json.dumps({**measured, "device": "NVIDIA H200"}))
    monkeypatch.setattr(cost, "BENCH_DIR", tmp_path)
    assert cost.t4_throughput("vit_small_patch16_224.dino", 224)[:3] == (123.0, 456.0, 32.0)


@pytest.mark.parametrize("name", ["01_centralized", "02_fedavg_iid", "03_fedavg_noniid", "04_model_editing",
                                  "05_federated_editing", "06_mask_strategies"])  # fmt: skip
def test_every_notebook_exposes_its_plan(name):
    plan = notebook_plan(name, "smoke").runs
    assert plan and all(experiment in ("centralized", "fedavg", "sparse_centralized", "sparse_fedavg")
                        for experiment, _ in plan)  # fmt: skip
    assert all(config["profile"] == "smoke" for _, config in plan)


def test_notebook_plan_takes_parameters():
    plan = notebook_plan("02_fedavg_iid", "smoke", SEEDS=[0, 1, 2]).runs
    assert [c["seed"] for _, c in plan] == [0, 1, 2]


def test_cli_prints_every_notebook_a_total_and_the_source(capsys):
    cost.main(["--profile", "smoke"])
    lines = capsys.readouterr().out.strip().splitlines()
    source = lines.index(cost.t4_throughput("vit_tiny_smoke", 32)[-1])
    total = next(i for i, line in enumerate(lines) if line.startswith("total "))
    names = [line.split()[0] for line in lines[1 : total + 1]]
    stems = [p.stem for p in sorted(NOTEBOOKS.glob("0[1-6]_*.ipynb"))]
    assert lines[0].startswith("the complete plan")
    assert names == [*stems[:5], "05", "05", *stems[5:], "total"]  # "05 tuning", "05 extension": apart
    assert lines[total + 1].startswith("what the complete plan adds") and source == total + 2 + len(ADDITIONS)
    assert "T4" in lines[source] and LABEL in lines[source + 1]  # then the memory estimate, one line per phase
    assert len(lines) == source + 2 + 5 and all("vs a T4's 15 GiB" in line for line in lines[source + 2 :])


def test_a_step_0_head_run_done_on_disk_is_not_charged_again(tmp_path):
    """The head run a sparse FedAvg run trains first is shared work: once it is done (trained by another sparse run,
    or by one that crashed before its first round), what is left no longer counts it."""
    from helpers.editing.step0 import head_fedavg_config
    from helpers.federated.rounds import run_fedavg

    sparse = make_config("sparse_fedavg", "smoke", **SMALL, rounds=1, calibration_rounds=1)
    plan = [("sparse_fedavg", sparse)]
    before = cost.estimate_plan(plan, tmp_path)
    head = head_fedavg_config(sparse)
    ((key, seconds),) = [
        (k, s) for k, s in cost.run_seconds("sparse_fedavg", sparse)[1].items() if k.startswith("step0")
    ]
    assert run_fedavg(head, run_root=tmp_path, progress=False).done
    after = cost.estimate_plan(plan, tmp_path)
    assert seconds > 0 and math.isclose(after.total_s, before.total_s)
    assert after.done == 0 and math.isclose(after.left_s, before.left_s - seconds)
