"""Vector quantisers of the tokenizer: single codebook, semantic-detail associated dual codebook, and the
unassociated dual-codebook baseline.

All three take the encoder latent h (B, C, H, W) after quant_conv and return a `QuantOutput`.

Single codebook (LlamaGen VQ-16). z = l2-normalise(h) along channels, codes ê = l2-normalise(E) (rows stored raw),
k = argmin ||z - ê||, z_q = z + sg(ê[k] - z) (the straight-through estimator: codes forward, gradient to z only), and
    loss = mean((ê[k] - sg z)^2) + beta * mean((sg ê[k] - z)^2).

Semantic-detail associated dual codebook (paper Sec. 4.2, Eq. 5-6, 8, 10).
    k = argmin ||z - ê_s||            (Eq. 5, semantic codebook E_s, l2-normalised like LlamaGen)
    r = z - ê_s[k]                    (the residual the semantic code leaves)
    j = argmin ||r - E_d||            (Eq. 6, detail codebook E_d, used raw)
    z_q = ê_s[k] + E_d[j]             (no renormalisation of the sum)
The paper does not say whether E_d is normalised; the official code normalises it only at initialisation and uses it
raw afterwards, which is also the natural choice for a residual codebook (residuals are short vectors). We do the
same, so released IAR2 checkpoints (`0485000.pt`) decode bit-for-bit.
Losses: mode "semantic" (stage 1, Eq. 7) quantises with the semantic code only and returns Eq. 8,
    mean((ê_s[k] - sg z)^2) + beta * mean((sg ê_s[k] - z)^2);
mode "full" (stage 2) returns Eq. 10 on the sum c = ê_s[k] + E_d[j],
    mean((c - sg z)^2) + beta * mean((sg c - z)^2),
which is also what the official stage-2 code computes. `semantic_commit_weight` > 0 adds that weight times the Eq. 8
terms in mode "full" (a reading of Eq. 10 with an explicit semantic level; off by default). Indices are returned as
(B, 2, H, W) = [semantic k, detail j] in both modes (the detail index is computed in mode "semantic" too, so callers
never see two layouts; it is simply not used for z_q there).

Unassociated dual codebook (Table 7 baseline, the paper's ref. [19] = DualToken). The paper describes [19] as
following the MAGVIT-v2 / FQGAN paradigm "where multiple codebooks operate in parallel during quantization" with no
semantic association: DualToken quantises two different feature sets (semantic and pixel features) with two
independent codebooks and concatenates them. The faithful analogue inside this tokenizer is a channel split: the
first half of the latent channels is quantised against codebook 0 (semantic_size codes) and the second half against
codebook 1 (detail_size codes), each half l2-normalised on its own, and z_q = concat. This keeps every other shape
(quant_conv, post_quant_conv, decoder) and the bits per token (log2 256 + log2 4096) identical to the associated
model, so Table 7 compares only the association. Its codes have embed_dim / 2 channels. Indices (B, 2, H, W); the
names "semantic"/"detail" are positional here (codebook 0 / codebook 1).

Codebook usage is counted by the callers over a window or a split (iar2.tokenizer.usage), not per batch here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Upper bound on the number of distance entries held at once: 2^24 floats = 64 MiB. A 262144-code codebook then
# processes 64 latent vectors per chunk instead of materialising a (tokens x codes) matrix.
MAX_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class QuantOutput:
    z_q: Tensor  # (B, embed_dim, H, W), straight-through: forward = codes, gradient = identity to z, none to codes
    indices: Tensor  # (B, H, W) single; (B, 2, H, W) [semantic, detail] dual
    loss: Tensor  # codebook + commitment, scalar
    codebook_loss: Tensor | None = None  # mean((c - sg z)^2): moves the codes
    commit_loss: Tensor | None = None  # beta * mean((sg c - z)^2): moves the encoder


def nearest_code(z: Tensor, codebook: Tensor, max_elements: int = MAX_DISTANCE_ELEMENTS) -> Tensor:
    """argmin_n ||z_m - e_n||^2 for every row of z (M, D) against codebook (N, D); returns (M,) long.

    ||z||^2 is the same for every code of a row, so only ||e||^2 - 2 z.e is formed. The (M, N) matrix is built
    in row chunks of at most `max_elements` entries so very large codebooks fit in memory.
    """
    with torch.no_grad():
        z, codebook = z.detach().float(), codebook.detach().float()
        e_sq = codebook.pow(2).sum(1)
        rows = max(1, max_elements // codebook.shape[0])
        if z.shape[0] <= rows:
            return torch.addmm(e_sq, z, codebook.t(), alpha=-2.0).argmin(1)
        return torch.cat([torch.addmm(e_sq, c, codebook.t(), alpha=-2.0).argmin(1) for c in z.split(rows)])


def _init_codebook(weight: Tensor, l2_norm: bool) -> None:
    # LlamaGen / IAR2: uniform(-1/N, 1/N), then unit rows when the quantiser is l2-normalised
    with torch.no_grad():
        n = weight.shape[0]
        weight.uniform_(-1.0 / n, 1.0 / n)
        if l2_norm:
            weight.copy_(F.normalize(weight, p=2, dim=-1))


def _commitment(c: Tensor, z: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(||sg[z] - c||^2, beta * ||z - sg[c]||^2), each a mean over all elements."""
    return F.mse_loss(c, z.detach()), beta * F.mse_loss(z, c.detach())


def _to_tokens(h: Tensor, l2_norm: bool) -> Tensor:
    # (B, C, H, W) -> (B, H, W, C) in fp32; the argmin and the losses are precision-sensitive, so no autocast here
    z = h.float().permute(0, 2, 3, 1)
    return F.normalize(z, p=2, dim=-1) if l2_norm else z


class _StraightThrough(torch.autograd.Function):
    """z + sg(c - z) of Eq. 7/9 (and VQ-VAE, and the released code), computed exactly.

    Forward returns the codes c bit for bit (z + (c - z) would round), so a forward pass decodes exactly like
    `lookup` of its indices; backward hands the gradient to z unchanged and none to c: the codebooks learn only
    through the codebook loss, never through the reconstruction, perceptual or GAN terms."""

    @staticmethod
    def forward(ctx, z: Tensor, c: Tensor) -> Tensor:
        return c.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _straight_through(z: Tensor, c: Tensor) -> Tensor:
    """Forward value c, gradient identity w.r.t. z and zero w.r.t. the codebooks; back to (B, C, H, W)."""
    return _StraightThrough.apply(z, c).permute(0, 3, 1, 2).contiguous()


class SingleQuantizer(nn.Module):
    """One codebook of `size` codes (LlamaGen VQ)."""

    def __init__(self, size: int, dim: int, beta: float = 0.25, l2_norm: bool = True):
        super().__init__()
        self.size, self.dim, self.beta, self.l2_norm = size, dim, beta, l2_norm
        self.codebook = nn.Embedding(size, dim)
        _init_codebook(self.codebook.weight, l2_norm)

    def codes(self) -> Tensor:
        """The vectors used at lookup (normalised rows when l2_norm)."""
        w = self.codebook.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def codebook_parameters(self) -> list[nn.Parameter]:
        return [self.codebook.weight]

    def quantize_tokens(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (..., dim), already normalised -> (indices (...), codes (..., dim))."""
        e = self.codes().float()
        idx = nearest_code(z.reshape(-1, self.dim), e).view(z.shape[:-1])
        return idx, F.embedding(idx, e)

    def forward(self, h: Tensor, mode: str = "full") -> QuantOutput:
        if mode != "full":
            raise ValueError(f"mode {mode!r}: a single-codebook quantiser has only mode 'full'")
        with torch.autocast(h.device.type, enabled=False):
            z = _to_tokens(h, self.l2_norm)
            idx, c = self.quantize_tokens(z)
            cb, cm = _commitment(c, z, self.beta)
            return QuantOutput(z_q=_straight_through(z, c), indices=idx, loss=cb + cm, codebook_loss=cb,
                               commit_loss=cm)

    def lookup(self, indices: Tensor, mode: str = "full") -> Tensor:
        """indices (B, H, W) -> z_q (B, dim, H, W)."""
        return F.embedding(indices, self.codes()).permute(0, 3, 1, 2).contiguous()


class SemanticDetailQuantizer(nn.Module):
    """The paper's semantic-detail associated dual codebook (see the module docstring)."""

    def __init__(self, semantic_size: int, detail_size: int, dim: int, beta: float = 0.25, l2_norm: bool = True,
                 semantic_commit_weight: float = 0.0):
        super().__init__()
        self.semantic_size, self.detail_size, self.dim = semantic_size, detail_size, dim
        self.beta, self.l2_norm, self.semantic_commit_weight = beta, l2_norm, semantic_commit_weight
        self.semantic_codebook = nn.Embedding(semantic_size, dim)
        self.detail_codebook = nn.Embedding(detail_size, dim)
        _init_codebook(self.semantic_codebook.weight, l2_norm)
        _init_codebook(self.detail_codebook.weight, l2_norm)  # normalised once at init, raw afterwards (IAR2)

    def semantic_codes(self) -> Tensor:
        w = self.semantic_codebook.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def detail_codes(self) -> Tensor:
        return self.detail_codebook.weight

    def semantic_parameters(self) -> list[nn.Parameter]:
        return [self.semantic_codebook.weight]

    def detail_parameters(self) -> list[nn.Parameter]:
        return [self.detail_codebook.weight]

    def codebook_parameters(self) -> list[nn.Parameter]:
        return self.semantic_parameters() + self.detail_parameters()

    def forward(self, h: Tensor, mode: str = "full") -> QuantOutput:
        if mode not in ("full", "semantic"):
            raise ValueError(f"mode {mode!r} is not allowed; allowed values: 'full', 'semantic'")
        with torch.autocast(h.device.type, enabled=False):
            z = _to_tokens(h, self.l2_norm)
            flat = z.reshape(-1, self.dim)
            e_s, e_d = self.semantic_codes().float(), self.detail_codes().float()
            k = nearest_code(flat, e_s)  # Eq. 5
            c_s = F.embedding(k, e_s).view_as(z)
            j = nearest_code(flat - F.embedding(k, e_s).detach(), e_d)  # Eq. 6, on the residual
            c_d = F.embedding(j, e_d).view_as(z)
            cb_s, cm_s = _commitment(c_s, z, self.beta)  # Eq. 8
            if mode == "semantic":
                c, cb, cm = c_s, cb_s, cm_s
            else:
                c = c_s + c_d
                cb, cm = _commitment(c, z, self.beta)  # Eq. 10
                if self.semantic_commit_weight:
                    cb = cb + self.semantic_commit_weight * cb_s
                    cm = cm + self.semantic_commit_weight * cm_s
            shape = z.shape[:-1]
            indices = torch.stack([k.view(shape), j.view(shape)], dim=1)
            return QuantOutput(z_q=_straight_through(z, c), indices=indices, loss=cb + cm, codebook_loss=cb,
                               commit_loss=cm)

    def lookup(self, indices: Tensor, mode: str = "full") -> Tensor:
        """indices (B, 2, H, W) [semantic, detail] -> z_q (B, dim, H, W); mode 'semantic' ignores the detail code
        (and also accepts (B, H, W) semantic indices)."""
        k = indices[:, 0] if indices.dim() == 4 else indices
        c = F.embedding(k, self.semantic_codes())
        if mode == "full":
            if indices.dim() != 4:
                raise ValueError(f"dual indices must be (B, 2, H, W), got {tuple(indices.shape)}")
            c = c + F.embedding(indices[:, 1], self.detail_codes())
        elif mode != "semantic":
            raise ValueError(f"mode {mode!r} is not allowed; allowed values: 'full', 'semantic'")
        return c.permute(0, 3, 1, 2).contiguous()


class UnassociatedDualQuantizer(nn.Module):
    """Two independent codebooks on the two halves of the latent channels (Table 7 baseline; module docstring)."""

    def __init__(self, sizes: tuple[int, int], dim: int, beta: float = 0.25, l2_norm: bool = True):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embed_dim {dim} must be even for the unassociated dual codebook")
        self.dim, self.half, self.beta, self.l2_norm = dim, dim // 2, beta, l2_norm
        self.codebooks = nn.ModuleList(SingleQuantizer(n, dim // 2, beta, l2_norm) for n in sizes)

    def semantic_parameters(self) -> list[nn.Parameter]:  # positional: codebook 0
        return self.codebooks[0].codebook_parameters()

    def detail_parameters(self) -> list[nn.Parameter]:  # positional: codebook 1
        return self.codebooks[1].codebook_parameters()

    def codebook_parameters(self) -> list[nn.Parameter]:
        return self.semantic_parameters() + self.detail_parameters()

    def forward(self, h: Tensor, mode: str = "full") -> QuantOutput:
        if mode != "full":
            raise ValueError(f"mode {mode!r}: the unassociated dual codebook has only mode 'full'")
        with torch.autocast(h.device.type, enabled=False):
            z = torch.cat([_to_tokens(part, self.l2_norm) for part in h.split(self.half, dim=1)], dim=-1)
            (i0, c0), (i1, c1) = (q.quantize_tokens(part) for q, part in zip(self.codebooks, z.split(self.half, -1)))
            c = torch.cat([c0, c1], dim=-1)
            cb, cm = _commitment(c, z, self.beta)
            return QuantOutput(z_q=_straight_through(z, c), indices=torch.stack([i0, i1], dim=1), loss=cb + cm,
                               codebook_loss=cb, commit_loss=cm)

    def lookup(self, indices: Tensor, mode: str = "full") -> Tensor:
        if mode != "full":
            raise ValueError(f"mode {mode!r}: the unassociated dual codebook has only mode 'full'")
        return torch.cat([q.lookup(indices[:, i]) for i, q in enumerate(self.codebooks)], dim=1)


def build_quantizer(cfg) -> nn.Module:
    """The quantiser named by `cfg.quantizer` (a VQModelConfig)."""
    if cfg.quantizer == "single":
        return SingleQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.beta, cfg.l2_norm)
    if cfg.quantizer == "semantic_detail":
        return SemanticDetailQuantizer(cfg.semantic_size, cfg.detail_size, cfg.embed_dim, cfg.beta, cfg.l2_norm,
                                       cfg.semantic_commit_weight)
    if cfg.quantizer == "unassociated_dual":
        return UnassociatedDualQuantizer((cfg.semantic_size, cfg.detail_size), cfg.embed_dim, cfg.beta, cfg.l2_norm)
    raise ValueError(f"quantizer {cfg.quantizer!r} is not allowed; "
                     "allowed values: 'single', 'semantic_detail', 'unassociated_dual'")
