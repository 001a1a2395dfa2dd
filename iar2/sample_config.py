"""Configuration of a sampling run (`iar2 sample`), apart from the sampler so that planning code (the registry)
reads it without importing the sampling loop. See iar2/config.py for validation."""
from __future__ import annotations

from dataclasses import dataclass, field

from iar2.ar.pag_cfg import GuidanceConfig


@dataclass
class SamplingConfig:
    temperature: tuple[float, float] = (1.0, 1.0)  # (semantic or single, detail)
    top_k: tuple[int, int] = (0, 0)  # 0: off
    top_p: tuple[float, float] = (1.0, 1.0)  # 1.0: off
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    kv_cache: bool = True
    # the backbone step on static caches under torch.compile (CUDA graphs on a GPU); same tokens up to float
    # summation order. Off by default: compiling costs seconds to minutes, paid back only by long decodes on a GPU.
    compile: bool = False
    seed: int = 0


@dataclass
class RejectConfig:
    factor: int = field(default=1, metadata={"min": 1})  # candidates per kept sample; 1 = no reject sampling
    classifier: str = field(default="domain", metadata={"choices": ["domain", "resnet50"]})
    domain_net: str | None = None
    weights_dir: str | None = None


@dataclass
class SampleRunConfig:
    per_class: int = field(default=50, metadata={"min": 1})  # the paper protocol: 50 x 1000 classes
    num_classes: int | None = field(default=None, metadata={"min": 1})  # default: the model's
    classes: list[int] | None = None  # only these classes (sample grids); default: all
    batch_size: int = field(default=32, metadata={"min": 1})
    chunk_size: int = field(default=1000, metadata={"min": 1})
    eval_size: int | None = field(default=None, metadata={"min": 8})  # resize to this side (bicubic)
    precision: str = field(default="fp32", metadata={"choices": ["fp32", "bf16"]})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reject: RejectConfig = field(default_factory=RejectConfig)  # classifier-scored reject sampling (iar2/reject_sampling.py)
