"""The mask type (one shared mask or one per client, stored as bits) and the registry of mask rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.config.experiments import make_config, parameters
from helpers.core.models import backbone_parameters, build_model
from helpers.sparse import masks as masks_module
from helpers.sparse.masks import MASK_RULES, MaskRule, Masks, mask_rule, one_shot, overall_density
from helpers.sparse.sensitivity import calibrate_masks


def random_masks(seed: int, shapes=((3, 5), (7,), (2, 3, 4))) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.rand(s, generator=gen) < 0.4 for i, s in enumerate(shapes)}


def test_stored_masks_come_back_bit_for_bit_shared_and_per_client():
    shared = random_masks(0)
    back = Masks.unpack(Masks(shared=shared).pack())
    assert not back.local and back.names == list(shared)
    assert all(torch.equal(back.shared[n], m) and back.shared[n].dtype == torch.bool for n, m in shared.items())
    own = [random_masks(k) for k in range(3)]
    local = Masks.unpack(Masks.per_client(own).pack())
    assert local.local and local.names == list(own[0])
    for k, m in enumerate(own):
        got = local.of_client(k)
        assert all(torch.equal(got[n], m[n]) for n in m)


def test_density_and_entries_count_every_masked_entry():
    own = [random_masks(k) for k in range(3)]
    flat = [np.concatenate([m.numpy().ravel() for m in o.values()]) for o in own]
    local = Masks.per_client(own)
    assert local.entries() == flat[0].size == 3 * 5 + 7 + 24
    assert local.density() == pytest.approx(np.mean([f.mean() for f in flat]), abs=1e-12)
    assert Masks(shared=own[1]).density() == overall_density(own[1]) == pytest.approx(flat[1].mean(), abs=1e-12)


def test_a_shared_mask_is_the_same_object_for_every_client():
    """RoundSum relies on it: the union of one shared mask with itself is never computed."""
    shared = random_masks(0)
    masks = Masks(shared=shared)
    assert masks.of_client(0) is masks.of_client(5) is shared


def test_masks_hold_exactly_one_of_shared_or_per_client():
    with pytest.raises(ValueError, match="either one shared mask or one mask per client"):
        Masks()
    with pytest.raises(ValueError, match="either one shared mask or one mask per client"):
        Masks(shared=random_masks(0), packed_clients=(masks_module.pack(random_masks(1)),))


def test_the_registry_is_the_config_choice_and_names_the_bad_rule():
    assert parameters()["mask_rule"].choices == tuple(MASK_RULES)
    assert make_config("sparse_fedavg", "smoke")["mask_rule"] == next(iter(MASK_RULES))
    with pytest.raises(ValueError, match=r"mask_rule='largest'.*least_sensitive, most_sensitive"):
        mask_rule("largest")
    assert [r for r in MASK_RULES if not one_shot(r)] == ["least_sensitive", "most_sensitive"]
    with pytest.raises(ValueError, match="calibration_rounds=2 is invalid with mask_rule='random'"):
        make_config("sparse_fedavg", "smoke", mask_rule="random", calibration_rounds=2)


def test_a_new_rule_is_one_registry_entry(monkeypatch):
    """A one-shot rule registered with its score function is calibrated like the built-in ones."""
    model = build_model("vit_tiny_smoke", num_classes=100, pretrained=False, img_size=32)

    def flat_index(params, seed):  # score = the entry's position in model order
        out, start = {}, 0
        for n, p in params.items():
            out[n] = torch.arange(start, start + p.numel(), dtype=torch.float64).view(p.shape)
            start += p.numel()
        return out

    monkeypatch.setitem(MASK_RULES, "first_entries", MaskRule(keep_lowest=True, scores=flat_index))
    masks = calibrate_masks(model, lambda m: pytest.fail("a one-shot rule scores no data"), sparsity=0.75,
                            rule="first_entries")  # fmt: skip
    flat = torch.cat([masks[n].flatten() for n in backbone_parameters(model)])
    keep = round(0.25 * flat.numel())
    assert flat[:keep].all() and not flat[keep:].any()
