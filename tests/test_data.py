"""Data: stratified split, synthetic data, batches, and on-device augmentation exactness."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_batch,
    eval_batch,
    make_synthetic,
    step_batches,
    stratified_split,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalise(x):
    return (x.float() / 255 - MEAN) / STD


def test_stratified_split_is_exact_disjoint_and_seeded():
    labels = np.repeat(np.arange(100), 500)
    train, val = stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.all(np.bincount(labels[val], minlength=100) == 50)
    assert np.all(np.bincount(labels[train], minlength=100) == 450)
    again, _ = stratified_split(labels, 0.1, seed=0)
    other, _ = stratified_split(labels, 0.1, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.5, seed=0)


def test_synthetic_shapes_and_determinism():
    x, y, tx, ty = make_synthetic(400, 200, seed=3)
    assert x.shape == (400, 3, 32, 32) and x.dtype == torch.uint8 and tx.shape == (200, 3, 32, 32)
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(100))
    assert torch.equal(make_synthetic(400, 200, seed=3)[0], x)
    assert not torch.equal(make_synthetic(400, 200, seed=4)[0], x)


def test_step_batches_without_replacement_then_wrap():
    pool = torch.arange(10, 20)
    b = step_batches(pool, 4, 5, torch.Generator().manual_seed(0))  # 20 draws = two passes over 10
    flat = b.flatten()
    assert b.shape == (5, 4) and set(flat.tolist()) <= set(pool.tolist())
    assert sorted(flat[:10].tolist()) == list(range(10, 20)) and sorted(flat[10:].tolist()) == list(range(10, 20))


def test_eval_batch_native_size_is_exact_normalisation():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(eval_batch(x, img_size=32), normalise(x), atol=1e-5)
    up = eval_batch(x, img_size=64)
    ref = F.interpolate(normalise(x), size=64, mode="bilinear", align_corners=False)
    assert up.shape == (5, 3, 64, 64) and torch.allclose(up, ref, atol=1e-4)


@pytest.mark.parametrize("img_size", [32, 56])
def test_crop_is_a_padded_crop_with_optional_flip_then_resize(img_size):
    # Every augmented image equals one of the 9x9x2 reference crops of the zero-padded (black) image, as torchvision's
    # RandomCrop(32, padding=4) + RandomHorizontalFlip, then normalised and bilinearly resized.
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = img.expand(64, -1, -1, -1)
    out = augment_batch(batch, torch.Generator().manual_seed(1), img_size=img_size, mode="crop")
    padded = F.pad(img.float(), (4, 4, 4, 4))
    refs = []
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, :, dy : dy + 32, dx : dx + 32]
            for view in (crop, crop.flip(-1)):
                refs.append(F.interpolate(normalise(view), size=img_size, mode="bilinear", align_corners=False))
    refs = torch.cat(refs)
    dist = (out[:, None] - refs[None]).abs().flatten(2).amax(-1)
    assert torch.all(dist.min(1).values < 1e-4)
    assert len({int(i) for i in dist.argmin(1)}) > 20  # different samples get different crops
    flipped = dist.argmin(1) % 2  # odd references are the mirrored crops
    assert 0 < int(flipped.sum()) < len(out)


def test_augment_shapes_ranges_determinism_and_modes():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    lo, hi = ((0 - MEAN) / STD).min(), ((1 - MEAN) / STD).max()
    for mode in ("crop", "rrc", "none"):
        out = augment_batch(x, torch.Generator().manual_seed(0), img_size=48, mode=mode)
        again = augment_batch(x, torch.Generator().manual_seed(0), img_size=48, mode=mode)
        assert out.shape == (16, 3, 48, 48) and out.dtype == torch.float32
        assert out.min() >= lo - 1e-4 and out.max() <= hi + 1e-4
        assert torch.equal(out, again)
    same = x[:1].expand(16, -1, -1, -1)
    rrc = augment_batch(same, torch.Generator().manual_seed(0), img_size=32, mode="rrc")
    assert (rrc[1:] - rrc[:1]).abs().flatten(1).amax(1).min() > 0  # per-sample, not per-batch
    with pytest.raises(ValueError, match="augment='cutout'"):
        augment_batch(x, torch.Generator(), img_size=32, mode="cutout")
