"""Classifier-free guidance schedules, including progressive attention-guided CFG (paper Sec. 4.5).

Guided logits (Eq. 16):   l = l_u + S (l_c - l_u)
For token i of M (progress t = i / (M - 1), so the schedule hits S_start at the first token and
S_end at the last):
    static        S_i = s
    progressive   S_i = S_start + (S_end - S_start) t                        (Eq. 17)
    pag           S_i = S_start + (S_end - S_start) t alpha_i                (Eq. 18)
    pag_additive  w = t + w_attn alpha_i;  S_i = S_start (1 - w) + S_end w   (the official code's rule)
alpha_i in [0, 1] is the attention the current query pays to the class token in one backbone layer
(configurable; default the last), aggregated over heads (mean, configurable), conditional rows only.
Semantic and detail levels have their own (S_start, S_end).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class GuidanceConfig:
    mode: Literal["none", "static", "progressive", "pag", "pag_additive"] = "pag"
    scale: float = field(default=2.0, metadata={"min": 0.0})  # static
    semantic: tuple[float, float] = (1.75, 2.5)  # (S_start, S_end) for semantic / single-codebook tokens
    detail: tuple[float, float] = (1.75, 2.5)  # (S_start, S_end) for detail tokens
    attn_layer: int = -1  # backbone layer whose attention gives alpha (python index; -1 = last)
    attn_heads: Literal["mean", "max"] = "mean"  # how heads are aggregated
    w_attn: float = field(default=0.05, metadata={"min": 0.0})  # pag_additive only

    @property
    def needs_attention(self) -> bool:
        return self.mode in ("pag", "pag_additive")

    @property
    def guided(self) -> bool:
        return self.mode != "none"


def progress(i: int, M: int) -> float:
    return i / (M - 1) if M > 1 else 0.0


def guidance_scale(cfg: GuidanceConfig, level: int, i: int, M: int, alpha: torch.Tensor | None) -> torch.Tensor | float:
    """Scale S_i for token i of M at `level` (0 semantic/single, 1 detail); alpha (B,) or None."""
    s0, s1 = cfg.semantic if level == 0 else cfg.detail
    t = progress(i, M)
    if cfg.mode == "static":
        return cfg.scale
    if cfg.mode == "progressive":
        return s0 + (s1 - s0) * t
    if alpha is None:
        raise ValueError(f"guidance mode {cfg.mode!r} needs the attention alpha")
    if cfg.mode == "pag":
        return s0 + (s1 - s0) * t * alpha
    if cfg.mode == "pag_additive":
        w = t + cfg.w_attn * alpha
        return s0 * (1 - w) + s1 * w
    return 1.0


def attention_alpha(cfg: GuidanceConfig, class_attn: torch.Tensor) -> torch.Tensor:
    """alpha_i (B,) from a step's attention to the class token (2B, H) over [cond; uncond] rows: heads
    aggregated as configured, conditional rows only."""
    a = class_attn.mean(1) if cfg.attn_heads == "mean" else class_attn.amax(1)
    return a[: a.shape[0] // 2].float()


def apply_cfg(logits: torch.Tensor, scale) -> torch.Tensor:
    """logits (2B, V) as [cond; uncond] -> guided (B, V) (Eq. 16); scale float or (B,)."""
    c, u = logits.chunk(2, dim=0)
    if torch.is_tensor(scale):
        scale = scale.to(logits.dtype)[:, None]
    return u + scale * (c - u)
