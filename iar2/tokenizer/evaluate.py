"""Reconstruction metrics of a VQ tokenizer: rFID, PSNR, SSIM, LPIPS and codebook usage (`iar2 vq eval`).

Every image of the split is centre-cropped (ADM protocol, `eval_transform`), encoded, decoded, and both the
original and the reconstruction are quantised to uint8 (`iar2.metrics.to_uint8`) before any metric: the
numbers describe the images as saved. One streaming pass; only features are kept, never images.
- rFID: FID of the reconstructions against the originals of the same split, with torch-fidelity's
  Inception (pool 2048; the papers' rFID) or the domain reference network (offline; not comparable).
- PSNR, SSIM: per image, then the mean. `ssim` is the standard Gaussian-window SSIM; `ssim_llamagen` is
  the protocol behind the SSIM column of the LlamaGen / IAR2 tables (see iar2.metrics).
- LPIPS: `iar2.perceptual.build_perceptual` (LPIPS-VGG, or the domain network's LPIPS-style distance).
- Codebook usage: fraction of each codebook's entries used over the whole split, and the perplexity of
  the split's code histogram.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from iar2.bootstrap import recon_replicates
from iar2.cli import add_config_arguments, load_run_config
from iar2.config import config_hash, to_dict
from iar2.data.imagefolder import ImageFolderDataset
from iar2.data.transforms import eval_transform
from iar2.distributed import pick_device
from iar2.io import atomic_write_json
from iar2.metrics import SSIM_LLAMAGEN, FeatureCollector, psnr, resolve_extractor, ssim, to_uint8
from iar2.perceptual import build_perceptual
from iar2.tokenizer.usage import code_histogram, usage_stats
from iar2.tokenizer.vq_model import default_image_size, load_vq

log = logging.getLogger(__name__)


def spread_indices(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n) (all classes are represented; images are in class order)."""
    if k is None or k >= n:
        return list(range(n))
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64)).tolist()


@torch.no_grad()
def evaluate_reconstruction(vq_path: str | Path, data_root: str | Path, split: str = "val",
                            image_size: int | None = None, extractor: str = "inception",
                            domain_net: str | Path | None = None, perceptual: str = "lpips_vgg",
                            weights_dir: str | Path | None = None, max_images: int | None = None,
                            batch_size: int = 32, device: str = "auto", report: str | Path | None = None,
                            num_workers: int = 0, bootstrap: int = 0) -> dict:
    """Reconstruct `data_root/split` with the VQ and return the metrics dict (module doc); bootstrap > 0 adds that
    many replicates of rFID / PSNR / SSIM / LPIPS over the images (iar2.bootstrap.recon_replicates)."""
    # Resolve every weight file first: a missing one fails before any work is done.
    ext = resolve_extractor(extractor, weights_dir=weights_dir, domain_net=domain_net)
    if perceptual == "domain" and domain_net is None:
        raise FileNotFoundError("--perceptual domain needs --domain-net (a checkpoint from `iar2 refnet train`)")
    dev = pick_device(device)
    perc = build_perceptual(perceptual, domain_net=domain_net, weights_dir=weights_dir)
    if perc is not None:
        perc = perc.to(dev).eval()

    model = load_vq(vq_path, dev)
    image_size = image_size or default_image_size(vq_path)
    if not image_size:
        raise ValueError(f"{vq_path}: its metadata does not record the image size; pass --image-size")
    model.grid(image_size)  # validates divisibility
    ds = ImageFolderDataset(data_root, split, eval_transform(image_size), report=report, verify=report is None)
    idx = spread_indices(len(ds), max_images)
    loader = DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")

    collector = FeatureCollector(ext, device=dev)
    names, vocabs = model.level_names(), model.vocab_sizes()
    counts = [torch.zeros(v, dtype=torch.long, device=dev) for v in vocabs]
    per_image = {"psnr": [], "ssim": [], "ssim_llamagen": [], "lpips": []}
    t0 = time.perf_counter()
    bar = tqdm(total=len(idx), desc=f"vq eval {split}", unit="img", dynamic_ncols=True, mininterval=1.0)
    for x, _ in loader:
        x = x.to(dev, non_blocking=True)
        recon, q = model(x)
        orig_u8, rec_u8 = to_uint8(x), to_uint8(recon)
        collector.add("original", orig_u8)
        collector.add("reconstructed", rec_u8)
        per_image["psnr"].append(psnr(rec_u8, orig_u8).cpu())
        per_image["ssim"].append(ssim(rec_u8, orig_u8).cpu())
        per_image["ssim_llamagen"].append(ssim(rec_u8, orig_u8, **SSIM_LLAMAGEN).cpu())
        if perc is not None:  # on the saved (quantised) images, mapped back to [-1, 1]
            d = perc(orig_u8.float() / 127.5 - 1.0, rec_u8.float() / 127.5 - 1.0)
            per_image["lpips"].append(d.detach().double().reshape(-1).cpu())
        ind = q.indices if q.indices.dim() == 4 else q.indices[:, None]
        for lvl, c in enumerate(counts):
            c += code_histogram(ind[:, lvl], c.numel())
        bar.update(x.shape[0])
    bar.close()
    seconds = time.perf_counter() - t0

    n = len(idx)
    metrics = {"rfid": collector.fid("reconstructed", "original")}
    boot = {}
    if bootstrap:  # replicates for the claims' intervals (iar2.bootstrap), resampling images
        boot = {"bootstrap": recon_replicates(collector.features("original"), collector.features("reconstructed"),
                                              {k: torch.cat(v) for k, v in per_image.items() if v}, bootstrap)}
    for k, v in per_image.items():
        if v:
            metrics[k] = float(torch.cat(v).double().mean())
    if perc is None:
        metrics["lpips"] = None
    for name, c in zip(names, counts):
        u = usage_stats(c)
        prefix = "codebook" if name == "single" else name
        metrics.update({f"{prefix}_{k}": u[k] for k in ("usage", "perplexity", "codes_used")})
    log.info("rFID %.3f  PSNR %.2f  SSIM %.4f  LPIPS %s  (%d images, %.1f img/s)", metrics["rfid"], metrics["psnr"],
             metrics["ssim"], "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}", n, n / seconds)
    return {
        **metrics,
        **ext.describe(),
        "reference": f"{split} originals (centre crop {image_size} px)",
        "num_images": n, "num_reference": collector.count("original"), "num_generated": collector.count("reconstructed"),
        "num_images_in_split": len(ds), "num_bad": ds.num_bad, "max_images": max_images,
        "perceptual": perceptual, "domain_net": None if domain_net is None else str(domain_net),
        "split": split, "data_root": str(data_root), "image_size": image_size,
        "vq": str(vq_path), "vq_config": to_dict(model.cfg), "vq_config_hash": config_hash(model.cfg),
        "quantizer": model.cfg.quantizer, "vocab_sizes": vocabs,
        "ssim_protocols": {"ssim": "gaussian 11x11 sigma 1.5, data_range 255 (Wang et al.)",
                           "ssim_llamagen": "uniform 7x7, sample covariance, data_range 2 on [0,1] (LlamaGen script)"},
        "seconds": seconds, "images_per_s": n / seconds, **boot,
    }


# ----------------------------------------------------------------------------- CLI: iar2 vq eval

@dataclass
class ReconEvalConfig:
    """Settings of `iar2 vq eval`: a --config file or the flags of the same names (iar2.cli.add_config_arguments)."""
    split: str = field(default="val", metadata={"help": "split to reconstruct"})
    image_size: int | None = field(default=None, metadata={
        "min": 1, "help": "image size (default: the VQ's training size)"})
    extractor: Literal["inception", "domain"] = field(default="inception", metadata={
        "help": "rFID features: torch-fidelity Inception (needs its weights file) or the domain network"})
    perceptual: Literal["lpips_vgg", "domain", "none"] = field(default="lpips_vgg", metadata={
        "help": "LPIPS backend: LPIPS-VGG (needs VGG16 weights), the domain network, or none"})
    max_images: int | None = field(default=None, metadata={"min": 1, "help": "evaluate N images spread over the split"})
    batch_size: int = field(default=32, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0, "help": "DataLoader workers decoding images"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N]"})
    bootstrap: int = field(default=200, metadata={
        "min": 0, "help": "bootstrap replicates of every metric over the images, for the claims' intervals (0: none)"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", required=True, help="VQ tokenizer (.safetensors with its .json, or a checkpoint folder)")
    p.add_argument("--data", required=True, help="ImageFolder root holding <split>/<class>/<images>")
    p.add_argument("--domain-net", default=None, help="reference network checkpoint (`iar2 refnet train`)")
    p.add_argument("--weights-dir", default=None, help="folder holding pretrained weight files (else torch hub cache)")
    p.add_argument("--report", default=None, help="`iar2 data check` report (bad images excluded without decoding)")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    add_config_arguments(p, ReconEvalConfig)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(ReconEvalConfig, args)
    result = evaluate_reconstruction(args.vq, args.data, split=cfg.split, image_size=cfg.image_size,
                                     extractor=cfg.extractor, domain_net=args.domain_net,
                                     perceptual=cfg.perceptual, weights_dir=args.weights_dir,
                                     max_images=cfg.max_images, batch_size=cfg.batch_size, device=cfg.device,
                                     report=args.report, num_workers=cfg.num_workers, bootstrap=cfg.bootstrap)
    atomic_write_json(args.out, result)
    log.info("metrics written to %s", args.out)
    return 0
