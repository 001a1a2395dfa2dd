"""Local-Context Enhanced AR Head (paper Sec. 4.3.2-4.4, Eq. 13 and 15).

For the patch at grid cell (i, j) the backbone gives h (global context). The head is a small causal
transformer over the sequence

    [c, h, Emb_s(k)]      c: compressed local context (Eq. 15), k: the semantic token of this patch

slot 1 predicts the semantic token k, slot 2 predicts the detail token j given k (Eq. 13). During
training k is the ground truth (teacher forcing); at inference it is the token just sampled.

Local window: the 12 causal neighbours of a 5x5 window (rows i-2 and i-1 at columns j-2..j+2, and
(i, j-2), (i, j-1)), for any token grid; neighbours outside the grid are masked. Their hidden states
are compressed by a shared per-neighbour MLP, concatenated, and mapped back to the width by an FFN.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from iar2.ar.gpt import BackboneConfig, Fp32Rope, KVCache, TransformerBlock

# (drow, dcol) of the 12 causal neighbours, in the order their features are concatenated
WINDOW_OFFSETS = [(-2, -2), (-2, -1), (-2, 0), (-2, 1), (-2, 2),
                  (-1, -2), (-1, -1), (-1, 0), (-1, 1), (-1, 2),
                  (0, -2), (0, -1)]


def local_window(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour raster indices (grid^2, 12) and validity mask (grid^2, 12) for a grid x grid token map.

    Every valid neighbour index is strictly smaller than the cell's own index (raster causality).
    Invalid slots carry index 0 and mask False.
    """
    cell = torch.arange(grid * grid)
    i, j = cell // grid, cell % grid
    d = torch.tensor(WINDOW_OFFSETS)
    ni, nj = i[:, None] + d[None, :, 0], j[:, None] + d[None, :, 1]
    valid = (ni >= 0) & (nj >= 0) & (nj < grid)
    idx = torch.where(valid, ni * grid + nj, torch.zeros_like(ni))
    return idx, valid


def _mlp(d_in: int, d_hidden: int, d_out: int, bias_out: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out, bias=bias_out))


class LocalContext(nn.Module):
    """Gathers the 12 causal neighbours' backbone states and compresses them to one vector (Eq. 15).

    mode "compressed": shared MLP D -> D/4 -> D//12 per neighbour, concatenate, FFN 12*(D//12) -> 2D -> D.
    mode "concat":     the naive full-width concatenation 12*D -> 2D -> D (Table 6).
    source "official": neighbour (r, c) contributes the backbone output that predicts token (r, c), as the
                       released IAR2 code does; "token": the output that has already seen token (r, c).
    """

    def __init__(self, dim: int, grid: int, mode: Literal["compressed", "concat"] = "compressed",
                 source: Literal["official", "token"] = "official"):
        super().__init__()
        self.mode, self.source = mode, source
        idx, valid = local_window(grid)
        self.register_buffer("idx", idx, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        n = len(WINDOW_OFFSETS)
        if mode == "compressed":
            self.mlp1 = _mlp(dim, dim // 4, dim // 12)  # shared per neighbour
            self.mlp2 = _mlp(n * (dim // 12), 2 * dim, dim)
        else:
            self.mlp2 = _mlp(n * dim, 2 * dim, dim)

    def zero_feature(self, h: torch.Tensor) -> torch.Tensor:
        """An out-of-grid neighbour is a zero hidden state, so it contributes mlp1(0) (a bias), not 0."""
        D = h.shape[-1]
        return self.mlp1(h.new_zeros(1, D))[0] if self.mode == "compressed" else h.new_zeros(D)

    def forward(self, h: torch.Tensor, cell: int | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, P, D) per-cell backbone states; row q is the state neighbour q contributes (for source
        "token" the owner passes the outputs shifted by one). Returns contexts (B, P, D) for all cells, or
        (B, 1, D) for one `cell` (incremental decoding: only its 12 neighbours are touched). `zero`: the
        zero_feature, when the caller computed it once for a whole decode."""
        B, P, D = h.shape
        compressed = self.mode == "compressed"
        zero = self.zero_feature(h) if zero is None else zero
        if cell is None:
            feats = self.mlp1(h) if compressed else h  # per-row MLP first: cheaper than per (cell, neighbour)
            g = feats[:, self.idx[:P]]  # (B, P, 12, F)
            valid = self.valid[:P]
        else:
            g = h[:, self.idx[cell:cell + 1]]  # (B, 1, 12, D): gather first, then compress 12 rows
            g = self.mlp1(g) if compressed else g
            valid = self.valid[cell:cell + 1]
        g = torch.where(valid[None, :, :, None], g, zero)
        return self.mlp2(g.flatten(2))


class SemanticDetailHead(Fp32Rope):
    """Hierarchical semantic -> detail prediction with an optional local context (Sec. 4.3.2 / 4.4)."""

    def __init__(self, cfg: BackboneConfig, n_layer: int, semantic_size: int, detail_size: int,
                 local_context: Literal["compressed", "concat", "none"] = "compressed",
                 context_source: Literal["official", "token"] = "official"):
        super().__init__()
        D = cfg.dim
        self.use_context = local_context != "none"
        self.context = LocalContext(D, cfg.grid, local_context, context_source) if self.use_context else None
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(n_layer))
        self.output1 = _mlp(D, 2 * D, semantic_size)  # semantic logits
        self.output2 = _mlp(D, 2 * D, detail_size)  # detail logits
        # rotary rows of the head sequence: the context slot gets zeros (as the class token), the others
        # angle 0 (identity): the head sees order through causality only
        half = cfg.head_dim // 2
        rope = torch.zeros(3, half, 2)
        rope[1:, :, 0] = 1.0
        if not self.use_context:
            rope = rope[1:]
        self.register_buffer("rope", rope, persistent=False)

    def zero_init_outputs(self):
        nn.init.zeros_(self.output1[2].weight)
        nn.init.zeros_(self.output2[2].weight)

    def _run(self, seq: torch.Tensor, norm: nn.Module, start: int | None = None, last: bool = False) -> torch.Tensor:
        """Full causal pass, or (start given, caches set) an incremental pass of new slots start..start+S-1.
        last: normalise only the last slot (the one whose logits are read)."""
        rope = self.rope[: seq.shape[1]] if start is None else self.rope[start:start + seq.shape[1]]
        for blk in self.blocks:
            seq, _ = blk(seq, rope, start)
        return norm(seq[:, -1]) if last else norm(seq)

    def setup_cache(self, batch: int, dtype, device) -> None:
        """KV caches for incremental decoding: the semantic step fills [c, h], the detail step adds one slot."""
        attn = self.blocks[0].attention
        for blk in self.blocks:
            blk.attention.kv_cache = KVCache(batch, self.rope.shape[0], attn.n_head, attn.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for blk in self.blocks:
            blk.attention.kv_cache = None

    # The semantic-token embedding Emb_s is the backbone's (token fusion, Eq. 12): the owner passes it in.
    def forward(self, h: torch.Tensor, ctx: torch.Tensor | None, sem_emb: torch.Tensor, norm: nn.Module):
        """Teacher-forced: h, ctx, sem_emb = Emb_s(k) all (B, P, D) -> (logits_sem, logits_det)."""
        B, P, D = h.shape
        parts = ([ctx] if self.use_context else []) + [h, sem_emb]
        seq = torch.stack(parts, dim=2).reshape(B * P, len(parts), D)
        out = self._run(seq, norm).reshape(B, P, len(parts), D)
        o = 1 if self.use_context else 0
        return self.output1(out[:, :, o]).float(), self.output2(out[:, :, o + 1]).float()

    def _cached(self) -> bool:
        return self.blocks[0].attention.kv_cache is not None

    def predict_semantic(self, h: torch.Tensor, ctx: torch.Tensor | None, norm: nn.Module) -> torch.Tensor:
        """Inference step 1: semantic logits from [c, h] (B, D) -> (B, V_s). Fills the head caches if set."""
        parts = ([ctx] if self.use_context else []) + [h]
        out = self._run(torch.stack(parts, dim=1), norm, 0 if self._cached() else None, last=True)
        return self.output1(out).float()

    def predict_detail(self, h: torch.Tensor, ctx: torch.Tensor | None, sem_emb: torch.Tensor, norm: nn.Module):
        """Inference step 2: detail logits from [c, h, Emb_s(k)], each (B, D) -> (B, V_d).

        With caches set (after predict_semantic for the same patch) only the new slot is computed."""
        if self._cached():
            out = self._run(sem_emb[:, None], norm, self.rope.shape[0] - 1, last=True)
        else:
            parts = ([ctx] if self.use_context else []) + [h, sem_emb]
            out = self._run(torch.stack(parts, dim=1), norm, last=True)
        return self.output2(out).float()
