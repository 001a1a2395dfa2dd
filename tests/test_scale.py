"""A scale file typed (iar2/scale.py) after the schema's check: the dataclasses and the schema name the same keys,
a refused key is named with what is allowed, the defaults of optional keys apply."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from iar2.config import ConfigError
from iar2.registry import load_yaml
from iar2.scale import Resources, ResourceSpec, Scale, load_scale, schema_mismatches
from iar2.scale_schema import SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def _scale(name: str) -> dict:
    return load_yaml(ROOT / "params" / f"{name}.yaml")


def test_the_dataclasses_mirror_the_schema():
    assert schema_mismatches() == []


def test_a_key_added_to_the_schema_alone_is_caught():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    edited = copy.deepcopy(schema)
    edited["properties"]["refnet"]["properties"]["lr"] = {"type": "number"}
    edited["properties"]["gen_metrics"]["required"].append("bootstrap")
    edited["$defs"]["resource_spec"]["properties"]["gpus_per_task"] = {"type": "integer"}
    found = schema_mismatches(Scale, edited, edited)
    assert "refnet.lr: in the schema, not in RefNet" in found
    assert "gen_metrics.bootstrap: required in the schema, with a default in GenMetrics" in found
    assert "resources.ar_train.*.gpus_per_task: in the schema, not in ResourceSpec" in found
    # every rule's spec and ar_train's: one message per field of Resources
    assert len([m for m in found if "gpus_per_task" in m]) == len(dataclasses.fields(Resources))


@pytest.mark.parametrize("name", ["ci", "default", "paper", "gpu"])
def test_every_scale_file_loads_typed(name):
    s = load_scale(_scale(name))
    assert s.scale == name and s.grids[24] > s.grids[16] and s.ar.base and s.sampling.base
    assert load_scale(s) is s


def test_optional_keys_take_their_defaults():
    raw = _scale("ci")
    for k in ("tokenize", "code_distance", "tracking", "resources"):
        raw.pop(k, None)
    raw["refnet"].pop("threads", None)
    raw["gen_metrics"].pop("bootstrap", None)
    s = load_scale(raw)
    assert (s.tokenize.aug, s.code_distance.num_images, s.tracking.mode) == ("flip", 32, "live")
    assert (s.refnet.threads, s.gen_metrics.bootstrap, s.gen_metrics.ref_npz) == (1, 200, None)
    assert s.resources.of("ar_train", "B", 16) == {}


def test_resources_merge_default_rule_size_and_size_grid():
    s = load_scale(_scale("paper"))
    xxl = s.resources.of("ar_train", "XXL", 24)
    assert xxl["gpu"] == 32 and xxl["nodes"] == 4
    assert s.resources.of("sample") == {**s.resources.default.as_dict(), **s.resources.sample.as_dict()}
    assert ResourceSpec(gpu=1).as_dict() == {"gpu": 1}


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(restirct={"size": ["B"]}), "restirct: unknown key; allowed keys: "),
    (lambda s: s["tokenize"].update(aug="rotate"), "tokenize.aug: 'rotate' is not allowed; allowed values: none, flip, "
                                                   "tencrop"),
    (lambda s: s["refnet"].update(lr=0.1), "refnet.lr: unknown key; allowed keys: batch_size, input_size, seed, "
                                           "steps, threads"),
    (lambda s: s["resources"].update(ar_train={"XXXL": {"gpu": 1}}), "resources.ar_train: key 'XXXL' is not allowed"),
])
def test_a_refused_key_is_named_with_what_is_allowed(edit, message):
    raw = _scale("ci")
    raw.setdefault("tokenize", {})
    raw.setdefault("resources", {})
    edit(raw)
    with pytest.raises(ConfigError) as e:
        load_scale(raw)
    assert message in str(e.value)
