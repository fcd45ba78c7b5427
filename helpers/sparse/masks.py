"""The mask type of sparse fine-tuning and the registry of mask rules.

A mask says which entries of each masked parameter train (True) and which stay frozen. `Masks` is the one form the
runners, engines and storage pass around: one mask for every client, or one per client (mask_scope="local").
`MASK_RULES` names every way to choose the trainable entries; config, calibration, notebooks and the report read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from helpers.core.seeding import torch_generator

TensorMasks = dict[str, Tensor]  # parameter name -> bool mask of its shape (True = trainable)
Packed = dict[str, tuple[tuple[int, ...], Tensor]]  # parameter name -> (shape, the mask's bits as uint8)


# ----------------------------------------------------------------------------- mask rules


def magnitude_scores(params: Mapping[str, Tensor], seed: int) -> TensorMasks:
    """|w|: the magnitude rules rank the weights themselves."""
    return {n: p.detach().abs() for n, p in params.items()}


def random_scores(params: Mapping[str, Tensor], seed: int) -> TensorMasks:
    """A seeded uniform draw per entry, on the CPU in model order: the same mask on every device."""
    gen = torch_generator(seed, "mask_random")
    return {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}


@dataclass(frozen=True)
class MaskRule:
    """How a rule ranks the entries and which end it keeps trainable.

    `scores` None: sensitivity scores from calibration (TaLoS' rounds apply); else a one-shot score function
    (params, seed) -> scores that needs no data.
    """

    keep_lowest: bool
    scores: Callable[[Mapping[str, Tensor], int], TensorMasks] | None = None
    summary: str = ""

    @property
    def one_shot(self) -> bool:
        """Scored once without data: calibration rounds do not apply and no client computes anything."""
        return self.scores is not None


MASK_RULES: dict[str, MaskRule] = {
    "least_sensitive": MaskRule(True, None, "TaLoS: the entries with the lowest summed sensitivity (diagonal Fisher)"),
    "most_sensitive": MaskRule(False, None, "the entries with the highest sensitivity"),
    "lowest_magnitude": MaskRule(True, magnitude_scores, "the smallest weights |w|"),
    "highest_magnitude": MaskRule(False, magnitude_scores, "the largest weights |w|"),
    "random": MaskRule(True, random_scores, "a seeded uniform random subset"),
}


def mask_rule(name: str) -> MaskRule:
    """The rule called `name` (the `mask_rule` parameter), or a ValueError listing the rules."""
    if name not in MASK_RULES:
        raise ValueError(f"mask_rule={name!r} is not supported; allowed: {', '.join(MASK_RULES)}")
    return MASK_RULES[name]


def one_shot(name: str) -> bool:
    """True for the rules scored once without data (magnitude, random): calibration rounds do not apply."""
    return mask_rule(name).one_shot


# ----------------------------------------------------------------------------- the mask type


def pack(masks: Mapping[str, Tensor]) -> Packed:
    """Bool masks as bits (8x smaller on disk and in memory): name -> (shape, uint8 tensor)."""
    bits = {n: np.packbits(m.bool().cpu().numpy().ravel()) for n, m in masks.items()}
    return {n: (tuple(m.shape), torch.from_numpy(bits[n])) for n, m in masks.items()}


def unpack(packed: Mapping[str, tuple], device: str | torch.device = "cpu") -> TensorMasks:
    """The bool masks (True = trainable) of pack's output, on `device`."""
    out = {}
    for n, (shape, bits) in packed.items():
        flat = np.unpackbits(bits.numpy(), count=math.prod(shape)).astype(bool)
        out[n] = torch.from_numpy(flat).view(shape).to(device)
    return out


def overall_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of all masked entries that are trainable."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.count_nonzero()) for m in masks.values()) / max(total, 1)


@dataclass(frozen=True)
class Masks:
    """Which entries of the masked parameters train: one `shared` mask for every client, or one per client.

    Per-client masks stay packed (1 bit per entry) until a client trains: 100 unpacked ViT-S/16 masks take 2 GB.
    """

    shared: Mapping[str, Tensor] | None = None
    packed_clients: tuple[Packed, ...] = ()
    device: str | torch.device = "cpu"

    def __post_init__(self):
        if (self.shared is None) == (not self.packed_clients):
            raise ValueError("Masks holds either one shared mask or one mask per client")

    @classmethod
    def per_client(cls, masks: list[Mapping[str, Tensor]], device: str | torch.device = "cpu") -> Masks:
        """One mask per client, in client order."""
        return cls(packed_clients=tuple(pack(m) for m in masks), device=device)

    @property
    def local(self) -> bool:
        """One mask per client (mask_scope="local")."""
        return self.shared is None

    @property
    def names(self) -> list[str]:
        """The masked parameters' names."""
        return list(self.shared if self.shared is not None else self.packed_clients[0])

    def of_client(self, k: int) -> Mapping[str, Tensor]:
        """The mask client `k` trains with (the shared one itself, not a copy, when there is one)."""
        return self.shared if self.shared is not None else unpack(self.packed_clients[k], self.device)

    def entries(self) -> int:
        """Masked entries (trainable or not) of one client's mask."""
        if self.shared is not None:
            return sum(m.numel() for m in self.shared.values())
        return sum(math.prod(shape) for shape, _ in self.packed_clients[0].values())

    def density(self) -> float:
        """Trainable fraction of the masked entries (the mean over clients for per-client masks)."""
        if self.shared is not None:
            return overall_density(self.shared)
        return float(np.mean([overall_density(unpack(p)) for p in self.packed_clients]))

    def pack(self) -> Packed | list[Packed]:
        """The stored form: one packed mask, or a list of them (one per client)."""
        return pack(self.shared) if self.shared is not None else list(self.packed_clients)

    @classmethod
    def unpack(cls, stored: Packed | list[Packed], device: str | torch.device = "cpu") -> Masks:
        """Masks from their stored form (pack's output); per-client masks stay packed until used."""
        if isinstance(stored, list):
            return cls(packed_clients=tuple(stored), device=device)
        return cls(shared=unpack(stored, device), device=device)
