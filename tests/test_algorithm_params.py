"""The `algorithm` parameter and its own parameters: validated before any compute, refused for another algorithm,
left out of FedAvg configs (their run ids and results columns predate them), defaults filled in tidy results."""

from __future__ import annotations

import pandas as pd
import pytest
from smallrun import SMALL

from helpers.algorithms.registry import ALGORITHMS, algorithm_class
from helpers.config.experiments import make_config, remedy_parameters
from helpers.federated import rounds
from helpers.ops.cli import main
from helpers.reporting.results import tidy_results
from helpers.training import resumable
from helpers.training.runs import find_runs, metrics_file, run_id


@pytest.mark.parametrize("experiment", ["fedavg", "sparse_fedavg"])
def test_fedavg_configs_hold_no_remedy_parameter(experiment):
    plain = make_config(experiment, "smoke")
    assert set(plain) & set(remedy_parameters()) == {"server_lr"}  # FedAvg's own step, in its configs since the start
    explicit = make_config(experiment, "smoke", algorithm="fedavg", stragglers=0.0)
    assert explicit == plain and run_id(explicit) == run_id(plain)
    assert run_id(make_config(experiment, "smoke", stragglers=0.25)) != run_id(plain)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_config_holds_exactly_its_algorithms_parameters(name):
    config = make_config("fedavg", "smoke", algorithm=name)
    own = set(algorithm_class(name).params) | ({"algorithm"} if name != "fedavg" else set())
    assert set(config) & set(remedy_parameters()) == own


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
        rounds.run_fedavg(run_root=tmp_path, progress=False, **{**SMALL, **overrides})
    assert not any(tmp_path.iterdir())


def test_cli_exits_2_naming_the_parameter(capsys):
    assert main(["run", "fedavg", "--profile", "smoke", "--set", "prox_mu=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prox_mu=0.1 is invalid with algorithm='fedavg'") and err.count("\n") == 1


def test_tidy_results_fill_the_left_out_default(tmp_path):
    common = dict(SMALL, num_clients=4, participation=0.5, local_steps=1, rounds=1)
    runs = [rounds.run_fedavg(make_config("fedavg", "smoke", **common, **extra), run_root=tmp_path, progress=False)
            for extra in ({}, {"algorithm": "fedprox", "prox_mu": 0.1})]  # fmt: skip
    table = tidy_results(runs)
    assert table["algorithm"].tolist() == ["fedavg", "fedprox"]
    assert table["prox_mu"].isna().tolist() == [True, False]  # a parameter FedAvg does not have stays empty
    assert "algorithm" not in tidy_results(runs[:1])

    assert [r.id for r in find_runs("fedavg", tmp_path, num_clients=4)] == [runs[0].id]  # FedAvg's grid only
    assert [r.id for r in find_runs("fedavg", tmp_path, algorithm="fedprox")] == [runs[1].id]


# Each algorithm's defaults as its source states them, typed here from the papers (sources in docs/remedies.md):
# McMahan et al. 2017 Alg. 1; Reddi et al. 2021 App. D (best CIFAR-100 values: log10 server lr 0 for FedAdam and
# FedYogi, -1 for FedAdagrad; log10 tau -1 and -2; FedAvgM momentum 0.9 at server lr 1) and their runs' Keras
# defaults (beta1 0.9, beta2 0.999; Adagrad: no momentum); Li et al. 2020 (mu = 1 on MNIST and FEMNIST);
# Karimireddy et al. 2020 (global step size 1, option II).
PAPER_DEFAULTS = {
    "fedavg": {"server_lr": 1.0},
    "fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
    "fedprox": {"server_lr": 1.0, "prox_mu": 1.0},
    "scaffold": {"server_lr": 1.0, "scaffold_option": "II"},
    "fedadam": {"server_lr": 10**0, "server_beta1": 0.9, "server_beta2": 0.999, "server_tau": 10**-1},
    "fedyogi": {"server_lr": 10**0, "server_beta1": 0.9, "server_beta2": 0.999, "server_tau": 10**-1},
    "fedadagrad": {"server_lr": 10**-1, "server_beta1": 0.0, "server_tau": 10**-2},
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_alone_gets_its_papers_defaults(name):
    """`--set algorithm=X` alone: X's own parameters at its paper's values, each with its source written down."""
    config = make_config("fedavg", "smoke", algorithm=name)
    own = algorithm_class(name).params
    assert {p: config[p] for p in own} == PAPER_DEFAULTS[name]
    assert all(spec.source and spec.meaning for spec in own.values())
    assert run_id(make_config("fedavg", "smoke", algorithm=name, **PAPER_DEFAULTS[name])) == run_id(config)


NEW_ALGORITHM = '''"""FedHalf: FedAvg whose server moves a fraction `half_weight` of the way to the clients' average."""

import torch

from helpers.algorithms.fedavg import FedAvg
from helpers.core.params import Param


class FedHalf(FedAvg):
    name = "fedhalf"
    params = {**FedAvg.params, "half_weight": Param(float, "how far the server moves to the average", low=0, high=1,
                                                    default=0.5, source="this test")}

    def __init__(self, config):
        super().__init__(config)
        self.weight = config["half_weight"]

    @torch.no_grad()
    def server_step(self, start, avg):
        torch._foreach_lerp_(start, avg, self.weight)
'''


def test_a_new_algorithm_is_one_file_and_one_registry_line(tmp_path, monkeypatch, capsys):
    """A new algorithm with a new parameter: one module and one registry entry, nothing in helpers/config/; its
    parameter is validated, in `run --help`, and the run is FedAvg at server_lr = half_weight, weight for weight."""
    from helpers.algorithms.registry import Entry

    (tmp_path / "fedhalf.py").write_text(NEW_ALGORITHM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ALGORITHMS, "fedhalf", Entry("FedHalf", "fedhalf:FedHalf"))
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "half_weight (float)" in capsys.readouterr().out
    common = ["--profile", "smoke", *[f"--set={k}={v}" for k, v in {**SMALL, "rounds": 2}.items()]]
    assert main(["run", "fedavg", *common, "--set", "half_weight=1.5", "--run-root", str(tmp_path / "a")]) == 2
    assert "half_weight=1.5 is invalid" in capsys.readouterr().err
    assert main(["run", "fedavg", *common, "--set", "algorithm=fedhalf", "--set", "half_weight=0.25",
                 "--run-root", str(tmp_path / "new")]) == 0  # fmt: skip
    assert main(["run", "fedavg", *common, "--set", "server_lr=0.25", "--run-root", str(tmp_path / "fedavg")]) == 0
    new, reference = (next((tmp_path / d / "fedavg").glob("*")) for d in ("new", "fedavg"))
    assert '"half_weight": 0.25' in (new / "config.json").read_text()
    new_rows, reference_rows = (pd.read_csv(metrics_file(d)).drop(columns="elapsed_s") for d in (new, reference))
    pd.testing.assert_frame_equal(new_rows, reference_rows)  # the same rounds, losses, accuracies, drift
