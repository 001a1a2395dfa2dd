"""The weights-read bound of one decode step: what the GEMMs alone cost on this hardware.

A decode step of batch B with CFG multiplies a (2B)-row activation with every Linear weight the step uses;
with few rows that is bound by reading the weights. The bound is measured, not modelled: the same
F.linear calls, in the same dtype and thread setting, with nothing else around them. The local-context
head runs twice per step (semantic, then detail), so its blocks count twice; the alternating and grouped
paradigms read one of their two output layers per step (counted as the detail one).
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


def weights_read_step(model: nn.Module, rows: int, device: torch.device, dtype: torch.dtype):
    """A callable running every decode-step GEMM once per use on a `rows`-row activation."""
    calls = [(m.weight, m.bias) for _, m, uses in linear_uses(model) for _ in range(uses)]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=dtype) for w, _ in calls}

    @torch.no_grad()
    def step():
        for w, b in calls:
            F.linear(xs[w.shape[1]], w, b)

    return step


def weight_bytes(model: nn.Module) -> int:
    """Bytes of Linear weights one decode step reads (with the head's second pass)."""
    return sum(m.weight.numel() * m.weight.element_size() * uses for _, m, uses in linear_uses(model))
