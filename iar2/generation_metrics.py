"""`iar2 metrics`: FID, IS, precision and recall of a sample set (samples.npz) against a reference set.

Reference: the images of an ImageFolder split, centre-cropped (ADM) to the samples' size (up to
--max-reference, spread evenly over the split), or ADM's reference batch for FID (`--ref-npz` with mu/sigma).
Features: torch-fidelity's Inception ("compat", pool 2048 for FID and precision/recall, ADM's k = 3) or the
domain reference network offline. The JSON names the extractor, the reference set and the sample counts,
so a domain FID is never read as an ImageNet FID.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from iar2.io import atomic_write_json

log = logging.getLogger(__name__)


def load_samples(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples not found: {path} (run `iar2 sample` first)")
    with np.load(path) as d:
        images, labels = d["arr_0"], d["arr_1"] if "arr_1" in d else np.zeros(len(d["arr_0"]), np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def reference_images(root, split: str, size: int, max_images: int | None, report=None) -> torch.Tensor:
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import eval_transform
    from iar2.metrics import to_uint8

    ds = ImageFolderDataset(root, split, eval_transform(size), report=report)
    n = len(ds)
    pick = np.linspace(0, n - 1, num=min(n, max_images or n)).round().astype(int) if max_images else np.arange(n)
    return torch.stack([to_uint8(ds[int(i)][0]) for i in np.unique(pick)])


def evaluate_samples(samples, data_root, split="train", extractor="domain", domain_net=None, weights_dir=None,
                     max_reference=50000, ref_npz=None, report=None, device="auto", batch_size=64) -> dict:
    from iar2.metrics import (UInt8ImageDataset, compute_fidelity, extract_features, feature_statistics,
                              frechet_distance, load_reference_stats, resolve_extractor)

    ext = resolve_extractor(extractor, weights_dir, domain_net)
    gen, labels = load_samples(samples)
    size = gen.shape[-1]
    ref = reference_images(data_root, split, size, max_reference, report)
    res = compute_fidelity(UInt8ImageDataset(gen), UInt8ImageDataset(ref), ext, fid=True, isc=True, prc=True,
                           batch_size=batch_size, device=device, generated_name=str(samples),
                           reference_name=f"{data_root}/{split} (centre crop {size} px, {len(ref)} images)")
    if ref_npz:  # ADM protocol: FID against the reference batch's statistics
        feats = extract_features(UInt8ImageDataset(gen), ext, (ext.layer_fid,), batch_size, device)[ext.layer_fid]
        mu, sigma = feature_statistics(feats)
        res["fid_ref_npz"] = frechet_distance(mu, sigma, *load_reference_stats(ref_npz))
        res["ref_npz"] = str(ref_npz)
    res["num_classes_sampled"] = int(len(np.unique(labels)))
    res["image_size"] = int(size)
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="samples.npz from `iar2 sample` (arr_0: N x H x W x 3 uint8)")
    p.add_argument("--data", required=True, help="ImageFolder root of the reference images")
    p.add_argument("--split", default="train", help="reference split (default: train, as ADM/LlamaGen)")
    p.add_argument("--extractor", choices=["inception", "domain"], default="inception",
                   help="Inception (needs its weights: `iar2 fetch-weights`) or the domain network (offline)")
    p.add_argument("--domain-net", help="reference network checkpoint (`iar2 refnet train`)")
    p.add_argument("--weights-dir", help="folder holding pretrained weight files (else the torch hub cache)")
    p.add_argument("--max-reference", type=int, default=50000, help="reference images at most (spread evenly)")
    p.add_argument("--ref-npz", help="ADM reference batch (.npz with mu, sigma) for the protocol FID")
    p.add_argument("--report", help="`iar2 data check` report: its bad images are excluded")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="metrics JSON")


def run(args: argparse.Namespace) -> int:
    res = evaluate_samples(args.samples, args.data, args.split, args.extractor, args.domain_net, args.weights_dir,
                           args.max_reference, args.ref_npz, args.report, args.device, args.batch_size)
    atomic_write_json(args.out, res)
    log.info("FID %.3f  IS %.2f  precision %.3f  recall %.3f (%s extractor) -> %s", res["fid"], res["isc_mean"],
             res["precision"], res["recall"], res["extractor"], args.out)
    return 0
