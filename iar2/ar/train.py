"""One trainer for every AR variant (LlamaGen, IAR, IAR2 and the Table 5/6 paradigms).

`iar2 ar train --config C.yaml [--set key=value ...] --out RUN_DIR [--resume auto]`

- AdamW (betas 0.9/0.95), weight decay on matrices and embeddings only, constant or cosine LR,
  gradient clipping, gradient accumulation to reach the global batch on fewer GPUs.
- torchrun: DDP (or FSDP for the largest models); the data order is step-addressable
  (iar2.distributed.StepSampler), so a resumed run or a different GPU count sees the same batches.
- Budget: epochs, steps, or wall-clock minutes (Tables 5 and 6 compare variants at equal time).
- Checkpoints: a rolling latest for resume plus named epoch checkpoints (Figure 7c, Table 3);
  each exports model weights (safetensors + JSON) for sampling.
- Logs: total, per-level CE (semantic/detail or token/cluster), LR, tokens/s (and MFU on GPUs)
  to metrics.csv (Figure 8) and the log.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from iar2.ar.config import ARRunConfig, ARTrainConfig
from iar2.ar.model import ARModel, ARModelConfig
from iar2 import fingerprint
from iar2.checkpoint import load_checkpoint, save_weights
from iar2.config import ConfigError, config_hash, load_config, to_dict
from iar2.distributed import DistInfo, init_distributed, mix_seed, no_sync, unwrap, wrap_ddp
from iar2.training import (UNBOUNDED, Job, Loop, NonFiniteGuard, checkpoint_to_resume, grad_norm, step_batches,
                           tracked)

log = logging.getLogger(__name__)


def check_against_tokens(cfg: ARRunConfig, meta: dict) -> None:
    """The model must fit the token set: levels, vocabulary sizes, grid and classes."""
    m = cfg.model
    vocab, grid = list(meta["vocab_sizes"]), list(meta["grid"])
    if grid[0] != grid[1] or grid[0] != m.grid:
        raise ConfigError(f"model.grid: {m.grid} does not match the tokens' grid {grid} ({cfg.train.tokens})")
    if m.paradigm == "single":
        if len(vocab) != 1 or vocab[0] != m.vocab_size:
            raise ConfigError(f"model.vocab_size: {m.vocab_size} does not match the tokens' vocabularies {vocab}")
    elif vocab != [m.semantic_size, m.detail_size]:
        raise ConfigError(f"model.semantic_size/detail_size: ({m.semantic_size}, {m.detail_size}) do not match "
                          f"the tokens' vocabularies {vocab}")
    if int(meta["num_classes"]) > m.num_classes:
        raise ConfigError(f"model.num_classes: {m.num_classes} is below the tokens' {meta['num_classes']} classes")


def param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices and embeddings (dim >= 2), not norms or biases (LlamaGen)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def lr_at(tc: ARTrainConfig, step: int, total: int) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    t = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.lr_end + 0.5 * (tc.lr - tc.lr_end) * (1 + math.cos(math.pi * min(1.0, t)))


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, f in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12)):
        if key in name:
            return f
    return None


class ARTrainer(Job):
    """The model, AdamW and one step of an AR run, for the shared loop (iar2/training.py). `spe`: optimizer steps
    per (nominal) epoch, for the epoch that is logged and checkpointed."""

    def __init__(self, cfg: ARRunConfig, total_steps: int, info: DistInfo | None = None, spe: float = 1.0):
        self.cfg, self.info = cfg, info or init_distributed(cfg.train.device)
        tc, dev = cfg.train, self.info.device
        torch.manual_seed(tc.seed)  # initial weights are a function of the seed
        self.model = ARModel(cfg.model).to(dev)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.total_steps, self.spe = total_steps, spe
        self.tokens_per_step = tc.batch_size * cfg.model.grid ** 2 * (1 if cfg.model.paradigm == "single" else 2)
        self.flops_peak = peak_flops(dev)
        self.last: dict[str, float] = {}  # the last step's numbers (what is logged)
        fused = dev.type == "cuda"
        self.opt = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas),
                                     fused=fused or None)
        self.net = self._wrap(self.model)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tc.precision == "bf16" and dev.type == "cuda"
                         else nullcontext())
        self.gen = torch.Generator(device=dev)
        self.guard = NonFiniteGuard(tc.nonfinite_skips, what=f"ar train {cfg.name}")

    def _wrap(self, model):
        tc = self.cfg.train
        if tc.fsdp and self.info.distributed:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            from iar2.ar.gpt import TransformerBlock

            mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if tc.precision == "bf16" else None
            net = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({TransformerBlock}), mixed_precision=mp,
                       sharding_strategy=ShardingStrategy.FULL_SHARD,
                       device_id=self.info.device if self.info.device.type == "cuda" else None)
        else:
            net = wrap_ddp(model, self.info)
        return torch.compile(net) if tc.compile else net

    @property
    def sharded(self) -> bool:
        """FSDP across processes: the optimizer state stays sharded, so checkpoints hold the weights only."""
        return self.cfg.train.fsdp and self.info.distributed

    def state_for_checkpoint(self) -> tuple[dict, dict | None]:
        if self.sharded:
            from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

            with FSDP.state_dict_type(unwrap(self.net), StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
                return unwrap(self.net).state_dict(), None  # optimizer state stays sharded: resume restarts Adam
        return self.model.state_dict(), self.opt

    def train_step(self, step: int, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        tc, dev = self.cfg.train, self.info.device
        # dropout and class-dropout randomness is a function of (seed, rank, step): a resumed run draws the same
        seed = mix_seed(tc.seed, self.info.rank, step)
        torch.manual_seed(seed)
        self.gen.manual_seed(seed)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(tc, step, self.total_steps)
        self.net.train()
        sums: dict[str, float] = {}
        for i, (tokens, labels) in enumerate(micro):
            tokens, labels = tokens.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            if tokens.shape[1] == 1:  # a single codebook's one level: (B, 1, m) -> (B, m)
                tokens = tokens[:, 0]
            last = i == len(micro) - 1
            with no_sync(self.net, not last), self.autocast:
                out = self.net(tokens, labels, self.gen)
                loss, parts = self.model.loss(out, tokens)
            # backward even when the loss is NaN: DDP ranks must all reduce; the norm below then sees it everywhere
            (loss / len(micro)).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(micro)
        norm = grad_norm(self.net.parameters(), tc.grad_clip)
        if tc.grad_clip > 0:
            sums["grad_norm"] = norm
        finite = self.guard.allow(step + 1, sums["loss"], "loss") and self.guard.allow(step + 1, norm)
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sums["lr"] = self.opt.param_groups[0]["lr"]
        sums["skipped_steps"] = float(self.guard.skipped)
        self.last = sums
        return sums

    # -- what the shared loop asks of a trainer (iar2/training.py Job)

    def pop_metrics(self, step: int, steps_per_s: float) -> dict[str, float]:
        metrics = dict(self.last)
        metrics["tokens_per_s"] = steps_per_s * self.tokens_per_step
        metrics["epoch"] = step / self.spe
        if self.flops_peak:
            metrics["mfu"] = 6 * self.n_params * metrics["tokens_per_s"] / self.info.world_size / self.flops_peak
        return metrics

    def after_step(self, loop: Loop, step: int) -> None:
        """A named checkpoint and weights after each epoch of train.ckpt_epochs (Figure 7c, Table 3)."""
        for e in sorted(set(self.cfg.train.ckpt_epochs)):
            if _epoch_step(e, self.spe) == step:
                loop.save(step, name=f"epoch_{e:03d}")
                self.write_weights(loop.run_dir / f"model_e{e:03d}.safetensors", step)

    def checkpoint_state(self, step: int) -> tuple[dict, dict | None, dict]:
        sd, opt = self.state_for_checkpoint()
        return {"model": sd}, {"opt": opt} if opt is not None else None, {"config": to_dict(self.cfg),
                                                                          "epoch": step / self.spe}

    def load(self, ckpt: Path) -> dict:
        opt = None if self.sharded else {"opt": self.opt}
        return load_checkpoint(ckpt, {"model": self.model}, opt, map_location=str(self.info.device))

    def export(self, run_dir: Path, step: int, elapsed: float) -> None:
        self.write_weights(run_dir / "model.safetensors", step, {"elapsed_s": elapsed})

    def write_weights(self, path: Path, step: int, extra: dict | None = None) -> None:
        """Model weights for sampling (safetensors + JSON); every process calls it (FSDP gathers), the main one
        writes."""
        sd, _ = self.state_for_checkpoint()
        if self.info.is_main:
            cfg = self.cfg
            save_weights(path, sd, {"model_config": to_dict(cfg.model), "run_config": to_dict(cfg),
                                    "config_hash": config_hash(cfg), "step": step, "epoch": step / self.spe,
                                    "params": self.n_params, **(extra or {})})


# Keys that may differ between a run and its resumption (they do not change the result; the tokens' content is
# an input of the fingerprint, so their path may move).
AR_RESUMABLE_CHANGES = {"train.log_every", "train.ckpt_every", "train.keep_last", "train.device", "train.num_workers",
                        "train.tokens", "train.nonfinite_skips"}


def resume_fingerprint(cfg: ARRunConfig) -> dict:
    """What an AR run's checkpoints depend on (iar2/fingerprint.py): its config and its tokens' content."""
    return fingerprint.fingerprint("ar_train", to_dict(cfg), {"tokens": cfg.train.tokens},
                                   ignore=AR_RESUMABLE_CHANGES)


def steps_per_epoch(tc: ARTrainConfig, n: int) -> float:
    return tc.epoch_steps if tc.epoch_steps else n / tc.batch_size


def budget_steps(tc: ARTrainConfig, n: int) -> int:
    if tc.steps is not None:
        return tc.steps
    if tc.epochs:
        return max(1, math.ceil(round(tc.epochs * steps_per_epoch(tc, n), 6)))
    return UNBOUNDED  # wall-clock budget only


def _epoch_step(epoch: float, spe: float) -> int:
    """The optimizer step after which `epoch` epochs are done (the same rounding as the budget)."""
    return max(1, math.ceil(round(epoch * spe, 6)))


def _collate(items):
    tokens = torch.stack([t for t, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return tokens, labels


def train(cfg: ARRunConfig, run_dir: str | Path, resume: str | None = None, stop_after: int | None = None) -> Path:
    """Train (or continue) one AR run; returns the exported final weights path. Logs one MLflow run.

    resume: None (start), 'auto' (continue the run's newest checkpoint, if it is of this config and these tokens)
    or a checkpoint folder. stop_after: end this invocation after that many steps, with a checkpoint."""
    from iar2.tokenize import TokenDataset  # imports torchvision: only when training

    tc, run_dir = cfg.train, Path(run_dir)
    info = init_distributed(tc.device)
    with tracked(cfg.name, to_dict(cfg), {"job": "ar_train"}, run_dir, info) as mlrun:
        data = TokenDataset(tc.tokens, seed=tc.seed)
        check_against_tokens(cfg, data.meta)
        total = budget_steps(tc, len(data))
        ckpt = checkpoint_to_resume(run_dir, resume, resume_fingerprint(cfg), f"ar train {cfg.name}", info.is_main)
        trainer = ARTrainer(cfg, total, info, steps_per_epoch(tc, len(data)))
        loop = Loop(trainer, info, run_dir, desc=cfg.name, log_every=tc.log_every, ckpt_every=tc.ckpt_every,
                    keep_last=tc.keep_last)
        loop.restore(ckpt, auto=resume == "auto")
        loop.open_log(to_dict(cfg), sinks=[mlrun])
        end = total if stop_after is None else min(total, loop.start + stop_after)
        loader, _ = step_batches(data, tc.batch_size, tc.seed, info, tc.grad_accum, loop.start, end,
                                 tc.num_workers, _collate)
        loop.run(iter(loader), end, total, tc.grad_accum, tc.max_minutes * 60 if tc.max_minutes is not None else None)
    return run_dir / "model.safetensors"


def load_ar(path: str | Path, device: str | torch.device = "cpu") -> ARModel:
    """An exported AR model (model.safetensors + .json) in eval mode."""
    from iar2.checkpoint import load_meta, load_weights
    from iar2.config import from_dict

    meta = load_meta(path)
    model = ARModel(from_dict(ARModelConfig, meta["model_config"]))
    model.load_state_dict(load_weights(path, device))
    return model.to(device).eval()


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import positive_int  # argparse types with a range
    p.add_argument("--config", help="AR run config (YAML, ARRunConfig: model + train)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=100 model.paradigm=alternating")
    p.add_argument("--budget", default=None, metavar="JSON",
                   help="equal-time budget from `iar2 ar time-match` (sets train.epoch_steps)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.csv, model.safetensors)")
    p.add_argument("--resume", default=None, metavar="auto|CKPT",
                   help="'auto': continue from the run's latest checkpoint (or start); or a checkpoint folder")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop this invocation after N steps (with a checkpoint)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.budget:
        overrides.append(f"train.epoch_steps={json.loads(Path(args.budget).read_text())['epoch_steps']!r}")
    cfg = load_config(ARRunConfig, args.config, overrides)
    path = train(cfg, args.out, resume=args.resume, stop_after=args.stop_after)
    log.info("done: %s", path)
    return 0
