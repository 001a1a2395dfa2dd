"""`iar2 bench tokenizer`: tokenizer training steps/s for every variant (single, unassociated dual, stage 1,
stage 2) on synthetic images, data loading excluded; the ratio to the single codebook travels between machines.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from iar2.config import from_dict
from iar2.distributed import DistInfo, resolve_device
from iar2.tokenizer.config import TokenizerRunConfig
from iar2.tokenizer.train import VQTrainer

BENCH_PRESETS = {
    # the test-sized model and a small one a CPU can still time; vq16 is LlamaGen's VQ-16 (for GPUs)
    "tiny": dict(model=dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, embed_dim=8, norm_groups=4,
                            codebook_size=64, semantic_size=16, detail_size=64), image_size=32, batch_size=16,
                 disc_layers=2, disc_ndf=16),
    "small": dict(model=dict(ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=64, embed_dim=8, norm_groups=8,
                             codebook_size=1024, semantic_size=256, detail_size=1024), image_size=64, batch_size=16,
                  disc_layers=3, disc_ndf=32),
    "vq16": dict(model=dict(), image_size=256, batch_size=16, disc_layers=3, disc_ndf=64),
}
BENCH_VARIANTS = [("single", "single", "single"), ("unassociated_dual", "unassociated_dual", "single"),
                  ("stage1", "semantic_detail", "stage1"), ("stage2", "semantic_detail", "stage2")]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import nonneg_int, positive_int  # argparse types with a range
    p.add_argument("--preset", nargs="+", default=["tiny", "small"], choices=sorted(BENCH_PRESETS),
                   help="model sizes to time (default: tiny small)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override the preset's batch size")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])


def bench_config(preset: str, quantizer: str, stage: str, batch_size: int | None = None, device: str = "auto",
                 precision: str = "fp32") -> TokenizerRunConfig:
    pr = BENCH_PRESETS[preset]
    return from_dict(TokenizerRunConfig, {
        "data": {"image_size": pr["image_size"]},
        "model": {**pr["model"], "quantizer": quantizer},
        # GAN on from step 0 so the timing includes the discriminator; Eq. 7 steps reconstruct by L2 (no
        # perceptual network is assumed to be available)
        "loss": {"perceptual": "none", "disc_start": 0, "disc_layers": pr["disc_layers"], "disc_ndf": pr["disc_ndf"],
                 "semantic_l2_weight": 1.0},
        "train": {"stage": stage, "batch_size": batch_size or pr["batch_size"], "device": device,
                  "precision": precision, "lr": 1e-4},
    })


def time_steps(trainer: VQTrainer, steps: int, warmup: int, image_size: int, batch: int) -> float:
    """Steps per second of `trainer.train_step` on synthetic images (data loading excluded)."""
    dev = trainer.info.device
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for s in range(warmup):
        trainer.train_step(s, [x])
    sync()
    t0 = time.perf_counter()
    for s in tqdm(range(warmup, warmup + steps), desc="timing", unit="step", leave=False):
        trainer.train_step(s, [x])
    sync()
    return steps / (time.perf_counter() - t0)


def run_bench(args: argparse.Namespace) -> int:
    rows = []
    for preset in args.preset:
        base = None
        for name, quantizer, stage in BENCH_VARIANTS:
            cfg = bench_config(preset, quantizer, stage, args.batch_size, args.device, args.precision)
            info = DistInfo(device=resolve_device(args.device))
            trainer = VQTrainer(cfg, info, build_perceptual_module=False)
            rate = time_steps(trainer, args.steps, args.warmup, cfg.data.image_size, cfg.train.batch_size)
            base = base or rate
            rows.append((preset, name, cfg.train.batch_size, rate, rate * cfg.train.batch_size, rate / base))
            del trainer
    print(f"{'preset':<7} {'variant':<18} {'batch':>5} {'steps/s':>9} {'img/s':>9} {'vs single':>9}")
    for preset, name, b, rate, ips, ratio in rows:
        print(f"{preset:<7} {name:<18} {b:>5} {rate:>9.2f} {ips:>9.1f} {ratio:>9.2f}")
    return 0
