"""`iar2 vq train`: one training loop for every tokenizer variant.

Stages (train.stage):
- single  LlamaGen recipe for the single codebook (and the unassociated dual baseline):
          l2_weight * MSE + perceptual_weight * LPIPS + codebook_weight * q.loss
          + disc_weight * hinge generator loss once step >= disc_start.
- stage1  paper Eq. 7-8: the dual model decodes from the semantic code alone (mode "semantic");
          perceptual(x, x_s) + semantic commitment. The detail codebook is not trained.
          (semantic_l2_weight and semantic_gan add the terms the paper leaves out; off by default.)
- stage2  paper Eq. 9-10, initialised from the stage-1 weights except the detail codebook.
          Joint steps: l2_weight * MSE + q.loss + disc_weight * GAN on the full reconstruction.
          Every `semantic_every`-th step (cycle [joint, joint, semantic] for 3, i.e. 2:1) is an Eq. 7
          step on the semantic-only reconstruction that updates only the semantic codebook.
          Three generator optimisers, as in the official code: main (encoder, decoder, convs),
          semantic codebook, detail codebook; joint steps step all three, semantic steps only one.

The PatchGAN discriminator trains with the hinge loss on the steps whose generator loss uses it.

Reproducibility: the batches of step s are a function of (seed, s) (iar2.distributed.StepSampler),
augmentations of (seed, epoch, index) (ImageFolderDataset's per-sample generators), and every
state that changes (weights, optimiser moments, BatchNorm statistics, RNG states) is checkpointed,
so a run killed and resumed ends bit-identical to an uninterrupted one on the same machine.

Outputs in RUN_DIR: config.yaml, metrics.csv, checkpoints/, and at the end vq.safetensors + vq.json
(the weights downstream steps load with `load_vq`).
"""
from __future__ import annotations

import argparse
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iar2.checkpoint import latest_checkpoint, load_checkpoint, load_weights, rng_state, save_weights, set_rng_state
from iar2.config import ConfigError, config_changes, config_hash, load_config, to_dict
from iar2.distributed import (DistInfo, StepSampler, all_reduce_, average_gradients, cleanup, init_distributed, no_sync,
                              resolve_device, wrap_ddp)
from iar2 import fingerprint
from iar2.training import Job, Loop, NonFiniteGuard, checkpoint_to_resume, grad_norm, step_batches, tracked
from iar2.tokenizer.config import TokenizerRunConfig
from iar2.tokenizer.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from iar2.tokenizer.usage import usage_stats

log = logging.getLogger(__name__)

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vq_tiny.yaml"

# Keys that may change between a run and its resumption (they do not change the result up to the
# step reached); everything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.ckpt_every", "train.keep_last",
                     "train.device", "train.init_from", "data.num_workers", "data.root", "data.check_report",
                     "loss.domain_net", "loss.weights_dir", "train.nonfinite_skips"}


def resume_fingerprint(cfg: TokenizerRunConfig) -> dict:
    """What a tokenizer run's checkpoints depend on (iar2/fingerprint.py): the config (paths aside; more steps may
    continue a run) and the content of what it reads: the train split, the perceptual network's weights and the
    stage-1 weights it starts from."""
    from iar2.data.imagefolder import data_digest

    d, lc = cfg.data, cfg.loss
    inputs = {"data": data_digest(d.root, "train", d.check_report) if Path(d.root).is_dir() else None,
              "domain_net": lc.domain_net if lc.perceptual == "domain" and lc.domain_net else None,
              "weights_dir": lc.weights_dir if lc.perceptual not in ("none", "domain") and lc.weights_dir else None,
              "init_from": _stage1_weights(Path(cfg.train.init_from)) if cfg.train.init_from else None}
    return fingerprint.fingerprint("vq_train", to_dict(cfg), inputs, ignore=RESUMABLE_CHANGES)


# ----------------------------------------------------------------------------- config checks

def check_run_config(cfg: TokenizerRunConfig) -> None:
    """Rules that need the whole run config and are specific to training (ConfigError naming the key)."""
    lc, tc = cfg.loss, cfg.train
    has_perc = lc.perceptual != "none" and lc.perceptual_weight > 0
    if tc.stage in ("stage1", "stage2") and not has_perc and lc.semantic_l2_weight == 0:
        raise ConfigError("loss.perceptual: Eq. 7 updates (stage1, stage-2 semantic steps) reconstruct only through "
                          "the perceptual loss, which is off; set loss.perceptual to 'domain' or 'lpips_vgg' "
                          "(with loss.perceptual_weight > 0) or set loss.semantic_l2_weight > 0")
    if tc.stage == "single" and lc.l2_weight == 0 and not has_perc:
        raise ConfigError("loss.l2_weight: the run has no reconstruction loss (l2_weight 0 and no perceptual loss)")
    if uses_gan(cfg):
        need = PatchDiscriminator.min_image_size(lc.disc_layers)
        if cfg.data.image_size < need:
            raise ConfigError(f"loss.disc_layers: {lc.disc_layers} layers need images of at least {need} px "
                              f"(data.image_size is {cfg.data.image_size}); use fewer layers")


def uses_gan(cfg: TokenizerRunConfig) -> bool:
    """Whether any step of this stage has an adversarial term (then a discriminator is built)."""
    if cfg.loss.disc_weight <= 0:
        return False
    return cfg.train.stage != "stage1" or cfg.loss.semantic_gan


# ----------------------------------------------------------------------------- data

def build_train_dataset(cfg: TokenizerRunConfig):
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import train_transform

    d = cfg.data
    return ImageFolderDataset(d.root, "train", train_transform(d.image_size, d.crop_min, d.flip),
                              report=d.check_report, seed=cfg.train.seed)


# ----------------------------------------------------------------------------- metrics

class CodebookStats:
    """Code histograms over a logging window: usage (fraction of codes used) and perplexity."""

    def __init__(self, sizes: dict[str, int], device: torch.device):
        self.counts = {name: torch.zeros(n, dtype=torch.long, device=device) for name, n in sizes.items()}

    def update(self, indices: torch.Tensor, levels: list[str]) -> None:
        """indices (B, h, w) for one level or (B, L, h, w); `levels` names the levels to count."""
        with torch.no_grad():
            for li, name in enumerate(levels):
                idx = indices if indices.dim() == 3 else indices[:, li]
                c = self.counts[name]
                c += torch.bincount(idx.reshape(-1), minlength=c.numel())

    def summary(self, info: DistInfo) -> dict[str, float]:
        out = {}
        for name, c in self.counts.items():
            c = all_reduce_(c.clone(), info)
            total = int(c.sum())
            if total == 0:
                continue
            u = usage_stats(c)
            out[f"usage_{name}"], out[f"perplexity_{name}"] = u["usage"], u["perplexity"]
            self.counts[name].zero_()
        return out


# ----------------------------------------------------------------------------- the trainer

class VQTrainer(Job):
    """Model, discriminator, losses and optimisers of one tokenizer run; `train_step` does one step. The rest of the
    run (resume, logging, checkpoints) is the shared loop's (iar2/training.py)."""

    progress_keys = ("total", "sem_total")  # stage 2 logs its semantic-only steps apart

    def __init__(self, cfg: TokenizerRunConfig, info: DistInfo | None = None, perceptual: nn.Module | None = None,
                 build_perceptual_module: bool = True):
        from iar2.tokenizer.vq_model import VQModel

        self.cfg, tc, lc = cfg, cfg.train, cfg.loss
        self.info = info or DistInfo(device=resolve_device(tc.device))
        dev = self.info.device
        self.stage = tc.stage
        self.dual = cfg.model.quantizer != "single"
        self.guard = NonFiniteGuard(tc.nonfinite_skips, what=f"vq train {cfg.name} ({tc.stage})")

        torch.manual_seed(tc.seed)  # initial weights are a function of the seed
        self.model = VQModel(cfg.model).to(dev)
        self.disc = PatchDiscriminator(3, lc.disc_ndf, lc.disc_layers).to(dev) if uses_gan(cfg) else None
        if lc.perceptual == "none":
            perceptual = None  # the config decides; a module passed in only replaces building it
        elif perceptual is None and build_perceptual_module:
            from iar2.perceptual import build_perceptual

            perceptual = build_perceptual(lc.perceptual, lc.domain_net, lc.weights_dir)
        self.perceptual = perceptual.to(dev).eval() if perceptual is not None else None
        if self.perceptual is not None:
            self.perceptual.requires_grad_(False)

        # generator optimisers: stage2 splits the codebooks off (the semantic-only step steps just one)
        adam = dict(lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if self.dual and self.stage in ("stage1", "stage2"):
            sem = list(self.model.quantize.semantic_parameters())
            det = list(self.model.quantize.detail_parameters())
            skip = {id(p) for p in sem + det}
            main = [p for p in self.model.parameters() if id(p) not in skip]
            if self.stage == "stage1":  # the detail codebook is not part of Eq. 7
                self.optimizers["main"] = torch.optim.Adam(main + sem, **adam)
            else:
                self.optimizers["main"] = torch.optim.Adam(main, **adam)
                self.optimizers["semantic"] = torch.optim.Adam(sem, **adam)
                self.optimizers["detail"] = torch.optim.Adam(det, **adam)
        else:
            self.optimizers["main"] = torch.optim.Adam(self.model.parameters(), **adam)
        if self.disc is not None:
            self.optimizers["disc"] = torch.optim.Adam(self.disc.parameters(), **{**adam, "lr": lc.disc_lr or tc.lr})

        # DDP for the tokenizer (dual stages leave parameters unused in some steps); the discriminator's
        # gradients are averaged by hand: it is called twice per update (real, fake), plus inside the generator loss
        self.ddp_model = wrap_ddp(self.model, self.info, find_unused_parameters=self.stage in ("stage1", "stage2"))

        self.autocast_dtype = None
        if tc.precision == "bf16":
            if dev.type == "cuda":
                self.autocast_dtype = torch.bfloat16
            else:
                log.warning("train.precision bf16 is used on CUDA only; running fp32 on %s", dev)
        levels = {"single": cfg.model.codebook_size} if not self.dual else \
            {"semantic": cfg.model.semantic_size, "detail": cfg.model.detail_size}
        self.stats = CodebookStats(levels, dev)
        self.level_names = list(levels)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.sampler: StepSampler | None = None  # the run's batches (set by `train`): the epoch of a step

    # -- step schedule ------------------------------------------------------------------------

    def step_kind(self, step: int) -> str:
        """'full' (single stage), 'semantic' (Eq. 7) or 'joint' (Eq. 9) for 0-based step `step`."""
        if self.stage == "single":
            return "full"
        if self.stage == "stage1":
            return "semantic"
        every = self.cfg.train.semantic_every
        return "semantic" if every > 0 and (step + 1) % every == 0 else "joint"

    def gan_active(self, step: int, kind: str) -> bool:
        if self.disc is None or step < self.cfg.loss.disc_start:
            return False
        return kind != "semantic" or self.cfg.loss.semantic_gan

    def stepping_optimizers(self, kind: str) -> list[str]:
        if self.stage == "stage2" and kind == "semantic":
            return ["semantic"]
        return [n for n in self.optimizers if n != "disc"]

    # -- losses ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, q, kind: str, gan: bool) -> dict[str, torch.Tensor]:
        lc = self.cfg.loss
        w_l2, w_perc = {"full": (lc.l2_weight, lc.perceptual_weight),
                        "semantic": (lc.semantic_l2_weight, lc.perceptual_weight),
                        "joint": (lc.l2_weight, lc.joint_perceptual_weight)}[kind]
        recon = recon.float()
        terms = {"l2": F.mse_loss(recon, x), "codebook": q.loss.float()}
        total = w_l2 * terms["l2"] + lc.codebook_weight * terms["codebook"]
        if w_perc > 0 and self.perceptual is not None:
            with self._autocast():
                terms["perceptual"] = self.perceptual(x, recon).float().mean()
            total = total + w_perc * terms["perceptual"]
        if gan:
            self.disc.requires_grad_(False)  # the generator's loss moves only the generator
            with self._autocast():
                terms["gan"] = hinge_g_loss(self.disc(recon).float())
            self.disc.requires_grad_(True)
            total = total + lc.disc_weight * terms["gan"]
        terms["total"] = total
        return terms

    # -- one step --------------------------------------------------------------------------------

    def train_step(self, step: int, micro: list[torch.Tensor]) -> None:
        """One optimisation step (0-based `step`) on this process's micro-batches (grad accumulation)."""
        tc, info = self.cfg.train, self.info
        kind = self.step_kind(step)
        mode = "semantic" if kind == "semantic" else "full"
        gan = self.gan_active(step, kind)
        names = self.stepping_optimizers(kind)
        prefix = "sem_" if self.stage == "stage2" and kind == "semantic" else ""
        n = len(micro)
        self.model.train()
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)

        fakes, sums, finite = [], {}, torch.ones((), device=info.device)
        for i, x in enumerate(micro):
            with no_sync(self.ddp_model, skip=i < n - 1):
                with self._autocast():
                    recon, q = self.ddp_model(x, mode=mode)
                terms = self.generator_loss(x, recon, q, kind, gan)
                (terms["total"] / n).backward()
            finite = finite * torch.isfinite(terms["total"].detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / n
            self.stats.update(q.indices, self.level_names[:1] if mode == "semantic" else self.level_names)
            if gan:
                fakes.append(recon.detach())
        loss_ok = bool(all_reduce_(finite, info, "min"))
        params = [p for name in names for g in self.optimizers[name].param_groups for p in g["params"]]
        norm = grad_norm(params, tc.grad_clip)
        if not (self.guard.allow(step + 1, 1.0 if loss_ok else math.nan, f"loss ({kind} step)")
                and self.guard.allow(step + 1, norm)):
            for o in self.optimizers.values():  # the step is skipped: nothing non-finite reaches the weights
                o.zero_grad(set_to_none=True)
            return
        for name in names:
            self.optimizers[name].step()

        if gan:  # discriminator update on the same images, hinge loss
            opt = self.optimizers["disc"]
            opt.zero_grad(set_to_none=True)
            d_sum = 0.0
            for x, fake in zip(micro, fakes):
                with self._autocast():
                    d_loss = hinge_d_loss(self.disc(x).float(), self.disc(fake).float())
                (d_loss / n).backward()
                d_sum = d_sum + d_loss.detach() / n
            d_ok = bool(all_reduce_(torch.isfinite(d_sum).float(), info, "min"))
            average_gradients(self.disc.parameters(), info)
            d_norm = grad_norm(self.disc.parameters(), tc.grad_clip)
            if self.guard.allow(step + 1, 1.0 if d_ok else math.nan, "discriminator loss") \
                    and self.guard.allow(step + 1, d_norm, "discriminator gradient norm"):
                opt.step()
            opt.zero_grad(set_to_none=True)
            sums["disc"] = d_sum
        for k, v in sums.items():
            self._sums[prefix + k] = self._sums.get(prefix + k, 0.0) + v
            self._counts[prefix + k] = self._counts.get(prefix + k, 0) + 1

    def pop_metrics(self, step: int, steps_per_s: float) -> dict[str, float]:
        """Window means of the losses (averaged over processes) and codebook statistics; resets the window."""
        keys = sorted(self._sums)
        out: dict[str, float] = {}
        if keys:
            vals = torch.stack([torch.as_tensor(self._sums[k], device=self.info.device, dtype=torch.float32)
                                / self._counts[k] for k in keys])
            vals = all_reduce_(vals, self.info, "mean").tolist()
            out.update(dict(zip(keys, vals)))
        out.update(self.stats.summary(self.info))
        out["lr"] = self.optimizers["main"].param_groups[0]["lr"]
        out["steps_per_s"] = steps_per_s
        out["epoch"] = self.sampler.epoch_of(step - 1)
        self._sums, self._counts = {}, {}
        return out

    # -- checkpoints -----------------------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"disc": self.disc} if self.disc is not None else {})}

    def checkpoint_state(self, step: int) -> tuple[dict, dict, dict]:
        # the RNG states too: a resumed run draws what the uninterrupted one would have
        return self.modules(), self.optimizers, {"config": to_dict(self.cfg), "config_hash": config_hash(self.cfg),
                                                 "rng": rng_state(), "epoch": self.sampler.epoch_of(step)}

    def load(self, ckpt: Path) -> dict:
        meta = load_checkpoint(ckpt, self.modules(), self.optimizers, map_location=str(self.info.device))
        changed = [k for k in config_changes(meta["config"], to_dict(self.cfg)) if k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(f"{', '.join(changed)}: differ from the checkpoint's config ({ckpt}); "
                              "resume with the same config or start a new run directory")
        set_rng_state(meta["rng"])
        return meta

    def export(self, run_dir: Path, step: int, elapsed: float) -> None:
        if self.info.is_main:
            export_weights(self, run_dir, step)

    def init_from_stage1(self, path: str | Path) -> None:
        """Load stage-1 weights: every tensor except the detail codebook (which starts fresh)."""
        weights = _stage1_weights(Path(path))
        sd = load_weights(weights, device=str(self.info.device))
        detail = {id(p) for p in self.model.quantize.detail_parameters()}
        detail_keys = {k for k, p in self.model.named_parameters() if id(p) in detail}
        sd = {k: v for k, v in sd.items() if k not in detail_keys}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if set(missing) - detail_keys or unexpected:
            raise ValueError(f"{weights} does not match the model: missing {sorted(set(missing) - detail_keys)}, "
                             f"unexpected {sorted(unexpected)}")
        log.info("stage 2 initialised from %s (%d tensors; fresh: %s)", weights, len(sd), ", ".join(sorted(detail_keys)))


def _stage1_weights(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / "vq.safetensors", path / "model.safetensors"):
        if cand.is_file():
            return cand
    ck = latest_checkpoint(path) if path.is_dir() else None
    if ck is not None:
        return ck / "model.safetensors"
    raise FileNotFoundError(f"stage-1 weights not found at {path} (train.init_from: a stage-1 run folder, "
                            "checkpoint folder or .safetensors file; run `iar2 vq train` with train.stage=stage1 first)")


# ----------------------------------------------------------------------------- the run

def export_weights(trainer: VQTrainer, run_dir: Path, step: int) -> Path:
    cfg = trainer.cfg
    path = run_dir / "vq.safetensors"
    save_weights(path, trainer.model.state_dict(),
                 {"model_config": to_dict(cfg.model), "train_config": to_dict(cfg), "step": step,
                  "config_hash": config_hash(cfg), "stage": cfg.train.stage})
    log.info("exported %s (step %d)", path, step)
    return path


def train(cfg: TokenizerRunConfig, run_dir: str | Path, resume: str | None = None, stop_after: int | None = None,
          info: DistInfo | None = None, perceptual: nn.Module | None = None) -> dict:
    """Train (or resume) a tokenizer run in `run_dir`, as one MLflow run (when MLFLOW_TRACKING_URI is set; see
    iar2/tracking.py); returns {"step", "checkpoint", "weights"}.

    resume: None (start; refuses a folder that already has checkpoints), 'auto' (continue from the latest
    checkpoint if there is one) or a checkpoint folder. stop_after: end this invocation after that many steps
    (with a checkpoint), as a scheduler's time limit would.
    """
    tc, run_dir = cfg.train, Path(run_dir)
    info = info or init_distributed(tc.device)
    dev = info.device
    with tracked(cfg.name, to_dict(cfg), {"job": "vq_train", "stage": tc.stage}, run_dir, info) as mlrun:
        check_run_config(cfg)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if resume is None and latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, "
                              "or choose a new run directory")
        what = f"vq train {cfg.name} ({tc.stage})"
        ckpt = checkpoint_to_resume(run_dir, resume, resume_fingerprint(cfg), what, info.is_main)
        if ckpt is None and tc.stage == "stage2" and not tc.init_from:
            raise ConfigError("train.init_from: stage2 starts from the stage-1 weights; set it to the stage-1 run "
                              "folder")
        trainer = VQTrainer(cfg, info, perceptual=perceptual)
        loop = Loop(trainer, info, run_dir, desc=f"vq {tc.stage}", log_every=tc.log_every, ckpt_every=tc.ckpt_every,
                    keep_last=tc.keep_last)
        loop.restore(ckpt, auto=resume == "auto")
        if ckpt is None and tc.stage == "stage2":
            trainer.init_from_stage1(tc.init_from)
        start = loop.start
        if start > tc.steps:
            raise ConfigError(f"train.steps: {tc.steps} is below the step the run has reached ({start}, {ckpt})")
        end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
        loop.open_log(to_dict(cfg), sinks=[mlrun])

        dataset = build_train_dataset(cfg)
        loader, trainer.sampler = step_batches(dataset, tc.batch_size, tc.seed, info, tc.grad_accum, start, end,
                                               cfg.data.num_workers)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        log.info("stage %s, quantizer %s: %.2fM params, %d train images, global batch %d (%d procs x %d accum), "
                 "steps %d -> %d of %d on %s", tc.stage, cfg.model.quantizer, n_params / 1e6, len(dataset),
                 tc.batch_size, info.world_size, tc.grad_accum, start, end, tc.steps, dev)
        images = (batch[0].to(dev, non_blocking=True) for batch in loader)
        finished = loop.run(images, end, tc.steps, tc.grad_accum)
    weights = run_dir / "vq.safetensors" if finished and info.is_main else None
    return {"step": end, "checkpoint": loop.last_checkpoint, "weights": weights}


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import positive_int  # argparse types with a range
    p.add_argument("--config", default=str(TINY_CONFIG),
                   help=f"tokenizer run config (YAML, TokenizerRunConfig); default: the packaged {TINY_CONFIG.name}")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=100 model.quantizer=semantic_detail")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.csv, vq.safetensors)")
    p.add_argument("--resume", default=None, metavar="auto|CKPT",
                   help="'auto': continue from the run's latest checkpoint (or start if none); or a checkpoint folder")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop this invocation after N steps (with a checkpoint); resume later with --resume auto")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    info = init_distributed(cfg.train.device)
    try:
        train(cfg, args.out, resume=args.resume, stop_after=args.stop_after, info=info)
    finally:
        cleanup()
    return 0
