"""Sensitivity scores (vs brute force), multi-round mask calibration, mask rules and statistics."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from helpers.core.models import backbone_parameters, build_model, is_head
from helpers.core.seeding import torch_generator
from helpers.sparse.mask_stats import mask_density_table, mask_jaccard, plot_mask_density
from helpers.sparse.masks import MASK_RULES, one_shot, overall_density
from helpers.sparse.sensitivity import calibrate_masks, compute_scores
from helpers.sparse.sgdm import SparseSGDM, masks_by_parameter

N_SAMPLES = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("vit_tiny_smoke", num_classes=100, pretrained=False, img_size=32)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N_SAMPLES, 3, 32, 32, generator=gen), torch.randint(0, 100, (N_SAMPLES,), generator=gen)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def brute_force_scores(model, x, y, method):
    """One backward per sample through the ordinary forward (fused attention, .grad)."""
    model.eval()
    if method == "talos":
        with torch.no_grad():
            probs = torch.softmax(model(x), -1)
        y = torch.multinomial(probs, 1, generator=torch_generator(0, "labels")).squeeze(1)
    scores = {n: torch.zeros_like(p) for n, p in backbone_parameters(model).items()}
    for i in range(len(x)):
        model.zero_grad()
        logits = model(x[i : i + 1])
        out = logits[0, y[i]] if method == "talos" else F.cross_entropy(logits, y[i : i + 1])
        out.backward()
        for n, p in backbone_parameters(model).items():
            scores[n] += p.grad.square()
    model.zero_grad(set_to_none=True)
    return scores


def assert_scores_close(got, want, rtol=1e-5):
    assert set(got) == set(want)
    for n in want:
        scale = want[n].abs().max()
        assert (got[n] - want[n]).abs().max() <= rtol * scale + 1e-12, n


@pytest.mark.parametrize("method", ["talos", "empirical"])
def test_vectorised_scores_equal_per_sample_backward(model, data, method):
    x, y = data
    model.train()
    before = snapshot(model)
    got = compute_scores(model, [(x[:4], y[:4]), (x[4:], y[4:])] if method == "empirical" else [(x, y)],
                         method=method, generator=torch_generator(0, "labels"), chunk_size=4)  # fmt: skip
    assert model.training  # mode restored
    assert_same_weights(model, before)
    assert all(not is_head(n) for n in got) and set(got) == set(backbone_parameters(model))
    assert_scores_close(got, brute_force_scores(model, x, y, method))


def test_batch_scores_are_squared_minibatch_gradients(model, data):
    x, y = data
    model.eval()
    got = compute_scores(model, [(x[:3], y[:3]), (x[3:], y[3:])], method="batch")
    assert not model.training
    want = {n: torch.zeros_like(p) for n, p in backbone_parameters(model).items()}
    for sl in (slice(0, 3), slice(3, None)):
        model.zero_grad()
        F.cross_entropy(model(x[sl]), y[sl]).backward()
        for n, p in backbone_parameters(model).items():
            want[n] += p.grad.square()
    model.zero_grad(set_to_none=True)
    assert_scores_close(got, want)


def test_scores_do_not_depend_on_chunk_size_and_are_seeded(model, data):
    x, y = data
    a = compute_scores(model, [(x, y)], generator=torch_generator(3, "l"), chunk_size=1)
    b = compute_scores(model, [(x, y)], generator=torch_generator(3, "l"))
    c = compute_scores(model, [(x, y)], generator=torch_generator(4, "l"))
    assert_scores_close(a, b)
    assert any(not torch.allclose(b[n], c[n]) for n in b)  # a different label draw changes talos scores
    with pytest.raises(ValueError, match="method"):
        compute_scores(model, [(x, y)], method="fisher")


def test_frozen_backbone_still_scored(model, data):
    """Scores use their own differentiable copies, so requires_grad=False on the model is irrelevant."""
    x, y = data
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        scores = compute_scores(model, [(x, y)], method="empirical")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert sum(float(s.sum()) for s in scores.values()) > 0


def vit(**kwargs):
    torch.manual_seed(0)
    base = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=10)
    return timm.models.vision_transformer.VisionTransformer(**{**base, **kwargs})


class ToyConvNet(torch.nn.Module):
    """A strided, padded, dilated Conv2d (not a patch embedding) and a Linear, then the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=2, dilation=2)
        self.norm = torch.nn.LayerNorm(4)
        self.fc = torch.nn.Linear(4, 8, bias=False)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.norm(self.conv(x).flatten(2).transpose(1, 2))  # (n, positions, channels)
        return self.head(torch.tanh(self.fc(h)).mean(1))


VARIANTS = {
    # DINOv2/DeiT-3 style: position embedding on patches only, register tokens, LayerScale, qk-norm,
    # Linear layers without bias, a pre-norm, average pooling with fc_norm.
    "no_embed_class": lambda: vit(
        no_embed_class=True,
        reg_tokens=2,
        init_values=0.1,
        qk_norm=True,
        qkv_bias=False,
        pre_norm=True,
        global_pool="avg",
    ),  # fmt: skip
    "no_class_token": lambda: vit(class_token=False, global_pool="avg"),
    "conv_net": ToyConvNet,
}


@pytest.mark.parametrize("method", ["talos", "empirical", "batch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_scores_equal_brute_force_on_variants(variant, method):
    """Every supported layer kind, against one backward per sample (batch: one backward per batch)."""
    net = VARIANTS[variant]()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, 16, 16, generator=gen), torch.randint(0, 10, (5,), generator=gen)
    with torch.no_grad():  # a caller's no_grad does not matter
        got = compute_scores(net, [(x, y)], method=method, generator=torch_generator(0, "labels"))
    assert all(p.requires_grad for p in net.parameters())  # flags switched off while scoring, restored
    if method == "batch":
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        want = {n: p.grad.square() for n, p in backbone_parameters(net).items()}
    else:
        want = brute_force_scores(net, x, y, method)
    assert all(s.dtype == torch.float32 for s in got.values())
    assert_scores_close(got, want)


@pytest.mark.parametrize(
    "net,match",
    [
        (lambda: vit(dynamic_img_size=True), "VisionTransformer"),
        (lambda: vit(global_pool="map"), "AttentionPoolLatent"),
        (lambda: vit(pos_embed="none"), "VisionTransformer"),  # its tokens skip pos_drop, the hook site
    ],
)
def test_unsupported_layers_rejected_before_any_compute(data, net, match):
    with pytest.raises(NotImplementedError, match=match):
        compute_scores(net(), iter(()))


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(self.fc(x)))


def test_module_called_twice_rejected():
    """Hooks see one input per module and forward: a reused module would get wrong scores, so it fails."""
    with pytest.raises(RuntimeError, match="twice"):
        compute_scores(Twice(), [(torch.zeros(2, 4), torch.zeros(2))], method="empirical")


# ----------------------------------------------------------------------------------------------
# Calibration


@pytest.fixture(scope="module")
def score_fn(data):
    x, y = data
    return lambda m: compute_scores(m, [(x, y)], generator=torch_generator(0, "calib"))


def n_backbone(model):
    return sum(p.numel() for p in backbone_parameters(model).values())


def n_trainable(masks):
    return sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("rule", MASK_RULES)
@pytest.mark.parametrize("sparsity", [0.9, 0.5])
def test_every_rule_gives_exact_density(model, score_fn, rule, sparsity):
    before = snapshot(model)
    rounds = 1 if one_shot(rule) else 3
    masks = calibrate_masks(model, score_fn, sparsity=sparsity, rounds=rounds, rule=rule)
    assert set(masks) == set(backbone_parameters(model))  # head never masked
    assert all(
        m.dtype == torch.bool and m.shape == p.shape
        for m, p in zip(masks.values(), backbone_parameters(model).values(), strict=True)
    )
    assert n_trainable(masks) == round((1 - sparsity) * n_backbone(model))
    assert_same_weights(model, before)


@pytest.mark.parametrize("rule", ["least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude"])
def test_one_round_keeps_the_right_end_of_the_scores(model, score_fn, rule):
    masks = calibrate_masks(model, score_fn, sparsity=0.7, rule=rule)
    if "magnitude" in rule:
        scores = {n: p.detach().abs() for n, p in backbone_parameters(model).items()}
    else:
        scores = score_fn(model)
    kept = torch.cat([scores[n][m] for n, m in masks.items()])
    frozen = torch.cat([scores[n][~m] for n, m in masks.items()])
    if rule in ("least_sensitive", "lowest_magnitude"):
        assert kept.max() <= frozen.min()
    else:
        assert kept.min() >= frozen.max()


def test_random_rule_is_seeded(model, score_fn):
    a = calibrate_masks(model, score_fn, sparsity=0.5, rule="random", seed=1)
    b = calibrate_masks(model, score_fn, sparsity=0.5, rule="random", seed=1)
    c = calibrate_masks(model, score_fn, sparsity=0.5, rule="random", seed=2)
    assert mask_jaccard(a, b) == 1.0 and mask_jaccard(a, c) < 0.5


@pytest.mark.parametrize("rule", [r for r in MASK_RULES if not one_shot(r)])
def test_multi_round_is_nested_and_changes_the_mask(model, score_fn, rule):
    history = []
    one = calibrate_masks(model, score_fn, sparsity=0.9, rounds=1, rule=rule)
    four = calibrate_masks(model, score_fn, sparsity=0.9, rounds=4, rule=rule, history=history)
    assert mask_jaccard(one, four) < 1.0  # the rounds are not a no-op
    assert len(history) == 4
    total = n_backbone(model)
    for r, masks in enumerate(history, start=1):
        assert n_trainable(masks) == round(0.1 ** (r / 4) * total)
    for prev, cur in zip(history, history[1:], strict=False):
        assert all(not (cur[n] & ~prev[n]).any() for n in cur)  # frozen entries never return
    assert all(torch.equal(four[n], history[-1][n]) for n in four)


def test_frozen_weights_damped_while_scoring_and_restored(model, score_fn):
    originals = {n: p.detach().clone() for n, p in backbone_parameters(model).items()}
    head = model.head.weight.detach().clone()
    seen = []

    def recording(m):
        seen.append({n: p.detach().clone() for n, p in backbone_parameters(m).items()})
        return score_fn(m)

    history = []
    calibrate_masks(model, recording, sparsity=0.8, rounds=2, history=history)
    assert all(torch.equal(seen[0][n], originals[n]) for n in originals)  # round 1 sees the model as is
    frozen = {n: ~m for n, m in history[0].items()}
    for n, w in seen[1].items():
        assert torch.equal(w[frozen[n]], originals[n][frozen[n]] * 0.1)
        assert torch.equal(w[~frozen[n]], originals[n][~frozen[n]])
    assert all(torch.equal(p, originals[n]) for n, p in backbone_parameters(model).items())
    assert torch.equal(model.head.weight, head)


def test_weights_restored_when_score_fn_raises(model, score_fn):
    before = snapshot(model)
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("client lost")
        return score_fn(m)

    with pytest.raises(RuntimeError, match="client lost"):
        calibrate_masks(model, failing, sparsity=0.9, rounds=3)
    assert_same_weights(model, before)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity="0.5"), "sparsity"),
        (dict(sparsity=True), "sparsity"),
        (dict(sparsity=0.5, rounds=0), "rounds"),
        (dict(sparsity=0.5, rounds=2.0), "rounds"),
        (dict(sparsity=0.5, rule="largest"), "rule"),
        (dict(sparsity=0.5, rule="lowest_magnitude", rounds=2), "rounds only apply to sensitivity rules"),
        (dict(sparsity=0.5, rule="random", rounds=4), "rounds only apply to sensitivity rules"),
    ],
)
def test_bad_calibration_inputs_rejected_before_any_compute(model, kwargs, param):
    def never(m):
        raise AssertionError("score_fn must not run before validation")

    with pytest.raises(ValueError, match=param):
        calibrate_masks(model, never, **kwargs)


def test_bad_scores_rejected(model):
    with pytest.raises(ValueError, match="score_fn"):
        calibrate_masks(model, lambda m: {"cls_token": torch.zeros(1, 1, 64)}, sparsity=0.5)


# ----------------------------------------------------------------------------------------------
# Statistics, plot, and the masks in use


def test_density_table_jaccard_and_plot(model, score_fn):
    least = calibrate_masks(model, score_fn, sparsity=0.5, rule="least_sensitive")
    most = calibrate_masks(model, score_fn, sparsity=0.5, rule="most_sensitive")
    table = mask_density_table(least, model)
    assert list(table.columns) == ["name", "entries", "trainable", "density"]
    assert list(table["name"]) == list(backbone_parameters(model))
    assert table["trainable"].sum() / table["entries"].sum() == pytest.approx(overall_density(least))
    assert overall_density(least) == pytest.approx(0.5, abs=1e-4)
    # At 50% density, least- and most-sensitive are complements (up to ties).
    assert mask_jaccard(least, least) == 1.0 and mask_jaccard(least, most) < 0.01
    with pytest.raises(ValueError, match="masks"):
        mask_density_table({"head.weight": torch.ones(100, 64, dtype=torch.bool)}, model)
    fig = plot_mask_density(least)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == 6  # cls, pos, patch_embed, 2 blocks, norm
    assert len(plot_mask_density(least, by="tensor").axes[0].patches) == len(least)


def test_calibrated_masks_drive_sparse_sgdm(model, data, score_fn):
    """End to end: frozen backbone entries do not move; the dense head and trainable entries do."""
    x, y = data
    masks = calibrate_masks(model, score_fn, sparsity=0.9, rounds=2)
    trained = build_model("vit_tiny_smoke", num_classes=100, pretrained=False, img_size=32)
    trained.load_state_dict(model.state_dict())
    before = snapshot(trained)
    opt = SparseSGDM(trained.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                     masks=masks_by_parameter(trained, masks))  # fmt: skip
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        opt.step()
    for n, p in backbone_parameters(trained).items():
        assert torch.equal(p[~masks[n]], before[n][~masks[n]])
    assert not torch.equal(trained.head.weight, before["head.weight"])
    assert any(not torch.equal(p[masks[n]], before[n][masks[n]]) for n, p in backbone_parameters(trained).items())
