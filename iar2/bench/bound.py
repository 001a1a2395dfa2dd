"""The weights-read bound of one decode step: what the GEMMs alone cost on this hardware.

A decode step of batch B with CFG multiplies a (2B)-row activation with every Linear weight the step uses;
with few rows that is bound by reading the weights. The bound is measured, not modelled: the same
F.linear calls, in the same dtype and thread setting, with nothing else around them. The local-context
head runs twice per step (semantic, then detail), so its blocks count twice; the alternating and grouped
paradigms read one of their two output layers per step (counted as the detail one).

On a CPU thread an 8-row GEMM is not bound by reading the weights alone: its cost still grows with the rows.
So `shapes="actual"` also gives the step's GEMMs at the row counts they really run (the head's semantic pass
carries two slots [c, h], the local context compresses 12 gathered neighbours per row): the step's time above
that is what everything but the GEMMs costs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_uses(model: nn.Module) -> list[tuple[str, nn.Linear, int]]:
    """(name, Linear, uses per decode step) for every Linear a decode step runs."""
    paradigm = model.cfg.paradigm
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        uses = 1
        if name.startswith("head.blocks."):
            uses = 2
        if paradigm in ("alternating", "grouped") and name == "output1":
            uses = 0  # half the steps read output1, half output2: counted as output2 (the detail head) each step
        if uses:
            out.append((name, mod, uses))
    return out


def row_factors(model: nn.Module, name: str, uses: int) -> list[int]:
    """Rows per decode row of each use of Linear `name` (see the module note; 1 where the step has one slot)."""
    cfg = model.cfg
    if name.startswith("head.blocks."):
        return [2 if cfg.local_context != "none" else 1, 1]  # semantic [c, h] (or [h]), then the detail slot
    if name.startswith("head.context.mlp1."):
        return [12] * uses  # the 12 neighbours, gathered first and compressed each
    return [1] * uses


def weights_read_step(model: nn.Module, rows: int, device: torch.device, dtype: torch.dtype,
                      shapes: str = "bound"):
    """A callable running every decode-step GEMM once per use: on a `rows`-row activation (shapes "bound"), or
    at the rows each really runs (shapes "actual")."""
    calls = []
    for name, m, uses in linear_uses(model):
        factors = row_factors(model, name, uses) if shapes == "actual" else [1] * uses
        calls += [(m.weight, m.bias, rows * f) for f in factors]
    xs = {(w.shape[1], r): torch.randn(r, w.shape[1], device=device, dtype=dtype) for w, _, r in calls}

    @torch.no_grad()
    def step():
        for w, b, r in calls:
            F.linear(xs[w.shape[1], r], w, b)

    return step


def weight_bytes(model: nn.Module) -> int:
    """Bytes of Linear weights one decode step reads (with the head's second pass)."""
    return sum(m.weight.numel() * m.weight.element_size() * uses for _, m, uses in linear_uses(model))
