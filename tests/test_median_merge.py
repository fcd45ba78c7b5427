"""merge=median, the robust aggregation (issue 34): each entry's median over the round's clients, as numpy (and
Flower's FedMedian) computes it; a hostile minority cannot drag the global model, where the mean follows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord  # noqa: E402
from test_node_faults import IID, SMALL, flower_run, run_weights, task_identity  # noqa: E402, F401

from helpers.algorithms.merging import MERGE_RULES  # noqa: E402
from helpers.config.experiments import make_config  # noqa: E402
from helpers.federated.clients import sample_clients  # noqa: E402


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_the_median_rule_is_numpys_median_per_entry(m):
    gen = torch.Generator().manual_seed(m)
    start = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    weights = [[torch.randn(w.shape, generator=gen) for w in start] for _ in range(m)]
    got = MERGE_RULES["median"](start, weights, [1 / m] * m, 0.2)
    for i in range(len(start)):
        want = np.median(np.stack([w_k[i].numpy() for w_k in weights]), axis=0)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=0, atol=1e-7)


def test_a_hostile_minority_moves_the_median_little_and_the_mean_far(tmp_path):
    """update_bound off, one of three clients sends its update plus 1e3: the median run stays within the honest
    clients' reach of the honest median run; the mean run is dragged by about 1e3 / 3."""
    config = make_config("fedavg", "smoke", **{**SMALL, "rounds": 1}, **IID, update_bound=0.0)  # then the mean diverges
    victim = sample_clients(config["seed"], 0, config["num_clients"], config["participation"])[0]

    def poison(message, reply):
        task = message.content["task"] if "task" in message.content else None
        if task is not None and task["op"] == "train" and int(task["client"]) == victim and not reply.has_error():
            sent = reply.content["weights"].to_torch_state_dict()
            reply.content["weights"] = ArrayRecord({n: w + 1e3 for n, w in sent.items()})
        return [reply]

    def gap(merge: str) -> float:
        conf = {**config, "merge": merge} if merge != "mean" else config
        honest = run_weights(flower_run(conf, tmp_path / merge / "honest"))
        poisoned = run_weights(flower_run(conf, tmp_path / merge / "poisoned", tamper=poison))
        return max((poisoned[n] - honest[n]).abs().max().item() for n in honest)

    assert gap("median") < 1.0 < 100 < gap("mean")
