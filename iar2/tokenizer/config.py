"""Configuration of a tokenizer run (model, losses, training, data). See iar2/config.py for validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from iar2.config import ConfigError


@dataclass
class VQModelConfig:
    """Encoder/decoder width and the quantiser. Defaults are LlamaGen's VQ-16 (72M params)."""
    ch: int = field(default=128, metadata={"min": 8})
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len(ch_mult) - 1 downsamples: (1,1,2,2,4) -> factor 16
    num_res_blocks: int = field(default=2, metadata={"min": 1})  # encoder; the decoder uses one more (LlamaGen)
    z_channels: int = field(default=256, metadata={"min": 1})
    embed_dim: int = field(default=8, metadata={"min": 1})  # code dimension
    norm_groups: int = field(default=32, metadata={"min": 1})  # GroupNorm groups; tiny widths need fewer
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    quantizer: Literal["single", "semantic_detail", "unassociated_dual"] = "single"
    codebook_size: int = field(default=16384, metadata={"min": 2, "max": 262144})  # single codebook
    semantic_size: int = field(default=256, metadata={"min": 2, "max": 262144})  # semantic codebook (dual)
    detail_size: int = field(default=4096, metadata={"min": 2, "max": 262144})  # detail codebook (dual)
    beta: float = field(default=0.25, metadata={"min": 0.0})  # commitment strength
    l2_norm: bool = True  # l2-normalised latents and codes (LlamaGen)
    # semantic_detail, mode "full": weight of extra Eq. 8 (semantic-level) terms added to Eq. 10. 0 = the paper's
    # Eq. 10 as the official code computes it (terms on the sum only); the semantic level is kept semantic by the
    # interleaved Eq. 7 steps instead.
    semantic_commit_weight: float = field(default=0.0, metadata={"min": 0.0})

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for i, m in enumerate(self.ch_mult):
            if m < 1:
                raise ConfigError(f"{p}ch_mult[{i}]: {m} is out of range; allowed values: >= 1")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ConfigError(f"{p}norm_groups: {self.norm_groups} must divide every width ch*ch_mult "
                                  f"(got ch={self.ch}, ch_mult={list(self.ch_mult)})")

        if self.quantizer == "unassociated_dual" and self.embed_dim % 2:
            raise ConfigError(f"{p}embed_dim: {self.embed_dim} must be even for quantizer 'unassociated_dual' "
                              "(each codebook quantises half of the latent channels)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class DataConfig:
    root: str = "data/builtin"  # ImageFolder root holding train/ and val/ (one folder per class)
    image_size: int = field(default=256, metadata={"min": 8})
    crop_min: float = field(default=0.8, metadata={"min": 0.05, "max": 1.0})  # random-crop fraction (train)
    flip: bool = True
    num_workers: int = field(default=0, metadata={"min": 0})
    check_report: str | None = None  # `iar2 data check` report: its bad files are excluded without decoding


@dataclass
class LossConfig:
    # perceptual backend: LPIPS-VGG (standard weights) or the domain reference network (offline default)
    perceptual: Literal["lpips_vgg", "domain", "none"] = "lpips_vgg"
    domain_net: str | None = None  # path to the reference network checkpoint, for perceptual: domain
    weights_dir: str | None = None  # folder with pretrained weight files (else the torch hub cache)
    l2_weight: float = field(default=1.0, metadata={"min": 0.0})
    perceptual_weight: float = field(default=1.0, metadata={"min": 0.0})
    codebook_weight: float = field(default=1.0, metadata={"min": 0.0})
    disc_weight: float = field(default=0.5, metadata={"min": 0.0})
    disc_start: int = field(default=20000, metadata={"min": 0})
    disc_ndf: int = field(default=64, metadata={"min": 4})
    disc_layers: int = field(default=3, metadata={"min": 1, "max": 6})
    disc_lr: float | None = None  # default: the generator's lr
    # Terms the paper leaves out of the dual-codebook stages, available as options:
    semantic_l2_weight: float = field(default=0.0, metadata={"min": 0.0})  # pixel L2 in Eq. 7 updates (paper: 0)
    joint_perceptual_weight: float = field(default=0.0, metadata={"min": 0.0})  # LPIPS in Eq. 9 steps (paper: 0)
    semantic_gan: bool = False  # GAN in Eq. 7 updates (stage 1, stage-2 semantic steps), as the official code does


@dataclass
class VQTrainConfig:
    # single: LlamaGen recipe (L2 + perceptual + GAN + commitment)
    # stage1: Eq. 7-8 (perceptual + semantic commitment; the dual model's semantic path only)
    # stage2: Eq. 9-10 interleaved 2:1 with Eq. 7 updates of the semantic codebook
    stage: Literal["single", "stage1", "stage2"] = "single"
    init_from: str | None = None  # stage2: the stage-1 checkpoint folder or weights file
    steps: int = field(default=1000, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})  # global batch
    grad_accum: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=1e-4, metadata={"min": 0.0, "max": 1.0})
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})
    semantic_every: int = field(default=3, metadata={"min": 0})  # stage2: every Nth step is an Eq. 7 step (0: never)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = field(default=50, metadata={"min": 1})
    ckpt_every: int = field(default=500, metadata={"min": 1})
    keep_last: int = field(default=2, metadata={"min": 1})
    # Steps with a NaN/Inf loss or gradient that may be skipped (never applied) before the run stops (iar2/training.py)
    nonfinite_skips: int = field(default=0, metadata={"min": 0})

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{p}batch_size: {self.batch_size} must be a multiple of {p}grad_accum "
                              f"({self.grad_accum})")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{p}betas[{i}]: {b} is out of range; allowed values: [0, 1)")


@dataclass
class TokenizerRunConfig:
    name: str = "vq"
    data: DataConfig = field(default_factory=DataConfig)
    model: VQModelConfig = field(default_factory=VQModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: VQTrainConfig = field(default_factory=VQTrainConfig)

    def validate(self, prefix: str = "") -> None:
        if self.train.stage in ("stage1", "stage2") and self.model.quantizer == "single":
            raise ConfigError(f"train.stage: {self.train.stage!r} needs a dual model; "
                              "set model.quantizer to 'semantic_detail' or 'unassociated_dual', or use stage 'single'")
        if self.train.stage == "single" and self.model.quantizer != "single" and self.model.quantizer != "unassociated_dual":
            raise ConfigError("train.stage: 'single' trains single or unassociated dual codebooks; "
                              "the semantic-detail codebook trains with 'stage1' then 'stage2'")
        if self.loss.perceptual == "domain" and not self.loss.domain_net:
            raise ConfigError("loss.domain_net: required when loss.perceptual is 'domain' "
                              "(the reference network checkpoint from `iar2 refnet train`)")
        if self.data.image_size % self.model.downsample:
            raise ConfigError(f"data.image_size: {self.data.image_size} must be a multiple of the "
                              f"downsampling factor {self.model.downsample}")
