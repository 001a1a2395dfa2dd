"""Equal training time (Tables 5 and 6): give a variant the step budget its reference run gets in the same time.

The paper trains every paradigm "for an equal amount of time, corresponding to the duration needed for our model
to train for 100 epochs". A wall-clock budget would make the result depend on the machine's load, so instead we
measure both models' seconds per optimizer step once, on the job's own hardware and tokens, and write the
variant's steps per nominal epoch: epoch_steps(variant) = epoch_steps(reference) * t(reference) / t(variant).
That measurement is an artifact of the DAG: training is then a function of (code, config, seed, measurement).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import yaml

from iar2.config import from_dict
from iar2.io import atomic_write_json

log = logging.getLogger(__name__)


def seconds_per_step(cfg, steps: int, warmup: int) -> float:
    """Median wall time of full training steps (forward, backward, AdamW) on the run's own tokens."""
    from iar2.ar.train import ARTrainer, _collate, check_against_tokens
    from iar2.distributed import init_distributed
    from iar2.tokenize import TokenDataset

    data = TokenDataset(cfg.train.tokens, seed=cfg.train.seed)
    check_against_tokens(cfg, data.meta)
    trainer = ARTrainer(cfg, steps + warmup, init_distributed(cfg.train.device))
    g = torch.Generator().manual_seed(cfg.train.seed)
    times = []
    for step in range(steps + warmup):
        idx = torch.randint(0, len(data), (cfg.train.batch_size // cfg.train.grad_accum,), generator=g).tolist()
        micro = [_collate([data[i] for i in idx]) for _ in range(cfg.train.grad_accum)]
        t0 = time.perf_counter()
        trainer.train_step(step, micro)
        if trainer.info.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_match(config: str, reference: str, steps: int = 8, warmup: int = 2) -> dict:
    from iar2.ar.config import ARRunConfig
    from iar2.ar.train import steps_per_epoch
    from iar2.tokenize import TokenDataset

    cfg = from_dict(ARRunConfig, yaml.safe_load(Path(config).read_text()))
    ref = from_dict(ARRunConfig, yaml.safe_load(Path(reference).read_text()))
    # Interleave the measurements (ref, variant, ref, variant) so a load change hits both alike.
    t_ref, t_var = [], []
    for _ in range(2):
        t_ref.append(seconds_per_step(ref, steps, warmup))
        t_var.append(seconds_per_step(cfg, steps, warmup))
    t_ref, t_var = min(t_ref), min(t_var)
    ref_spe = steps_per_epoch(ref.train, len(TokenDataset(ref.train.tokens, seed=ref.train.seed)))
    out = {"epoch_steps": ref_spe * t_ref / t_var, "reference": ref.name, "variant": cfg.name,
           "reference_epoch_steps": ref_spe, "seconds_per_step": {ref.name: t_ref, cfg.name: t_var},
           "speed_ratio": t_ref / t_var}
    log.info("%s: %.4f s/step vs %s %.4f s/step -> %.3f steps per nominal epoch (reference %.3f)",
             cfg.name, t_var, ref.name, t_ref, out["epoch_steps"], ref_spe)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import nonneg_int, positive_int  # argparse types with a range
    p.add_argument("--config", required=True, help="the variant's ARRunConfig YAML")
    p.add_argument("--reference", required=True, help="the reference run's ARRunConfig YAML")
    p.add_argument("--steps", type=positive_int, default=8, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed steps first")
    p.add_argument("--out", required=True, help="JSON with epoch_steps for the variant")


def run(args: argparse.Namespace) -> int:
    atomic_write_json(args.out, time_match(args.config, args.reference, args.steps, args.warmup))
    return 0
