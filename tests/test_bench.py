"""The benchmark runs end to end and reports every figure the targets are judged by (values not asserted)."""

import json

from helpers.ops import bench


def test_quick_bench_writes_every_measurement(tmp_path, capsys):
    bench.main(["--profile", "smoke", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("smoke-cpu-*.json")).read_text())
    for key in (
        "train_images_per_s",
        "eval_images_per_s",
        "augment_speedup",
        "augment_share_of_step",
        "scoring_speedup",
        "checkpoint_save_s",
        "checkpoint_load_s",
        "fedavg_overhead_ratio",
        "forward_gflops_per_image",
        "peak_host_mb",
        "torch",
        "date",
        "device",
        "head_cached_speedup",
        "head_steps_cached_s",
        "feature_extraction_images_per_s",
        "calibration_centralized_round_s",
        "calibration_federated_round_s",
        "round_vs_mean_ties",
        "round_vs_mean_interference",
        "ties_kept_mb_full",
    ):
        assert key in result, key
    assert result["train_images_per_s"] > 0 and 0 < result["fedavg_overhead_ratio"] < 10
    assert 0 < result["round_vs_mean_ties"] < 10 and 0 < result["round_vs_mean_interference"] < 10
    assert 800 < result["ties_kept_mb_full"] < 900  # 10 clients x 22 M fp32 weights of ViT-S/16
    assert "fedavg_overhead_ratio" in capsys.readouterr().out
    # one round at the profile's default counts: 256 images centrally, 3 per client over 100 clients
    assert result["calibration_centralized_samples"] == 256 and result["calibration_federated_samples"] == 300
    assert result["calibration_extrapolated"] is False and result["calibration_federated_round_s"] > 0
