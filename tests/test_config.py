"""Validation: every bad parameter is refused with a message naming it and the allowed values."""

import pytest

from helpers.algorithms.registry import ALGORITHMS, algorithm_class
from helpers.config.experiments import (
    EXPERIMENTS,
    experiment_parameters,
    make_config,
    parameters,
    profile_defaults,
    remedy_parameters,
    resolve_profile,
)
from helpers.config.parsing import parse_sets, parse_value
from helpers.ops.cli import main

BAD = [
    ("val_fraction", 0.0, "(0, 1)"),
    ("val_fraction", 1.0, "(0, 1)"),
    ("batch_size", 0, ">= 1"),
    ("batch_size", 2.5, "integer"),
    ("lr", 0.0, "> 0"),
    ("lr", float("nan"), "> 0"),
    ("lr", "0.1", "number"),
    ("momentum", 1.0, "[0, 1)"),
    ("weight_decay", -1e-4, ">= 0"),
    ("epochs", 0, ">= 1"),
    ("scheduler", "linear", "cosine, step, constant, warmup_cosine"),
    ("augment", "flip", "crop, rrc, none"),
    ("train_mode", "sparse", "full, head"),
    ("img_size", 8, "[16, 1024]"),
    ("pretrained", 1, "true or false"),
    ("gamma", 0.0, "(0, 1]"),
    ("device", "tpu", "auto, cpu, cuda"),
    ("amp", "fp8", "auto, fp16, bf16, fp32"),
    ("deterministic", "yes", "true or false"),
    ("seed", -1, ">= 0"),
]


@pytest.mark.parametrize("name,value,allowed", BAD)
def test_bad_value_names_parameter_and_allowed(name, value, allowed):
    with pytest.raises(ValueError) as err:
        make_config("centralized", "smoke", **{name: value})
    assert name in str(err.value) and allowed in str(err.value)


def test_unknown_parameter_and_experiment():
    with pytest.raises(ValueError, match="unknown parameter.*nc.*allowed"):
        make_config("centralized", "smoke", nc=5)
    with pytest.raises(ValueError, match="experiment='central' is unknown"):
        make_config("central", "smoke")


def test_combinations(monkeypatch):
    monkeypatch.delenv("FLME_PROFILE", raising=False)
    with pytest.raises(ValueError, match="warmup_epochs"):
        make_config("centralized", "smoke", scheduler="warmup_cosine", warmup_epochs=2, epochs=2)
    with pytest.raises(ValueError, match="pretrained"):
        make_config("centralized", "smoke", pretrained=True)
    with pytest.raises(ValueError, match="img_size.*multiple of 16"):
        make_config("centralized", "full", img_size=200)


def test_profiles_and_overrides(monkeypatch):
    monkeypatch.delenv("FLME_PROFILE", raising=False)
    full = make_config("centralized", "full")
    assert full["model"] == "vit_small_patch16_224.dino" and full["pretrained"] and full["img_size"] == 224
    smoke = make_config("centralized", "smoke", lr=0.123, epochs=7)
    assert smoke["dataset"] == "synthetic" and smoke["lr"] == 0.123 and smoke["epochs"] == 7
    # parameters at their `omitted_at` value (amp=auto, deterministic=false) are left out: old run ids and CSVs hold
    names, params = experiment_parameters("centralized"), parameters()
    added = {n for n in names if params[n].omitted_at is not None}
    assert added >= {"amp", "deterministic"} and set(smoke) == set(names) - added
    assert set(make_config("centralized", "smoke", amp="fp32", deterministic=True)) == set(names)
    assert make_config("centralized", "smoke", lr=1)["lr"] == 1.0  # ints accepted for floats
    # full federated runs validate every 5th round; epochs and smoke rounds every time; an explicit value wins
    assert full["eval_every"] == 1 and make_config("fedavg", "smoke")["eval_every"] == 1
    assert make_config("fedavg", "full")["eval_every"] == make_config("sparse_fedavg", "full")["eval_every"] == 5
    assert make_config("fedavg", "full", eval_every=1)["eval_every"] == 1
    monkeypatch.setenv("FLME_PROFILE", "smoke")
    assert resolve_profile("full") == "smoke"  # the environment wins over the notebook parameter
    monkeypatch.setenv("FLME_PROFILE", "huge")
    with pytest.raises(ValueError, match="FLME_PROFILE='huge'.*smoke, full"):
        resolve_profile("full")


def test_parse_value_types():
    assert parse_value("lr", "0.5") == 0.5 and parse_value("epochs", "3") == 3
    assert parse_value("eval_test", "false") is False and parse_value("scheduler", "step") == "step"
    for name, text in [("epochs", "three"), ("eval_test", "maybe")]:
        with pytest.raises(ValueError, match=name):
            parse_value(name, text)
    assert parse_sets(["lr=0.1", "epochs = 2"], "centralized") == {"lr": 0.1, "epochs": 2}
    with pytest.raises(ValueError, match="name=value"):
        parse_sets(["lr"], "centralized")


def test_every_param_has_a_default_in_both_profiles():
    params = parameters()
    for exp in EXPERIMENTS:
        names = experiment_parameters(exp)
        for profile, algorithm in ((p, a) for p in ("smoke", "full") for a in ALGORITHMS):
            others = set(remedy_parameters()) - set(algorithm_class(algorithm).params) - {"algorithm", "stragglers"}
            defaults = profile_defaults(exp, profile, algorithm)
            assert set(defaults) == set(names) - others  # every parameter but the other algorithms' own ones
            omitted = {n for n, v in defaults.items() if v == params[n].omitted_at}
            omitted |= {"merge_density"} & set(names)  # merge=ties's own parameter: out of mean configs
            # and FedAvg's configs hold no other algorithm's parameters (run ids from before the remedies stay)
            if algorithm == "fedavg":
                assert set(make_config(exp, profile)) == set(names) - omitted - others
    assert {n for e in EXPERIMENTS for n in experiment_parameters(e)} <= set(params)


def test_cli_errors_are_one_line(capsys):
    assert main(["run", "centralized", "--set", "lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lr=-1.0 is invalid") and "\n" not in err and "Traceback" not in err
    assert main(["run", "centralized", "--set", "nc=3"]) == 2
    assert "unknown parameter 'nc'" in capsys.readouterr().err
    assert main(["run", "fedavg", "--set", "amp=fp8"]) == 2
    assert capsys.readouterr().err.strip() == "error: amp='fp8' is invalid: must be one of auto, fp16, bf16, fp32"
