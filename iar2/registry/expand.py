"""Rows of params/experiments.yaml expanded into concrete entries: the `for:` product of a row, its `{name}`
placeholders filled, and the sweeps a scale may shorten with `restrict:`."""
from __future__ import annotations

import itertools
import re

from iar2.config import ConfigError, close_match

PARADIGM_LABELS = {"alternating": "Alternating Prediction", "grouped": "Grouped Sequential Prediction",
                   "fused_independent": "Fused Independent Prediction",
                   "fused_hierarchical": "Fused Hierarchical Prediction (Ours)"}
# The figure lists a scale may shorten with `restrict`, by figure kind: sweep variable -> the figure's key.
FIGURE_SWEEPS = {"cfg_sweep": {"size": "models", "static": "static"},
                 "scaling": {"family": "families", "size": "sizes"},
                 "epochs": {"family": "families", "epochs": "epochs"},
                 "loss_curves": {"size": "sizes"}}


def _fmt(value, env: dict):
    """Fill {name} placeholders; a string that is exactly "{name}" takes the value with its type."""
    if isinstance(value, str):
        m = re.fullmatch(r"\{(\w+)\}", value)
        if m and m.group(1) in env:
            return env[m.group(1)]
        try:
            return value.format(**env)
        except KeyError as e:
            raise ConfigError(f"experiments: {value!r} uses {{{e.args[0]}}}, which its row does not define") from None
    if isinstance(value, dict):
        return {_fmt(k, env): _fmt(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_fmt(v, env) for v in value]
    return value


def expand(entry: dict, restrict: dict, families: dict, where: str) -> list[tuple[dict, dict]]:
    """A row with `for: {name: values, "a,b": [[a1, b1], ...]}` -> [(env, row without for)] over the product,
    minus `skip` combinations and values the scale's `restrict` leaves out."""
    entry = dict(entry)
    loops = entry.pop("for", {}) or {}
    skips = entry.pop("skip", []) or []
    axes = []
    for names, values in loops.items():
        names = [n.strip() for n in str(names).split(",")]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.for.{','.join(names)}: expected a non-empty list")
        combos = []
        for v in values:
            vals = v if len(names) > 1 else [v]
            if len(vals) != len(names):
                raise ConfigError(f"{where}.for.{','.join(names)}: {v!r} should have {len(names)} values")
            env = dict(zip(names, vals))
            if all(n not in restrict or env[n] in restrict[n] for n in names):
                combos.append(env)
        axes.append(combos)
    out = []
    for parts in itertools.product(*axes):
        env = {}
        for p in parts:
            env.update(p)
        if any(all(env.get(k) == v for k, v in s.items()) for s in skips):
            continue
        if "family" in env:
            if env["family"] not in families:
                raise ConfigError(f"{where}: family {env['family']!r} unknown; allowed values: "
                                  + ", ".join(families))
            env["label"] = families[env["family"]]["label"]
        if "paradigm" in env:
            env["paradigm_label"] = PARADIGM_LABELS.get(env["paradigm"], env["paradigm"])
        out.append((env, _fmt(entry, env)))
    return out


def sweep_variables(experiments: dict) -> dict[str, list]:
    """Every variable a scale may `restrict`, with the values the registry sweeps it over (first-seen order):
    the `for:` names of table rows and figures, and the figure lists of FIGURE_SWEEPS."""
    out: dict[str, list] = {}

    def add(name, values):
        seen = out.setdefault(name, [])
        seen.extend(v for v in values if v not in seen)

    def loops(entry):
        for names, values in ((entry or {}).get("for") or {}).items():
            names = [n.strip() for n in str(names).split(",")]
            for i, n in enumerate(names):
                add(n, [v[i] if len(names) > 1 else v for v in values or []])

    for t in (experiments.get("tables") or {}).values():
        for row in t.get("rows") or []:
            loops(row)
    for f in (experiments.get("figures") or {}).values():
        loops(f)
        for name, key in FIGURE_SWEEPS.get(f.get("kind"), {}).items():
            add(name, f.get(key) or [])
    return out


def check_restrict(restrict: dict[str, list], experiments: dict) -> None:
    """A scale's `restrict:` names must be sweep variables and its values values of those sweeps: a misspelt one
    would silently keep a whole sweep, or drop every row. (The schema cannot say this: only the registry knows
    its sweeps.)"""
    sweeps = sweep_variables(experiments)
    for name, values in restrict.items():
        if name not in sweeps:
            raise ConfigError(f"restrict.{name}: not a sweep variable of the registry; allowed keys: "
                              + ", ".join(sorted(sweeps)) + close_match(name, sweeps))
        unknown = [v for v in values if v not in sweeps[name]]
        if unknown:
            raise ConfigError(f"restrict.{name}: {', '.join(map(repr, unknown))} not in the registry's sweep "
                              f"of {name}; allowed values: " + ", ".join(map(str, sweeps[name])))
