"""Systems heterogeneity: how many local steps a sampled client runs, a pure function of (seed, round, client).

With `stragglers` = p, each sampled client is a straggler with probability p and then runs a number of steps drawn
uniformly from 1..J (the FedProx paper's stragglers: a uniform share of the local work); the others run all J.
A straggler's steps are the first steps of its full-work run (same batches, same augmentation draws).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from helpers.config.experiments import setting
from helpers.core.seeding import torch_generator


def expected_local_steps(config: Mapping) -> float:
    """The mean of local_steps over clients and rounds: (1 - p) J + p (J + 1) / 2."""
    p, steps = setting(config, "stragglers"), config["local_steps"]
    return steps if p == 0 else (1 - p) * steps + p * (steps + 1) / 2


def local_steps(config: Mapping, rnd: int, client: int) -> int:
    """Local steps of `client` in round `rnd` (0-based): J, or fewer for a straggler."""
    p, steps = setting(config, "stragglers"), config["local_steps"]
    if p == 0:
        return steps
    gen = torch_generator(config["seed"], "straggler", rnd, client)
    straggles = torch.rand((), generator=gen).item() < p
    return int(torch.randint(1, steps + 1, (), generator=gen)) if straggles else steps
