"""What every trainer (AR, tokenizer, reference network) shares: the non-finite guard before each optimiser step.

A step whose loss or gradients are NaN/Inf is never applied: applying it writes non-finite weights, every later
checkpoint carries them, and every resume (every SLURM retry) fails the same way. A transient spike may be
skipped (`budget` steps per run, counted across resumes); past the budget the run stops with one message that
names the step, the value and the last good checkpoint, which stays the newest one on disk.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training met NaN/Inf values it cannot step over; the message names the step and the last good checkpoint."""


class NonFiniteGuard:
    """Decides, before each optimiser step, whether it may be applied (see the module doc)."""

    def __init__(self, budget: int = 0, skipped: int = 0, what: str = "training"):
        self.budget, self.skipped, self.what = budget, skipped, what
        self.last_checkpoint: str | None = None

    def allow(self, step: int, value: float, kind: str = "gradient norm") -> bool:
        """True if `value` (the loss or the gradient norm of 1-based `step`) is finite; else skip the step (False)
        while the budget lasts, then raise NonFiniteError."""
        if math.isfinite(value):
            return True
        self.skipped += 1
        if self.skipped > self.budget:
            raise NonFiniteError(
                f"{self.what}: non-finite {kind} ({value}) at step {step}; no update was made and no checkpoint "
                f"was written from it; last good checkpoint: {self.last_checkpoint or 'none'}. "
                f"{self.skipped - 1} earlier step(s) were skipped (budget {self.budget}). Lower the learning rate "
                "or fix the config, then resume (--resume auto continues from that checkpoint)")
        log.warning("%s: non-finite %s (%s) at step %d: step skipped (%d of %d allowed)", self.what, kind, value,
                    step, self.skipped, self.budget)
        return False


def grad_norm(params: Iterable[torch.nn.Parameter], clip: float = 0.0) -> float:
    """Total gradient norm (2-norm over all parameters), clipping to `clip` when > 0. NaN/Inf when any
    gradient is; then the gradients are left for the caller to drop."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
