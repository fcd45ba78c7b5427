"""The `algorithm` parameter and its own parameters: validated before any compute, refused for another algorithm,
left out of FedAvg configs (their run ids and results columns predate them), defaults filled in tidy results."""

from __future__ import annotations

import pytest
from smallrun import SMALL

from helpers.algorithms.registry import ALGORITHMS
from helpers.config.experiments import REMEDIES, make_config
from helpers.federated import rounds as fedavg
from helpers.ops.cli import main
from helpers.training import resumable
from helpers.training.runs import find_runs, run_id, tidy_results


@pytest.mark.parametrize("experiment", ["fedavg", "sparse_fedavg"])
def test_fedavg_configs_hold_no_remedy_parameter(experiment):
    plain = make_config(experiment, "smoke")
    assert not set(plain) & set(REMEDIES)
    explicit = make_config(experiment, "smoke", algorithm="fedavg", stragglers=0.0)
    assert explicit == plain and run_id(explicit) == run_id(plain)
    assert run_id(make_config(experiment, "smoke", stragglers=0.25)) != run_id(plain)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_config_holds_exactly_its_algorithms_parameters(name):
    config = make_config("fedavg", "smoke", algorithm=name)
    own = set(ALGORITHMS[name].params) | ({"algorithm"} if name != "fedavg" else set())
    assert set(config) & set(REMEDIES) == own


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prox_mu": 0.1}, r"^prox_mu=0.1 is invalid with algorithm='fedavg': .*'fedprox' \(algorithm: one of fedavg"),
        (
            {"algorithm": "fedadagrad", "server_beta2": 0.9},
            r"^server_beta2=0.9 is invalid with .*'fedadam' or 'fedyogi'",
        ),
        ({"algorithm": "fedavgm", "server_tau": 0.1}, r"^server_tau="),
        ({"algorithm": "fedsgd"}, r"^algorithm='fedsgd' is invalid: must be one of fedavg, fedavgm, fedprox, scaffold"),
        ({"algorithm": "fedavgm", "server_momentum": 1.0}, r"^server_momentum=1.0 is invalid: must be .*\[0, 1\)"),
        ({"algorithm": "fedprox", "prox_mu": -0.1}, r"^prox_mu=-0.1 is invalid: must be a number >= 0"),
        ({"algorithm": "fedadam", "server_tau": 0.0}, r"^server_tau=0.0 is invalid: must be a number > 0"),
        ({"algorithm": "fedyogi", "server_beta1": 1.0}, r"^server_beta1=1.0 is invalid"),
        (
            {"algorithm": "scaffold", "scaffold_option": "III"},
            r"^scaffold_option='III' is invalid: must be one of II, I",
        ),
        ({"stragglers": 1.0}, r"^stragglers=1.0 is invalid: must be a number in \[0, 1\)"),
        (
            {"algorithm": "scaffold", "node_failure": "drop"},
            r"^node_failure='drop' is invalid with .*'scaffold'.*'stop'",
        ),
    ],
)
def test_bad_algorithm_parameters_fail_before_compute(overrides, message, tmp_path, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("data or model loaded before validation")

    monkeypatch.setattr(resumable, "run_inputs", no_compute)
    with pytest.raises(ValueError, match=message):
        fedavg.run_fedavg(run_root=tmp_path, progress=False, **{**SMALL, **overrides})
    assert not any(tmp_path.iterdir())


def test_cli_exits_2_naming_the_parameter(capsys):
    assert main(["run", "fedavg", "--profile", "smoke", "--set", "prox_mu=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prox_mu=0.1 is invalid with algorithm='fedavg'") and err.count("\n") == 1


def test_tidy_results_fill_the_left_out_default(tmp_path):
    common = dict(SMALL, num_clients=4, participation=0.5, local_steps=1, rounds=1)
    runs = [fedavg.run_fedavg(make_config("fedavg", "smoke", **common, **extra), run_root=tmp_path, progress=False)
            for extra in ({}, {"algorithm": "fedprox", "prox_mu": 0.1})]  # fmt: skip
    table = tidy_results(runs)
    assert table["algorithm"].tolist() == ["fedavg", "fedprox"]
    assert table["prox_mu"].isna().tolist() == [True, False]  # a parameter FedAvg does not have stays empty
    assert "algorithm" not in tidy_results(runs[:1])

    assert [r.id for r in find_runs("fedavg", tmp_path, num_clients=4)] == [runs[0].id]  # FedAvg's grid only
    assert [r.id for r in find_runs("fedavg", tmp_path, algorithm="fedprox")] == [runs[1].id]
