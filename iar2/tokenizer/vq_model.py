"""The VQ tokenizer: a convolutional encoder, a vector quantiser, a convolutional decoder.

The encoder and decoder are architecture-compatible with LlamaGen's VQ-16 (same module names, shapes and numerical
conventions), so released LlamaGen / IAR / IAR2 tokenizers load into this model (`iar2 vq import`); the width
(ch, ch_mult, norm_groups, num_res_blocks) is configurable so the same code runs tiny on a CPU.

    x [-1,1] (B,3,H,W) -> Encoder -> quant_conv 1x1 -> quantiser -> post_quant_conv 1x1 -> Decoder -> recon (B,3,H,W)

Encoder: conv_in 3x3, then per level L: num_res_blocks ResnetBlocks (each followed by an AttnBlock at the lowest
resolution only) and a Downsample except at the last level; mid = Res, Attn, Res; GroupNorm, swish, conv_out 3x3.
Decoder mirrors it from the lowest resolution up with num_res_blocks + 1 ResnetBlocks per level.
GroupNorm: eps 1e-6, affine. Swish: x * sigmoid(x). Downsample pads right/bottom by one, then a 3x3 stride-2 conv.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from iar2.checkpoint import load_weights
from iar2.config import from_dict
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.semantic_detail_quantizer import QuantOutput, build_quantizer

log = logging.getLogger(__name__)


def Normalize(channels: int, groups: int) -> nn.GroupNorm:  # noqa: N802 (a layer factory)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Normalize(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # 1x1 projection of the skip only where the width changes (LlamaGen's `nin_shortcut`)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 conv projections, residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = Normalize(c, groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for m in (self.q, self.k, self.v))
        # softmax(q k^T / sqrt(C)) v; SDPA's default scale is exactly 1/sqrt(C) here
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(a.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only (LlamaGen / taming)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: `res` blocks, `attn` blocks (lowest resolution only), optional resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: tuple[str, nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample_name = None if resample is None else resample[0]
        if resample is not None:
            setattr(self, *resample)  # "downsample" or "upsample", the LlamaGen key names

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


def _mid(c: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, groups, dropout), AttnBlock(c, groups), ResnetBlock(c, c, groups, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQModelConfig, in_channels: int = 3):
        super().__init__()
        g, n_levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(in_channels, cfg.ch, 3, padding=1)
        levels, c_in = [], cfg.ch
        for lvl, mult in enumerate(cfg.ch_mult):
            c_out, last = cfg.ch * mult, lvl == n_levels - 1
            res = [ResnetBlock(c_in if r == 0 else c_out, c_out, g, cfg.dropout) for r in range(cfg.num_res_blocks)]
            attn = [AttnBlock(c_out, g) for _ in range(cfg.num_res_blocks)] if last else []
            levels.append(Level(res, attn, None if last else ("downsample", Downsample(c_out))))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(c_in, g, cfg.dropout)
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQModelConfig, out_channels: int = 3):
        super().__init__()
        g, n_levels = cfg.norm_groups, len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, g, cfg.dropout)
        levels = []
        for k, mult in enumerate(reversed(cfg.ch_mult)):  # k = 0 is the lowest resolution
            c_out = cfg.ch * mult
            res = [ResnetBlock(c_in if r == 0 else c_out, c_out, g, cfg.dropout) for r in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c_out, g) for _ in range(cfg.num_res_blocks + 1)] if k == 0 else []
            levels.append(Level(res, attn, ("upsample", Upsample(c_out)) if k < n_levels - 1 else None))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The output conv weight (the adaptive GAN weight is computed against it)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQModel(nn.Module):
    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = build_quantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def is_dual(self) -> bool:
        return self.cfg.quantizer != "single"

    def level_names(self) -> list[str]:
        """The token levels, in the order of the level axis of `encode_indices` (and of tokenized codes)."""
        return ["semantic", "detail"] if self.is_dual else ["single"]

    def vocab_sizes(self) -> list[int]:
        """Codebook size of each level, in `level_names` order."""
        c = self.cfg
        return [c.semantic_size, c.detail_size] if self.is_dual else [c.codebook_size]

    def grid(self, image_size: int) -> int:
        """Side of the token grid for square images of `image_size` pixels."""
        if image_size % self.cfg.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the downsampling factor "
                             f"{self.cfg.downsample}")
        return image_size // self.cfg.downsample

    def encode(self, x: Tensor, mode: str = "full") -> QuantOutput:
        return self.quantize(self.quant_conv(self.encoder(x)), mode)

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor, mode: str = "full") -> tuple[Tensor, QuantOutput]:
        """Reconstruct x; mode 'semantic' (dual only) decodes from the semantic code alone (Eq. 7)."""
        q = self.encode(x, mode)
        return self.decode(q.z_q), q

    @torch.no_grad()
    def encode_indices(self, x: Tensor) -> Tensor:
        """Token indices: (B, h, w) single, (B, 2, h, w) [semantic, detail] dual."""
        return self.encode(x).indices

    @torch.no_grad()
    def decode_indices(self, indices: Tensor, mode: str = "full") -> Tensor:
        """Images in (nominally) [-1, 1] from indices laid out as `encode_indices` returns them."""
        want = 4 if self.is_dual and mode == "full" else 3
        if indices.dim() != want and not (self.is_dual and mode == "semantic" and indices.dim() == 4):
            raise ValueError(f"indices of shape {tuple(indices.shape)}: expected "
                             f"{'(B, 2, h, w)' if want == 4 else '(B, h, w)'} for quantizer {self.cfg.quantizer!r}")
        return self.decode(self.quantize.lookup(indices.long(), mode))

    def codebook_vectors(self, level: str = "single") -> Tensor:
        """(N, d) vectors used at lookup for `level` ('single' | 'semantic' | 'detail'), normalised where the
        quantiser normalises. For the unassociated dual codebook d = embed_dim / 2."""
        q = self.quantize
        allowed = self.level_names()
        if level not in allowed:
            raise ValueError(f"level {level!r} is not allowed for quantizer {self.cfg.quantizer!r}; "
                             f"allowed values: {', '.join(map(repr, allowed))}")
        if self.cfg.quantizer == "single":
            return q.codes().detach()
        if self.cfg.quantizer == "semantic_detail":
            return (q.semantic_codes() if level == "semantic" else q.detail_codes()).detach()
        return q.codebooks[0 if level == "semantic" else 1].codes().detach()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) for a weights file, its json, or a training checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        return path / "model.safetensors", path / "meta.json"
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".json")


def vq_meta(path: str | Path) -> dict:
    """The JSON that accompanies a VQ weights file or checkpoint folder ({} if none)."""
    j = _locate(path)[1]
    return json.loads(j.read_text()) if j.is_file() else {}


def default_image_size(path: str | Path) -> int | None:
    """The image size a VQ was trained at, if its metadata says so."""
    m = vq_meta(path)
    if isinstance(m.get("image_size"), int):
        return m["image_size"]
    for key in ("config", "train_config"):  # a checkpoint folder's meta / an exported vq.json
        data = (m.get(key) or {}).get("data") or {}
        if data.get("image_size"):
            return data["image_size"]
    return None


def load_vq(path: str | Path, device: str | torch.device = "cpu") -> VQModel:
    """A VQModel in eval mode from `save_weights` output (x.safetensors + x.json holding {"model_config": ...})
    or a training checkpoint folder (model.safetensors + meta.json)."""
    weights, meta_path = _locate(path)
    hint = "train one with `iar2 vq train` or convert a released one with `iar2 vq import`"
    for p in (weights, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"VQ tokenizer file not found: {p} ({hint})")
    meta = json.loads(meta_path.read_text())
    raw = meta.get("model_config")
    if raw is None:  # a training checkpoint: the run config holds the model section
        raw = (meta.get("config") or {}).get("model")
    if raw is None:
        raise ValueError(f"{meta_path}: no 'model_config' (or 'config.model') entry to build the VQ model from")
    cfg = from_dict(VQModelConfig, raw, "model_config")
    model = VQModel(cfg)
    model.load_state_dict(load_weights(weights), strict=True)
    log.info("loaded VQ tokenizer %s (%s, %.1fM params)", weights, cfg.quantizer, count_parameters(model) / 1e6)
    return model.to(device).eval()
