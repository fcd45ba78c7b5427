"""requirements.txt stays Colab-friendly (nothing pinned, so Colab's torch is never reinstalled) and constraints.txt
pins every package the requirement files name (the exact set the suite last passed with)."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def _requirements(name: str) -> list[Requirement]:
    lines = (REPO / name).read_text().splitlines()
    return [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def test_requirements_pin_nothing_colab_ships():
    assert all(not r.specifier and not r.url for r in _requirements("requirements.txt"))


def test_constraints_pin_every_required_package():
    pins = {canonicalize_name(r.name): r for r in _requirements("constraints.txt")}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pins.values())
    for file in ("requirements.txt", "requirements-flower.txt"):
        missing = [r.name for r in _requirements(file) if canonicalize_name(r.name) not in pins]
        assert not missing, f"{file}: {missing} not pinned in constraints.txt"
    flwr = next(r for r in _requirements("requirements-flower.txt") if r.name == "flwr")
    assert pins["flwr"].specifier == flwr.specifier  # the one pin requirements-flower.txt makes itself
