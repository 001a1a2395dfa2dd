"""LlamaGen-compatible class-conditional GPT backbone.

Pre-norm transformer: RMSNorm, fused-qkv attention with 2D rotary embeddings, SwiGLU, no biases.
Sequence layout (class-to-image): position 0 is the class embedding, position t >= 1 is image
token t-1 in raster order; the output at position t predicts image token t. The class token's
rotary row is all zeros (LlamaGen's convention), so its query and key vanish.

Parameter names follow LlamaGen's state dict (cls_embedding.embedding_table, layers.{i}.attention.wqkv,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm), so released checkpoints load by name.
The backbone only turns input embeddings into hidden states; what is embedded and what is
predicted (single token, cluster + token, semantic + detail) belongs to the heads in iar2/ar/.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BackboneConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256  # SwiGLU hidden = multiple_of * ceil((8 * dim / 3) / multiple_of)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    num_classes: int = 1000
    class_dropout: float = 0.1  # label -> null class (index num_classes) with this probability, for CFG
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    grid: int = 16  # token grid side (16 for 256 px, 24 for 384 px with a downsample-16 tokenizer)
    # where image tokens sit on the grid: "raster" one token per cell; "interleaved" k1 j1 k2 j2 ... (two tokens
    # per cell, the alternating paradigm); "grouped" all k then all j (the grid is visited twice)
    layout: str = "raster"
    # "iar2_official": the released IAR2 code's rotary table (LlamaGen's with every cell duplicated, indexed by
    # sequence position, so tokens 2c and 2c+1 share cell c) -- needed to sample its released checkpoints
    rope_compat: str = "none"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def seq_len(self) -> int:  # class token + image tokens
        return 1 + self.grid * self.grid * (1 if self.layout == "raster" else 2)


SIZES = {  # LlamaGen's c2i sizes
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32, cast back, then scale (LlamaGen's order; matters in bf16)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)  # down
        self.drop = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, cls_tokens: int = 1,
                  layout: str = "raster") -> torch.Tensor:
    """Rotary (cos, sin) table of shape (cls_tokens + n_tokens, head_dim // 2, 2); row = sequence position.

    Pairs 0..q-1 rotate with the row index, pairs q..2q-1 with the column (q = head_dim // 4).
    Class-token rows are zero (cos = sin = 0), as in LlamaGen.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    idx = torch.arange(grid, dtype=torch.float32)
    rows = torch.outer(idx, freqs)  # (grid, half/2)
    ang = torch.cat([rows[:, None, :].expand(grid, grid, -1), rows[None, :, :].expand(grid, grid, -1)], dim=-1)
    ang = ang.reshape(grid * grid, half)
    if layout == "interleaved":
        ang = ang.repeat_interleave(2, dim=0)
    elif layout == "grouped":
        ang = ang.repeat(2, 1)
    table = torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)
    return torch.cat([torch.zeros(cls_tokens, half, 2), table], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, S, ..., Dh); table: (S, Dh/2, 2). Interleaved pairs (2m, 2m+1), computed in float32.

    The dims between S and Dh (heads; or (2, H) for q and k rotated in one pass) share the table."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, table.shape[0], *([1] * (x.dim() - 3)), *table.shape[1:])
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(-2).type_as(x)


def causal_mask(s: int, n_keys: int, device) -> torch.Tensor:
    """(s, n_keys) bool: the s newest positions of a sequence of n_keys attend to themselves and the past."""
    return torch.ones(s, n_keys, dtype=torch.bool, device=device).tril(n_keys - s)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype activations have inside `module`: the autocast dtype when autocast is on for its device,
    else its weights' dtype. KV caches are made in it, so autocast's bf16 keys fit a cache of fp32 weights."""
    p = next(module.parameters())
    if torch.is_autocast_enabled(p.device.type):
        return torch.get_autocast_dtype(p.device.type)
    return p.dtype


class Fp32Rope(nn.Module):
    """Keeps the buffer `rope` in float32 through `module.to(dtype)`: a bf16 rotary table is off by up to
    ~0.4 % at position 576 (cos/sin rounded to 8 bits), which the fp32 rotation in apply_rope would not undo."""

    def _apply(self, fn, recurse=True):
        rope = self.rope
        out = super()._apply(fn, recurse)
        self.rope = rope.to(device=self.rope.device)
        return out


class KVCache(nn.Module):
    def __init__(self, batch: int, seq: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, S, Dh) at positions start..start+S-1; return the keys and values up to there.

        A slice copy, not an index_put, and only the filled prefix is read back: attention then needs no
        mask over the empty tail (and reads half the cache on average). `start` a LongTensor of the S positions:
        the static form, whose shapes never change (torch.compile / CUDA graphs): it writes by index and returns
        the whole cache, which the attention masks past each query."""
        if torch.is_tensor(start):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        end = start + k.shape[2]
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, start: int | torch.Tensor | None = None, class_attn: bool = False):
        """Full causal pass (start None), or with the KV cache: x holds positions start..start+S-1 (`start` an
        int; or the positions as a LongTensor (S,), the static cache of KVCache.update).

        Returns (output, attention each query pays to key 0, the class token (B, H, S); None unless class_attn)."""
        B, S, D = x.shape
        qkv = self.wqkv(x).view(B, S, 3, self.n_head, self.head_dim)
        qk = apply_rope(qkv[:, :, :2], rope)  # q and k in one pass
        q, k, v = (t.transpose(1, 2) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))  # (B, H, S, Dh)
        if self.kv_cache is not None and start is not None:
            k, v = self.kv_cache.update(start, k, v)
        n_keys = k.shape[2]
        mask = None  # None with S == 1: one new query sees every cached key
        if torch.is_tensor(start):  # static cache: key slots after each query hold nothing yet (or stale values)
            mask = torch.arange(n_keys, device=x.device) <= start[:, None]
        elif 1 < S < n_keys:
            mask = causal_mask(S, n_keys, x.device)
        causal = mask is None and S > 1  # the full pass, S == n_keys
        to_class = None
        if class_attn:
            # explicit softmax so the attention paid to the class token (key 0) can be read
            scores = ((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)).float()
            if causal:
                mask = causal_mask(S, n_keys, x.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(-1)
            to_class = probs[..., 0]
            y = probs.type_as(v) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, S, D)
        return self.resid_drop(self.wo(y)), to_class


class TransformerBlock(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope, start: int | None = None, class_attn: bool = False):
        """-> (output, the attention's weights on the class token or None; see Attention.forward)."""
        a, to_class = self.attention(self.attention_norm(x), rope, start, class_attn)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), to_class


class LabelEmbedding(nn.Module):
    """Class embedding with one extra row (index num_classes) for the unconditional / null class."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout > 0 else 0), dim)

    def forward(self, labels: torch.Tensor, train: bool, generator: torch.Generator | None = None):
        if train and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Backbone(Fp32Rope):
    """Class embedding + transformer layers. `forward(cls_emb_labels, x_emb)` -> hidden states (not normed)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedding(cfg.num_classes, cfg.dim, cfg.class_dropout)
        self.tok_drop = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        layout = "interleaved" if cfg.rope_compat == "iar2_official" else cfg.layout
        rope = rope_2d_table(cfg.grid, cfg.head_dim, cfg.rope_base, layout=layout)[: cfg.seq_len]
        self.register_buffer("rope", rope, persistent=False)

    # ---- training / full-sequence forward
    def forward(self, labels: torch.Tensor, x_emb: torch.Tensor, generator: torch.Generator | None = None):
        """labels (B,), x_emb (B, T, D) embeddings of image tokens 0..T-1 (T <= L-1 in training).

        Returns hidden states (B, 1 + T, D): position t predicts image token t.
        """
        c = self.cls_embedding(labels, self.training, generator)[:, None]
        h = self.tok_drop(torch.cat([c, x_emb], dim=1))
        rope = self.rope[: h.shape[1]]
        for layer in self.layers:
            h, _ = layer(h, rope)
        return h

    # ---- incremental decoding with a KV cache
    def setup_caches(self, batch: int, dtype=None, device=None, reuse: bool = False):
        """KV caches in the compute dtype (see compute_dtype) unless `dtype` is given. reuse: keep caches of the
        same shape, dtype and device (static decoding: a compiled step is specialised on its cache buffers)."""
        p = next(self.parameters())
        dtype, device = dtype or compute_dtype(self), torch.device(device or p.device)
        for layer in self.layers:
            c = layer.attention.kv_cache
            if reuse and c is not None and c.k.shape[0] == batch and c.k.dtype == dtype and c.k.device == device:
                continue
            layer.attention.kv_cache = KVCache(batch, self.cfg.seq_len, self.cfg.n_head, self.cfg.head_dim,
                                               dtype, device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def step(self, h_in: torch.Tensor, start: int | torch.Tensor, class_attn_layer: int | None = None):
        """Feed embeddings h_in (B, S, D) at sequence positions start..start+S-1 through the KV caches, or,
        without caches, a whole sequence from start 0 (the class embedding first). `start` a LongTensor of the
        S positions: the static caches (every step has the same shapes, so torch.compile captures one graph).

        Returns (hidden states (B, S, D), the attention layer `class_attn_layer` (a python index) pays to the
        class token: (B, H, S) probabilities, None when no layer is asked for). PAG-CFG reads the latter."""
        if torch.is_tensor(start):
            rope = self.rope.index_select(0, start)
        else:
            rope = self.rope[start:start + h_in.shape[1]]
        want = None if class_attn_layer is None else class_attn_layer % len(self.layers)
        h, to_class = h_in, None
        for i, layer in enumerate(self.layers):
            h, a = layer(h, rope, start, class_attn=i == want)
            to_class = a if a is not None else to_class
        return h, to_class

    def label_embed(self, labels):
        return self.cls_embedding(labels, train=False)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """LlamaGen init: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
