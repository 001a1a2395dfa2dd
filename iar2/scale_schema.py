"""The scale-file schema (workflow/schemas/scale.schema.yaml) with messages a person can act on.

Snakemake's `validate()` is the gate in the workflow (workflow/rules/common.smk); its errors print jsonschema's
whole schema fragment. `schema_errors` re-runs the same schema and says, per problem, the dotted key, what is
allowed and, for a misspelt key, the closest allowed one: "restirct: unknown key; allowed keys: ...; did you
mean 'restrict'?". iar2/scale.py calls `check_scale` before it types a scale config, so the registry's direct
users (load_plan) get the same.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
import re

import yaml

from iar2.config import ConfigError, close_match

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "scale.schema.yaml"


@lru_cache(maxsize=4)
def _validator(path: str):
    import jsonschema

    schema = yaml.safe_load(Path(path).read_text())
    return jsonschema.Draft202012Validator(schema)


def _key(path, root) -> str:
    """Dotted key of a path in `root`: list items as [i], mapping keys (integers too: grids.16) after dots."""
    out, node = "", root
    for p in path:
        out += f"[{p}]" if isinstance(node, list) else (f".{p}" if out else str(p))
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def _describe(schema: dict) -> str:
    return f" ({schema['description']})" if isinstance(schema, dict) and schema.get("description") else ""


def _explain(error, root) -> list[str]:
    key = _key(error.absolute_path, root)
    at = f"{key}: " if key else ""
    v, schema, inst = error.validator, error.schema, error.instance
    if "propertyNames" in error.relative_schema_path or "propertyNames" in error.schema_path:
        return [f"{at}key {inst!r} is not allowed{_describe(schema)}"]
    if v == "additionalProperties" and schema.get("additionalProperties") is False:
        allowed = sorted(schema.get("properties", {}))
        extra = [k for k in inst if k not in schema.get("properties", {})]
        return [f"{key + '.' if key else ''}{k}: unknown key; allowed keys: {', '.join(allowed)}"
                f"{close_match(k, allowed)}" for k in extra]
    if v == "required":
        missing = [k for k in error.validator_value if k not in inst]
        return [f"{key + '.' if key else ''}{k}: required key is missing" for k in missing]
    if v in ("enum", "const"):
        allowed = error.validator_value if v == "enum" else [error.validator_value]
        return [f"{at}{inst!r} is not allowed; allowed values: {', '.join(map(str, allowed))}"]
    if v == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        word = {"object": "a mapping", "array": "a list", "integer": "an integer", "number": "a number",
                "string": "a string", "boolean": "true or false", "null": "null"}
        want = " or ".join(word.get(w, w) for w in want.split(" or "))
        return [f"{at}expected {want}, got {inst!r}"]
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[v]
        return [f"{at}{inst!r} is out of range; allowed values: {op} {error.validator_value}"]
    if v == "pattern":
        return [f"{at}{inst!r} is not allowed" + (_describe(schema) or f" (must match {error.validator_value!r})")]
    if v in ("oneOf", "anyOf") and error.context:
        # the one alternative that failed on more than the type says most (ar.epoch_steps: 0 is out of range)
        specific = [e for e in error.context if e.validator != "type"]
        if len(specific) == 1:
            return _explain(specific[0], root)
        return [f"{at}{inst!r} is not allowed{_describe(schema)}"]
    return [f"{at}{error.message}"]


def schema_errors(cfg: dict, schema: str | Path = SCHEMA) -> list[str]:
    """Every problem of `cfg` against the schema, one message each, in key order."""
    errors = sorted(_validator(str(schema)).iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path])
    out = []
    for e in errors:
        for m in _explain(e, cfg):
            if m not in out:
                out.append(m)
    return out


def check_scale(cfg: dict, schema: str | Path = SCHEMA) -> None:
    """Raise ConfigError naming every key of `cfg` the schema refuses."""
    errors = schema_errors(cfg, schema)
    if errors:
        where = f" (params/{cfg.get('scale')}.yaml and its overrides)" if isinstance(cfg.get("scale"), str) else ""
        raise ConfigError(f"the scale config{where} is invalid:\n  " + "\n  ".join(errors))


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def coerce_numbers(cfg):
    """Numbers typed on the command line (`--config 'recon_eval={max_images: 9}'`) reach the config as strings;
    turn every string that is entirely a number back into one, in place, before the schema sees it."""
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else ()
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            coerce_numbers(v)
        elif isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
            cfg[k] = int(v) if re.fullmatch(r"[+-]?\d+", v.strip()) else float(v)
    return cfg
