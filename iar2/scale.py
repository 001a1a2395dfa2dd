"""A scale file (params/<scale>.yaml merged with --configfile / --config) as typed objects.

The JSON schema workflow/schemas/scale.schema.yaml is the one description of its keys: `load_scale` checks a
config against it first (the messages of iar2.scale_schema: the dotted key, what is allowed, a close match),
then builds these dataclasses. Their fields mirror the schema's properties, required keys being the fields
without a default; `schema_mismatches` compares the two, so a key added to one and not the other fails the
tests (tests/test_scale.py). The defaults of optional keys live here.
The run-config sections (tokenizer.base, ar.base, sampling.base, ...) stay mappings: their own dataclasses
check them when the registry resolves each job's config.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from iar2.config import from_dict
from iar2.scale_schema import SCHEMA, check_scale


def _present(obj) -> dict:
    """The fields of `obj` that are set: what the scale file said, without the absent optional ones."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}


@dataclass(frozen=True)
class BuiltinData:
    num_classes: int
    train_per_class: int
    val_per_class: int
    size: int
    seed: int


@dataclass(frozen=True)
class Data:
    source: str  # builtin | imagefolder
    root: str
    builtin: BuiltinData | None = None


@dataclass(frozen=True)
class Tracking:
    mode: str = "live"  # live | spool (iar2/tracking.py)


@dataclass(frozen=True)
class Protocol:
    dataset: str | None = None
    reference: str | None = None

    def as_dict(self) -> dict:
        return _present(self)


@dataclass(frozen=True)
class RefNet:
    steps: int
    batch_size: int
    input_size: int
    seed: int
    threads: int = 1


@dataclass(frozen=True)
class TokenizerSection:
    base: dict
    stage1: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReconEval:
    extractor: str
    perceptual: str
    max_images: int


@dataclass(frozen=True)
class Tokenize:
    aug: str = "flip"


@dataclass(frozen=True)
class Rearrange:
    clusters: int
    seed: int


@dataclass(frozen=True)
class CodeDistance:
    num_images: int = 32


@dataclass(frozen=True)
class ARSection:
    base: dict
    epoch_steps: float | None = None  # None: real epochs over the token set
    sizes: dict[str, dict] = field(default_factory=dict)  # B, L, XL, XXL or <size>-<grid> -> overrides


@dataclass(frozen=True)
class SamplingSection:
    base: dict
    reject: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    # samples per class for the sets of these tables/figures (a set in several: the largest), so the comparisons
    # that decide the central claims get narrower intervals than the rest; other sets keep base.per_class
    per_class_by_table: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenMetrics:
    extractor: str
    max_reference: int
    ref_npz: str | None = None
    bootstrap: int = 200  # replicates per metric for the claims' intervals


@dataclass(frozen=True)
class SeedGroup:
    """Sample sets trained on `count` seeds (iar2/seeds.py)."""
    count: int
    sets: list[str]  # sample-set folders (ar/<run>/e<epoch>/<guidance>) or glob patterns over them


@dataclass(frozen=True)
class Diagnosis:
    """The AR runs the report's Diagnosis section takes apart (workflow/rules/diagnosis.smk)."""
    runs: list[str]
    scales: list[float] = field(default_factory=lambda: [2.0])  # static CFG scales besides none
    per_class: int = 10
    max_images: int = 200


@dataclass(frozen=True)
class ResourceSpec:
    gpu: int | None = None
    nodes: int | None = None
    cpus_per_task: int | None = None
    mem_mb: int | None = None
    runtime: int | None = None  # minutes

    def as_dict(self) -> dict:
        return _present(self)


@dataclass(frozen=True)
class Resources:
    """SLURM resources per rule; ar_train's by `default`, size (B, ...) and size-grid (XXL-24)."""
    default: ResourceSpec | None = None
    data_check: ResourceSpec | None = None
    refnet: ResourceSpec | None = None
    vq_train: ResourceSpec | None = None
    vq_train_stage1: ResourceSpec | None = None
    recon_eval: ResourceSpec | None = None
    tokenize: ResourceSpec | None = None
    rearrange: ResourceSpec | None = None
    code_distance: ResourceSpec | None = None
    diagnose: ResourceSpec | None = None
    time_match: ResourceSpec | None = None
    sample: ResourceSpec | None = None
    gen_metrics: ResourceSpec | None = None
    ar_train: dict[str, ResourceSpec] = field(default_factory=dict)

    def of(self, rule: str, size: str | None = None, grid: int | None = None) -> dict:
        """One job's resources: `default`, then the rule's, then (ar_train) by size and size-grid."""
        specs = [self.default]
        if rule == "ar_train":
            specs.append(self.ar_train.get("default"))
            if size is not None:
                specs += [self.ar_train.get(size), self.ar_train.get(f"{size}-{grid}")]
        else:
            specs.append(getattr(self, rule, None))
        out: dict = {}
        for s in specs:
            out.update(s.as_dict() if s else {})
        return out


@dataclass(frozen=True)
class Scale:
    scale: str
    results: str
    data: Data
    refnet: RefNet
    grids: dict[int, int]  # the paper's token grid (16, 24) -> image side at this scale
    codebooks: dict[int, int]  # the paper's codebook size -> this scale's
    tokenizer: TokenizerSection
    recon_eval: ReconEval
    rearrange: Rearrange
    ar: ARSection
    sampling: SamplingSection
    gen_metrics: GenMetrics
    tracking: Tracking = field(default_factory=Tracking)
    protocol: Protocol = field(default_factory=Protocol)
    restrict: dict[str, list] = field(default_factory=dict)  # sweep variable -> values kept (iar2.registry)
    tokenize: Tokenize = field(default_factory=Tokenize)
    code_distance: CodeDistance = field(default_factory=CodeDistance)
    diagnosis: Diagnosis | None = None  # None: no diagnosis stage
    seeds: list[SeedGroup] = field(default_factory=list)  # empty: one training seed everywhere
    resources: Resources = field(default_factory=Resources)
    experiments: dict = field(default_factory=dict)  # an overlay of params/experiments.yaml


def load_scale(cfg: dict | Scale) -> Scale:
    """The scale config `cfg` checked against the schema (ConfigError naming every refused key) and typed."""
    if isinstance(cfg, Scale):
        return cfg
    check_scale(cfg)
    return from_dict(Scale, cfg)


# ----------------------------------------------------------------------------- the schema and the types agree

def _resolve(node: dict, root: dict) -> dict:
    ref = node.get("$ref")
    return _resolve(root["$defs"][ref.split("/")[-1]], root) if ref else node


def _dataclass_of(tp):
    """The dataclass `tp` names (through `X | None`), or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def schema_mismatches(cls: type = Scale, node: dict | None = None, root: dict | None = None,
                      where: str = "") -> list[str]:
    """Where the dataclasses and the schema disagree: a key one has and the other lacks, a key required by the
    schema that has a default here (or the reverse), a section typed here that the schema leaves open."""
    if node is None:
        root = node = yaml.safe_load(Path(SCHEMA).read_text())
    node = _resolve(node, root)
    props, required = node.get("properties", {}), set(node.get("required", []))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = [f"{where}{k}: in the schema, not in {cls.__name__}" for k in props if k not in fields]
    for name, f in fields.items():
        key = f"{where}{name}"
        if name not in props:
            out.append(f"{key}: a field of {cls.__name__}, not in the schema")
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if has_default == (name in required):
            out.append(f"{key}: {'required' if name in required else 'optional'} in the schema, "
                       f"{'with' if has_default else 'without'} a default in {cls.__name__}")
        sub, tp = _resolve(props[name], root), hints[name]
        if _dataclass_of(tp):
            out += schema_mismatches(_dataclass_of(tp), sub, root, f"{key}.")
        elif typing.get_origin(tp) is list and _dataclass_of(typing.get_args(tp)[0]):
            out += schema_mismatches(_dataclass_of(typing.get_args(tp)[0]), sub.get("items", {}), root, f"{key}[].")
        elif typing.get_origin(tp) is dict and _dataclass_of(typing.get_args(tp)[1]):
            out += schema_mismatches(_dataclass_of(typing.get_args(tp)[1]), sub.get("additionalProperties", {}),
                                     root, f"{key}.*.")
    return out
