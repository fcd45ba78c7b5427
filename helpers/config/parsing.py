"""Parameters as text: `--set name=value` pairs and notebook lists to typed values, the parameter help of
`run --help` (built from the schema: every parameter's meaning, type, allowed values and defaults), and the close
names suggested for a misspelt one."""

from __future__ import annotations

import ast
import difflib
import re

from helpers.config.experiments import (
    algorithm_params,
    experiment_parameters,
    parameters,
    profile_defaults,
)
from helpers.core.params import Param
from helpers.core.settings import PROFILES

INTEGER = re.compile(r"^[+-]?\d+$")  # `rounds=1e3` or `rounds=4.0` is not an integer


def as_list(value: object) -> list:
    """A notebook list parameter as a list: papermill `-p NAME "[1, 5]"` passes text, `-y` passes a list."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{value!r} is not a list: write it like [1, 5] (or pass it with papermill -y)") from None
    return list(value) if isinstance(value, (list, tuple)) else [value]


def close_names(name: str, names: list[str] | tuple[str, ...]) -> str:
    """' (did you mean rounds?)' for a misspelt name close to known ones, else ''."""
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def parse_value(name: str, text: str) -> object:
    """Convert a command-line string (`--set name=text`) to the parameter's type, then check it is allowed."""
    params = parameters()
    if name not in params:
        raise ValueError(f"unknown parameter {name!r}{close_names(name, list(params))}")
    spec = params[name]
    value = _typed(spec, text.strip())
    if value is None:
        raise ValueError(f"{name}={text!r} is invalid: must be {spec.allowed()}")
    return spec.check(name, value)


def _typed(spec: Param, text: str) -> object | None:
    """`text` as the parameter's type, or None if it is not one."""
    if spec.kind is bool:
        low = text.lower()
        return True if low in ("1", "true", "yes", "on") else False if low in ("0", "false", "no", "off") else None
    if spec.kind is int:
        return int(text) if INTEGER.match(text) else None
    if spec.kind is float:
        try:
            return float(text)
        except ValueError:
            return None
    return text


def parse_sets(pairs: list[str], experiment: str) -> dict:
    """['lr=0.1', 'epochs=3'] -> {'lr': 0.1, 'epochs': 3}, typed and checked; a name the experiment does not have
    is refused with the closest names."""
    names = experiment_parameters(experiment)
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r} is invalid: must look like name=value")
        name, text = (part.strip() for part in pair.split("=", 1))
        if name not in names:
            raise ValueError(
                f"unknown parameter {name!r} for experiment {experiment!r}{close_names(name, names)}; "
                f"allowed: {', '.join(sorted(names))}"
            )
        out[name] = parse_value(name, text)
    return out


def describe_parameters(experiments: list[str]) -> str:
    """Every parameter of `experiments`: its meaning, type, allowed values and each profile's default; an
    algorithm's own parameter lists each algorithm's default (from its paper)."""
    params, owners = parameters(), algorithm_params()
    defaults = {(e, p): profile_defaults(e, p) for e in experiments for p in PROFILES}
    lines = []
    for name in dict.fromkeys(n for e in experiments for n in experiment_parameters(e)):
        users = [e for e in experiments if name in experiment_parameters(e)]
        spec = params[name]
        only = f" ({', '.join(users)} only)" if len(users) < len(experiments) else ""
        lines.append(f"  {name} ({spec.kind.__name__}){only}: {spec.meaning}")
        by_algorithm = {a: own[name].default for a, own in owners.items() if name in own}
        if name == "profile":
            lines.append(f"      set by --profile ({spec.allowed()}); $FLME_PROFILE wins")
        elif by_algorithm:
            shown = ", ".join(f"{a} {_text(v)}" for a, v in by_algorithm.items())
            lines.append(f"      default per algorithm: {shown}; allowed: {spec.allowed()}")
        else:
            shown = {p: " or ".join(sorted({_text(defaults[e, p][name]) for e in users if name in defaults[e, p]}))
                     for p in PROFILES}  # fmt: skip
            same = len(set(shown.values())) == 1
            default = shown[PROFILES[0]] if same else ", ".join(f"{p} {v}" for p, v in shown.items())
            lines.append(f"      default: {default}; allowed: {spec.allowed()}")
    return "\n".join(lines)


def _text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
