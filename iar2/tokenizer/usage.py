"""Codebook usage of a code histogram: the one place it is computed.

Tokenizer training logs it per logging window, `iar2 vq eval` over the val split and `iar2 diagnose tokenizer`
per level; each names the numbers its own way (kept so existing metrics.csv / JSON files stay readable), but the
numbers come from `usage_stats`.
"""
from __future__ import annotations

import torch


def code_histogram(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Counts (size,) of every code in `indices` (any shape)."""
    return torch.bincount(indices.reshape(-1), minlength=size)


def usage_stats(counts) -> dict[str, float]:
    """usage: fraction of the codes used; codes_used; entropy (nats) of the histogram; perplexity exp(entropy).

    `counts` is a tensor, array or list of per-code counts; the sums are in float64 (a large split's counts are
    beyond float32's exact integers)."""
    c = torch.as_tensor(counts).detach().cpu().double()
    p = c[c > 0] / c.sum().clamp_min(1)
    entropy = -(p * p.log()).sum()
    return {"usage": float((c > 0).double().mean()), "codes_used": int((c > 0).sum()),
            "entropy": float(entropy), "perplexity": float(entropy.exp())}
