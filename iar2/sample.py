"""`iar2 sample`: class-conditional samples for the generation metrics, sharded and resumable.

Sample i (0 <= i < num_classes * per_class) has label i // per_class and its own randomness stream
(seed, i) (iar2.ar.generate), so the set of images is the same however it is split. The index range is cut
into chunks; chunk k is done by torchrun rank k % world within job k // world % jobs == job (separate
SLURM jobs: --job J --jobs N). Each finished chunk is an atomically written .npz; a rerun skips them.
When every chunk exists, the samples are merged into the ADM-style `samples.npz` (arr_0: N x H x W x 3
uint8, arr_1: labels) and a JSON summary; `--png` also writes one PNG per sample, `--grid N` a class grid.
With reject.factor > 1, factor x candidates per class are drawn and scored, and the best per_class of each
class are kept (iar2/reject_sampling.py documents the rule).

Models sampled on a larger grid (24x24 tokens = 384 px) are resized to `eval_size` (bicubic), as LlamaGen
does for the ImageNet-256 benchmark.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from iar2 import fingerprint
from iar2.ar.generate import generate, sampling_autocast
from iar2.config import config_hash, load_config, to_dict
from iar2.io import atomic_path, atomic_write_json
from iar2.sample_config import SampleRunConfig

log = logging.getLogger(__name__)


def decode_to_uint8(vq, tokens: torch.Tensor, grid: int, eval_size: int | None) -> torch.Tensor:
    """Token maps (B, m) or (B, 2, m) -> uint8 images (B, H, W, 3)."""
    idx = tokens.view(*tokens.shape[:-1], grid, grid)
    x = vq.decode_indices(idx).float()
    if eval_size and x.shape[-1] != eval_size:
        x = F.interpolate(x, size=(eval_size, eval_size), mode="bicubic", align_corners=False)
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def chunk_fingerprint(cfg: SampleRunConfig, ar_path, vq_path) -> dict:
    """What sample chunks depend on: the sampling config (not the batch size) and the weights' contents."""
    rj = cfg.reject
    return fingerprint.fingerprint("sample_chunks", to_dict(cfg), {
        "ar": ar_path, "vq": vq_path,
        "reject_net": rj.domain_net if rj.factor > 1 and rj.classifier == "domain" else None,
        "reject_weights": rj.weights_dir if rj.factor > 1 and rj.classifier != "domain" else None},
        ignore={"batch_size"})


def plan(cfg: SampleRunConfig, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(global sample indices, labels) of the run; with reject sampling, factor x candidates per class."""
    classes = cfg.classes if cfg.classes is not None else list(range(cfg.num_classes or num_classes))
    n = cfg.per_class * cfg.reject.factor
    idx = np.concatenate([c * n + np.arange(n) for c in classes])
    return idx, idx // n


def sample_run(ar_path, vq_path, out, cfg: SampleRunConfig, job: int = 0, jobs: int = 1, png: bool = False,
               grid: int = 0) -> Path | None:
    """Sample this process's chunks; merge when all exist. Returns samples.npz once complete."""
    from iar2.ar.train import load_ar
    from iar2.distributed import barrier, init_distributed
    from iar2.tokenizer.vq_model import load_vq

    info = init_distributed("auto")
    dev = info.device
    model = load_ar(ar_path, dev)
    vq = load_vq(vq_path, dev)
    out = Path(out)
    # finished chunks are reused only by a rerun of the same samples (iar2/fingerprint.py): same config (the batch
    # size aside: images do not depend on it), same weights; anything else is set aside and sampled again
    if info.is_main:
        fingerprint.guard(out / "chunks", chunk_fingerprint(cfg, ar_path, vq_path), f"sample {out}")
    barrier(info)
    idx, labels = plan(cfg, model.cfg.num_classes)
    n_chunks = (len(idx) + cfg.chunk_size - 1) // cfg.chunk_size
    workers = info.world_size * jobs
    mine = [k for k in range(n_chunks) if k % workers == job * info.world_size + info.rank]
    todo = [k for k in mine if not (out / "chunks" / f"chunk_{k:05d}.npz").is_file()]
    log.info("%d samples in %d chunks; this process: %d chunks, %d left", len(idx), n_chunks, len(mine), len(todo))
    autocast = sampling_autocast(cfg.precision, dev)  # bf16 only where it is native: see the README
    scorer = None
    if cfg.reject.factor > 1:
        from iar2.reject_sampling import Scorer

        scorer = Scorer(cfg.reject.classifier, cfg.reject.domain_net, cfg.reject.weights_dir, dev)
    bar = tqdm(total=sum(min(cfg.chunk_size, len(idx) - k * cfg.chunk_size) for k in todo), unit="img",
               desc="sample", disable=not info.is_main)
    t0 = time.perf_counter()
    for k in todo:
        sl = slice(k * cfg.chunk_size, min(len(idx), (k + 1) * cfg.chunk_size))
        c_idx, c_lab = idx[sl], labels[sl]
        images, scores = [], []
        for b in range(0, len(c_idx), cfg.batch_size):
            i_b = torch.as_tensor(c_idx[b:b + cfg.batch_size])
            l_b = torch.as_tensor(c_lab[b:b + cfg.batch_size], device=dev)
            with autocast:
                toks = generate(model, l_b, i_b, cfg.sampling)
            images.append(decode_to_uint8(vq, toks, model.cfg.grid, cfg.eval_size))
            if scorer is not None:
                scores.append(scorer(images[-1], l_b.cpu()))
            bar.update(len(i_b))
        extra = {"scores": torch.cat(scores).numpy()} if scores else {}
        with atomic_path(out / "chunks" / f"chunk_{k:05d}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=torch.cat(images).numpy(), labels=c_lab, indices=c_idx, **extra)
    bar.close()
    if todo:
        log.info("sampled %d images in %.1f s", bar.n, time.perf_counter() - t0)
    barrier(info)  # every rank's chunks are on disk before anyone looks
    done = all((out / "chunks" / f"chunk_{k:05d}.npz").is_file() for k in range(n_chunks))
    if done and info.is_main:
        return merge(out, n_chunks, cfg, ar_path, vq_path, png, grid)
    return out / "samples.npz" if done else None


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, ncols: int) -> None:
    """A PNG with one row per class and up to `ncols` samples per row (Figures 9-11)."""
    from PIL import Image

    classes = list(dict.fromkeys(labels.tolist()))
    h, w = images.shape[1:3]
    canvas = np.full((len(classes) * (h + 2), ncols * (w + 2), 3), 255, np.uint8)
    for r, c in enumerate(classes):
        for j, im in enumerate(images[labels == c][:ncols]):
            canvas[r * (h + 2):r * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = im
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")


def merge(out: Path, n_chunks: int, cfg: SampleRunConfig, ar_path, vq_path, png: bool, grid: int = 0) -> Path:
    parts = [np.load(out / "chunks" / f"chunk_{k:05d}.npz") for k in range(n_chunks)]
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    summary = {}
    if cfg.reject.factor > 1:
        from iar2.reject_sampling import select

        scores = np.concatenate([p["scores"] for p in parts])
        indices = np.concatenate([p["indices"] for p in parts])
        keep = select(scores, labels, indices, cfg.per_class)
        summary = {"reject_candidates": int(len(images)), "reject_mean_score_all": float(scores.mean()),
                   "reject_mean_score_kept": float(scores[keep].mean())}
        images, labels = images[keep], labels[keep]
    with atomic_path(out / "samples.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, arr_0=images, arr_1=labels)
    if png:
        from PIL import Image

        with atomic_path(out / "png", is_dir=True) as tmpdir:
            for i, (im, lab) in enumerate(zip(images, labels)):
                Image.fromarray(im).save(tmpdir / f"{i:06d}_c{int(lab):04d}.png")
    if grid:
        save_grid(images, labels, out / "grid.png", grid)
    atomic_write_json(out / "samples.json", {**summary, "num_samples": int(len(images)), "shape": list(images.shape),
                                             "ar": str(ar_path), "vq": str(vq_path), "config": to_dict(cfg),
                                             "config_hash": config_hash(cfg)})
    log.info("merged %d samples into %s", len(images), out / "samples.npz")
    # the chunks are in samples.npz now (at the paper scale they would double 10 GB per sample set), and a later
    # run of this job is a recomputation: Snakemake reruns it only after a change or a --forcerun
    shutil.rmtree(out / "chunks", ignore_errors=True)
    return out / "samples.npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import nonneg_int, positive_int  # argparse types with a range
    p.add_argument("--ar", required=True, help="AR model weights (model.safetensors from `iar2 ar train`/`ar import`)")
    p.add_argument("--vq", required=True, help="the tokenizer its tokens belong to")
    p.add_argument("--out", required=True, help="output folder (chunks/, samples.npz, samples.json)")
    p.add_argument("--config", help="SampleRunConfig YAML (per_class, batch_size, sampling.guidance, ...)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. per_class=50 sampling.guidance.mode=pag sampling.guidance.semantic=[1.5,3]")
    p.add_argument("--job", type=nonneg_int, default=0, help="this job's index when sampling is split over jobs")
    p.add_argument("--jobs", type=positive_int, default=1, help="number of separate jobs sharing the run")
    p.add_argument("--png", action="store_true", help="also write one PNG per sample")
    p.add_argument("--grid", type=nonneg_int, default=0, metavar="N",
                   help="also write grid.png: one row per class, N samples each (Figures 9-11)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(SampleRunConfig, args.config, args.set)
    if not 0 <= args.job < args.jobs:
        raise SystemExit(f"--job {args.job}: allowed values 0..{args.jobs - 1}")
    import os

    from iar2 import tracking

    main = int(os.environ.get("RANK", "0")) == 0
    with tracking.start_run(f"sample {args.out}", params={"ar": args.ar, "vq": args.vq, **to_dict(cfg)},
                            tags={"job": "sample"}, is_main=main) as mlrun:
        path = sample_run(args.ar, args.vq, args.out, cfg, args.job, args.jobs, args.png, args.grid)
        if path is not None:
            mlrun.log_artifact(Path(args.out) / "samples.json")
            mlrun.log_artifact(Path(args.out) / "grid.png")
    return 0
