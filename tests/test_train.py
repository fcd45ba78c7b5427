"""The one training loop, evaluation, schedules, and the centralized experiment on synthetic data."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from helpers.config.experiments import make_config, train_split_size
from helpers.core.models import build_model, set_trainable
from helpers.data.datasets import eval_batch, make_synthetic
from helpers.training.centralized import run_centralized
from helpers.training.loop import NonFiniteLossError, evaluate, lr_at
from helpers.training.runs import checkpoint_files, load_checkpoint


def test_schedules():
    kw = dict(base_lr=0.1, total_steps=100)
    assert lr_at(0, scheduler="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(50, scheduler="cosine", **kw) == pytest.approx(0.05)
    assert lr_at(100, scheduler="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert [lr_at(s, scheduler="step", step_size=30, gamma=0.5, **kw) for s in (0, 29, 30, 60)] == [
        0.1,
        0.1,
        0.05,
        0.025,
    ]
    warm = [lr_at(s, scheduler="warmup_cosine", warmup_steps=10, **kw) for s in range(100)]
    assert warm[:10] == sorted(warm[:10]) and warm[9] == pytest.approx(0.1) and warm[-1] < 0.001
    assert lr_at(77, scheduler="constant", **kw) == 0.1
    with pytest.raises(ValueError, match="scheduler"):
        lr_at(0, scheduler="linear", **kw)


def test_evaluate_matches_manual_computation():
    x, y, _, _ = make_synthetic(250, 100)
    torch.manual_seed(0)
    model = build_model("vit_tiny_smoke", pretrained=False, img_size=32).eval()
    got = evaluate(model, x, y, img_size=32, batch_size=64)
    with torch.no_grad():
        logits = model(eval_batch(x, img_size=32))
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert got["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_head_mode_trains_only_the_head():
    model = build_model("vit_tiny_smoke", pretrained=False, img_size=32)
    params = set_trainable(model, "head")
    assert [p.shape for p in params] == [model.head.weight.shape, model.head.bias.shape]
    with pytest.raises(ValueError, match="train_mode"):
        set_trainable(model, "sparse")


def test_centralized_beats_chance_on_synthetic_data(tmp_path):
    run = run_centralized(run_root=tmp_path, profile="smoke", epochs=3, progress=False)
    m = run.metrics()
    assert list(m["epoch"]) == [1, 2, 3] and m["train_loss"].iloc[-1] < m["train_loss"].iloc[0]
    assert run.summary()["test_acc"] > 0.10  # chance is 0.01
    assert {"val_loss", "val_acc", "test_loss", "test_acc", "current_lr", "elapsed_s"} <= set(m.columns)


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    config = make_config("centralized", "smoke", lr=1e6, momentum=0.0, epochs=2, synthetic_train_size=300)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1: training loss became (nan|inf)"):
        run_centralized(config, run_root=tmp_path, progress=False)
    folder = next((tmp_path / "centralized").iterdir())
    assert not checkpoint_files(folder) and not (folder / "done.json").exists()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_run_matches_eager_and_keeps_checkpoint_names(tmp_path):
    small = dict(synthetic_train_size=600, synthetic_test_size=100, batch_size=16, device="cpu", epochs=2)
    eager = run_centralized(make_config("centralized", "smoke", **small), run_root=tmp_path / "a", progress=False)
    compiled_config = make_config("centralized", "smoke", **small, compile=True)
    compiled = run_centralized(compiled_config, run_root=tmp_path / "b", progress=False)
    assert compiled.id == eager.id  # compile is bookkeeping: the same run, the same folder name
    a, b = load_checkpoint(eager)["model"], load_checkpoint(compiled)["model"]
    assert list(a) == list(b)  # in-place compile: no "_orig_mod." prefix in the checkpoint
    # Compiled kernels fuse and reorder float operations (differently in every torch version): after ~70 steps the
    # two runs agree to rounding, not bit for bit; an accuracy may differ by one flipped prediction.
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
    losses, accuracies = ["train_loss", "val_loss", "test_loss"], ["val_acc", "test_acc"]
    ma, mb = eager.metrics(), compiled.metrics()
    torch.testing.assert_close(torch.tensor(ma[losses].to_numpy(float)), torch.tensor(mb[losses].to_numpy(float)),
                               atol=1e-4, rtol=1e-3, equal_nan=True)  # fmt: skip
    one = 1 / (600 - train_split_size(compiled_config))  # one prediction of the val split (60 < 100 test images)
    assert (ma[accuracies] - mb[accuracies]).abs().max().max() <= one + 1e-9
