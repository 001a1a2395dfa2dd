"""The training loop every trainer (AR, tokenizer, reference network) runs, and the non-finite guard it applies.

A trainer is a `Job`: it owns its model, losses and optimisers, does one optimiser step on a list of micro-batches
(`train_step`), and says what its logs show, what a checkpoint holds, how one is loaded and how the weights are
exported. `Loop` does the rest, the same way for every trainer:

- resume: `--resume auto` continues the newest loadable checkpoint if its fingerprint (iar2/fingerprint.py) matches;
  checkpoints of other inputs or of a finished run are set aside and the run starts over; a folder is loaded as is;
- the run folder: config.yaml, metrics.csv (a row per logging window, with the step rate) and a progress bar;
- the steps: `accum` micro-batches per step from the trainer's batches, up to a step budget or a wall-clock budget,
  or an earlier stop (`stop_after`, as a scheduler's time limit would) that `--resume auto` continues;
- checkpoints: every `ckpt_every` steps and after the last one, never with non-finite weights; every DDP rank takes
  part (FSDP gathers the weights then), the main one writes;
- the end: the exported weights, and the fingerprint marked complete (a later run of the job is a recomputation).

The non-finite guard: a step whose loss or gradients are NaN/Inf is never applied: applying it writes non-finite
weights, every later checkpoint carries them, and every resume (every SLURM retry) fails the same way. A transient
spike may be skipped (`budget` steps per run, counted across resumes); past the budget the run stops with one
message that names the step, the value and the last good checkpoint, which stays the newest one on disk.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
import yaml
from tqdm import tqdm

from iar2 import fingerprint, tracking
from iar2.checkpoint import (CheckpointError, auto_resume_checkpoint, check_finite, latest_checkpoint,
                             load_newest_good, save_checkpoint)
from iar2.distributed import DistInfo, StepSampler, StepSeededDataset, barrier
from iar2.io import atomic_write_text

log = logging.getLogger(__name__)

UNBOUNDED = 10 ** 12  # the step budget of a run that only a wall-clock budget ends


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


# ----------------------------------------------------------------------------- what a trainer supplies

class Job:
    """One trainer as the loop sees it. `guard` (a NonFiniteGuard) is the job's; the loop keeps its count and last
    checkpoint across resumes. Methods that all DDP ranks call say so: they may hold collectives."""

    guard: NonFiniteGuard
    progress_keys: tuple[str, ...] = ("loss",)  # the metrics shown on the progress bar

    def train_step(self, step: int, micro: list) -> None:
        """One optimiser step (0-based `step`) on this process's micro-batches."""
        raise NotImplementedError

    def pop_metrics(self, step: int, steps_per_s: float) -> dict[str, float]:
        """The numbers of the logging window that ends after `step` steps (all ranks)."""
        return {}

    def after_step(self, loop: Loop, step: int) -> None:
        """Anything the trainer does after step `step` besides logging and rolling checkpoints (all ranks)."""

    def checkpoint_state(self, step: int) -> tuple[dict, dict | None, dict]:
        """(modules or state dicts, optimisers, metadata) of the checkpoint after `step` steps (all ranks)."""
        raise NotImplementedError

    def load(self, ckpt: Path) -> dict:
        """Load checkpoint folder `ckpt` into the job; its metadata. Raises on a checkpoint it cannot continue."""
        raise NotImplementedError

    def export(self, run_dir: Path, step: int, elapsed: float) -> None:
        """Write the final weights (all ranks; the main one writes)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- the shared parts

def checkpoint_to_resume(run_dir: str | Path, resume: str | None, fp: dict, what: str, is_main: bool) -> Path | None:
    """The checkpoint `--resume` asks to continue: a folder as given; for None or 'auto', the run's checkpoints are
    first checked against fingerprint `fp` (set aside unless they match and the run had not finished), then 'auto'
    takes the newest one. None: start from step 0."""
    if resume not in (None, "auto"):
        return Path(resume)
    reusable = auto_resume_checkpoint(run_dir, fp, what, is_main)
    return latest_checkpoint(run_dir) if resume == "auto" and reusable else None


def step_batches(dataset, batch_size: int, seed: int, info: DistInfo, accum: int, start: int, end: int,
                 num_workers: int = 0, collate_fn=None) -> tuple[torch.utils.data.DataLoader, StepSampler]:
    """This process's micro-batches of steps start..end-1: the batches of a step are a function of (seed, step), so
    a resumed run, or one on another number of GPUs, sees the same data (iar2.distributed.StepSampler)."""
    sampler = StepSampler(len(dataset), batch_size, seed, info.rank, info.world_size, accum,
                          start_step=start, end_step=end)
    loader = torch.utils.data.DataLoader(StepSeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                                         num_workers=num_workers, pin_memory=info.device.type == "cuda")
    return loader, sampler


@contextlib.contextmanager
def tracked(name: str, config: dict, tags: dict, run_dir: str | Path, info: DistInfo):
    """One MLflow run around a training run (iar2/tracking.py), ending with its metrics.csv and config.yaml."""
    with tracking.start_run(name, params=config, tags=tags, is_main=info.is_main) as mlrun:
        yield mlrun
        mlrun.log_artifact(Path(run_dir) / "metrics.csv")
        mlrun.log_artifact(Path(run_dir) / "config.yaml")


# ----------------------------------------------------------------------------- the loop

class Loop:
    """Runs a Job's steps (see the module doc). Without a run folder (the reference network) there is no resume,
    no log file and no checkpoint: just the steps, the guard and the progress bar."""

    def __init__(self, job: Job, info: DistInfo, run_dir: str | Path | None = None, *, desc: str,
                 log_every: int, ckpt_every: int | None = None, keep_last: int | None = None):
        self.job, self.info, self.desc = job, info, desc
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_every, self.ckpt_every, self.keep_last = log_every, ckpt_every, keep_last
        self.start = 0  # the step this invocation starts from
        self.elapsed = 0.0  # seconds spent in steps, over every invocation of the run (the wall-clock budget)
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.logger: tracking.MetricsLogger | None = None

    def restore(self, ckpt: Path | None, auto: bool) -> None:
        """Continue from `ckpt` (from checkpoint_to_resume); `auto`: a corrupt newest checkpoint falls back to the
        previous complete one."""
        if ckpt is None:
            return
        if auto:
            ckpt, meta = load_newest_good(self.run_dir, self.job.load)
        else:
            meta = self.job.load(ckpt)
        self.start, self.elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        self.job.guard.skipped = int(meta.get("nonfinite_skipped", 0))
        self.job.guard.last_checkpoint = str(ckpt)
        self.resumed_from = self.last_checkpoint = ckpt
        log.info("resumed %s at step %d (%.1f min trained)", ckpt, self.start, self.elapsed / 60)

    def open_log(self, config: dict, sinks: list | None = None) -> None:
        """config.yaml and metrics.csv (rows past the resumed step, from after the last checkpoint, are dropped)."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            resume_step = self.start if self.resumed_from is not None else None
            self.logger = tracking.MetricsLogger(self.run_dir / "metrics.csv", resume_step=resume_step, sinks=sinks)

    def save(self, step: int, name: str | None = None) -> Path | None:
        """Checkpoint after `step` steps (every rank calls it; the main one writes `name` or step_XXXXXXX)."""
        modules, optimizers, meta = self.job.checkpoint_state(step)
        guard, path = self.job.guard, None
        if self.info.is_main:
            for mname, m in modules.items():
                try:  # weights that went non-finite through finite gradients (a huge LR) are never written
                    check_finite(m.state_dict() if isinstance(m, torch.nn.Module) else m,
                                 f"{mname} weights after step {step}")
                except CheckpointError as e:
                    raise NonFiniteError(f"{guard.what}: {e}; not saved; last good checkpoint: "
                                         f"{guard.last_checkpoint or 'none'}. Lower the learning rate or fix the "
                                         "config, then resume (--resume auto)") from None
            meta = {**meta, "elapsed_s": self.elapsed, "nonfinite_skipped": guard.skipped}
            path = save_checkpoint(self.run_dir, step, modules, optimizers, meta, name=name, keep_last=self.keep_last)
            guard.last_checkpoint = str(path)
            if name is None:
                self.last_checkpoint = path
        barrier(self.info)
        return path

    def run(self, batches: Iterator, end: int, total: int | None = None, accum: int = 1,
            max_seconds: float | None = None) -> bool:
        """Steps `start`..`end`-1, `accum` items of `batches` each; stops early once `elapsed` reaches
        `max_seconds`. `total`: the run's budget (default `end`). True when the run is finished (budget reached:
        then the weights are exported), False when it stopped before (`--resume auto` continues it)."""
        info, job = self.info, self.job
        total = end if total is None else total
        step = self.start
        bar = tqdm(total=total if total < UNBOUNDED else None, initial=step, desc=self.desc, unit="step",
                   disable=not info.is_main, dynamic_ncols=True, mininterval=1.0)
        t_last, s_last, saved, out_of_time = time.perf_counter(), step, None, False
        try:
            while step < end:
                if max_seconds is not None and self.elapsed >= max_seconds:
                    log.info("time budget of %.1f min reached at step %d", max_seconds / 60, step)
                    out_of_time = True
                    break
                t0 = time.perf_counter()
                job.train_step(step, [next(batches) for _ in range(accum)])
                step += 1
                self.elapsed += time.perf_counter() - t0
                bar.update(1)
                if step % self.log_every == 0 or step == end:
                    now = time.perf_counter()
                    metrics = job.pop_metrics(step, (step - s_last) / max(now - t_last, 1e-9))
                    t_last, s_last = now, step
                    if self.logger is not None:
                        self.logger.log(step, metrics)
                    bar.set_postfix({k: f"{metrics[k]:.4g}" for k in job.progress_keys if k in metrics})
                job.after_step(self, step)
                if self.run_dir is not None and self.ckpt_every and (step % self.ckpt_every == 0 or step == end):
                    self.save(step)
                    saved = step
        finally:
            bar.close()
        finished = step >= total or out_of_time
        if self.run_dir is None:
            return finished
        if saved != step:  # the wall-clock budget ended the run, or there was no step left to take
            self.save(step)
        if finished:
            job.export(self.run_dir, step, self.elapsed)
            if info.is_main:
                fingerprint.mark_complete(self.run_dir / "checkpoints")  # a later run of this job is a recomputation
            barrier(info)
        else:
            log.info("stopped after step %d of %d; continue with --resume auto", step, total)
        return finished
