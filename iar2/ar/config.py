"""Configuration of an AR run (model + training), apart from the trainer so that planning code (the registry,
time matching) reads configs without importing the training loop. See iar2/config.py for validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from iar2.ar.model import ARModelConfig
from iar2.config import ConfigError


@dataclass
class ARTrainConfig:
    tokens: str = ""  # folder written by `iar2 tokenize`
    epochs: float | None = field(default=300.0, metadata={"min": 0.0})
    steps: int | None = field(default=None, metadata={"min": 1})  # overrides epochs when set
    max_minutes: float | None = field(default=None, metadata={"min": 0.0})  # equal-time budget (Tables 5, 6)
    batch_size: int = field(default=256, metadata={"min": 1})  # global batch
    grad_accum: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=1e-4, metadata={"min": 0.0, "max": 1.0})
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_end: float = field(default=0.0, metadata={"min": 0.0})  # cosine: final LR (Table 11: 1.5e-4 -> 5e-5)
    warmup_steps: int = field(default=0, metadata={"min": 0})
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = field(default=0.05, metadata={"min": 0.0})
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast on CUDA; CPUs run fp32
    compile: bool = False
    fsdp: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    ckpt_epochs: list[int] = field(default_factory=list)  # named checkpoints after these epochs
    # Optimizer steps per (nominal) epoch; default: dataset size / batch. The small scales set it to train a few
    # steps per paper-epoch, and equal-time runs (Tables 5, 6) set it so "100 epochs" lasts as long as the reference.
    epoch_steps: float | None = field(default=None, metadata={"min": 0.0})
    ckpt_every: int = field(default=1000, metadata={"min": 1})  # rolling checkpoint (resume)
    keep_last: int = field(default=2, metadata={"min": 1})
    log_every: int = field(default=50, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0})
    # Steps with a NaN/Inf loss or gradient that may be skipped (never applied) before the run stops (iar2/training.py)
    nonfinite_skips: int = field(default=0, metadata={"min": 0})

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not self.tokens:
            raise ConfigError(f"{p}tokens: required (the folder written by `iar2 tokenize`)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{p}batch_size: {self.batch_size} must be a multiple of {p}grad_accum")
        if self.steps is None and not self.epochs and self.max_minutes is None:
            raise ConfigError(f"{p}epochs: set epochs, steps or max_minutes (the training budget)")


@dataclass
class ARRunConfig:
    name: str = "ar"
    model: ARModelConfig = field(default_factory=ARModelConfig)
    train: ARTrainConfig = field(default_factory=ARTrainConfig)
