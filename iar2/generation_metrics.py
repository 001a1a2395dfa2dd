"""`iar2 metrics`: FID, IS, precision and recall of a sample set (samples.npz) against a reference set.

Reference: the images of an ImageFolder split, centre-cropped (ADM) to the samples' size (up to
--max-reference, spread evenly over the split), or ADM's reference batch for FID (`--ref-npz` with mu/sigma).
Features: torch-fidelity's Inception ("compat", pool 2048 for FID and precision/recall, ADM's k = 3) or the
domain reference network offline. The JSON names the extractor, the reference set and the sample counts,
so a domain FID is never read as an ImageNet FID.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from iar2 import fingerprint, tracking
from iar2.bootstrap import replicates
from iar2.cli import add_config_arguments, load_run_config
from iar2.config import to_dict
from iar2.data.imagefolder import ImageFolderDataset, data_digest
from iar2.data.transforms import eval_transform
from iar2.distributed import pick_device
from iar2.io import atomic_path, atomic_write_json
from iar2.metrics import (ISC_SPLIT_SIZE, FeatureCollector, UInt8ImageDataset, extract_features, feature_statistics,
                          frechet_distance, load_reference_stats, resolve_extractor, to_uint8)

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
    """The reference images as uint8 (N, 3, size, size) (small sets; large ones stream, see reference_features)."""
    ds, pick = _reference_set(root, split, size, max_images, report)
    return torch.stack([to_uint8(ds[int(i)][0]) for i in pick])


def _reference_set(root, split, size, max_images, report):
    ds = ImageFolderDataset(root, split, eval_transform(size), report=report)
    n = len(ds)
    pick = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(int)) if max_images \
        else np.arange(n)
    return ds, pick


def _cache_fingerprint(ext, root, split, size, max_images, report) -> tuple[str, dict]:
    """(cache slot, fingerprint) of a reference feature set: the slot names what is cached (extractor kind and
    layer, data folder, split, size, count); the fingerprint also holds the contents it depends on (extractor
    weights, the split's images via the data-check report) and the format (iar2/fingerprint.py)."""
    what = {"extractor": ext.kind, "layer": ext.layer_fid, "root": str(Path(root).resolve()), "split": split,
            "size": size, "max_images": max_images}
    slot = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    w = Path(ext.weights_path) if ext.weights_path else None
    fp = fingerprint.fingerprint("reference_features", what, {
        "extractor_weights": w if w is not None and w.exists() else None,
        "data": data_digest(root, split, report)})
    return slot, fp


def reference_features(ext, root, split, size, max_images=None, report=None, cache_dir=None, device="auto",
                       batch_size=64) -> torch.Tensor:
    """Pool features of the reference split, streamed in batches (no image kept) and cached on disk, keyed by
    what they depend on (extractor weights, the images' contents, split, size, count), so 50k-image references
    are computed once and recomputed when any of that changes."""
    cached = stamp = fp = None
    if cache_dir:
        slot, fp = _cache_fingerprint(ext, root, split, size, max_images, report)
        cached, stamp = Path(cache_dir) / f"ref-{slot}.npz", Path(cache_dir) / f"ref-{slot}.json"
        old = json.loads(stamp.read_text()) if stamp.is_file() and cached.is_file() else None
        if old == fp:
            log.info("reference features from cache %s", cached)
            with np.load(cached) as d:
                return torch.from_numpy(d["features"])
        if cached.is_file():
            why = ", ".join(fingerprint.changes(old, fp)) + " changed" if old else \
                "no fingerprint (an older version wrote it)"
            os.replace(cached, cached.with_suffix(".stale.npz"))
            log.warning("reference features %s: %s; set aside as %s and recomputed", cached, why,
                        cached.with_suffix(".stale.npz").name)
    ds, pick = _reference_set(root, split, size, max_images, report)
    col = FeatureCollector(ext, (ext.layer_fid,), device)
    for b in tqdm(range(0, len(pick), batch_size), desc="reference features", unit="batch"):
        col.add("ref", torch.stack([to_uint8(ds[int(i)][0]) for i in pick[b:b + batch_size]]))
    feats = col.features("ref")
    if cached is not None:
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=feats.numpy(), root=str(root), split=split, size=size)
        atomic_write_json(stamp, fp)
    return feats


def evaluate_samples(samples, data_root, split="train", extractor="domain", domain_net=None, weights_dir=None,
                     max_reference=50000, ref_npz=None, report=None, device="auto", batch_size=64,
                     cache_dir=None, bootstrap=0, bootstrap_seed=0) -> dict:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    ext = resolve_extractor(extractor, weights_dir, domain_net)
    gen, labels = load_samples(samples)
    size = gen.shape[-1]
    ref = reference_features(ext, data_root, split, size, max_reference, report, cache_dir, device, batch_size)
    layers = tuple(dict.fromkeys((ext.layer_fid, ext.layer_isc)))
    g = extract_features(UInt8ImageDataset(gen), ext, layers, batch_size, device)
    mu_g, sig_g = feature_statistics(g[ext.layer_fid])
    mu_r, sig_r = feature_statistics(ref)
    splits = max(1, round(len(gen) / ISC_SPLIT_SIZE))  # ADM: unshuffled splits of ~5000
    isc = isc_features_to_metric(g[ext.layer_isc], splits=splits, shuffle=False)
    prc = prc_features_to_metric(g[ext.layer_prc], ref, prc_neighborhood=3, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    res = {**ext.describe(), "fid": frechet_distance(mu_g, sig_g, mu_r, sig_r),
           "isc_mean": float(isc[KEY_METRIC_ISC_MEAN]), "isc_std": float(isc[KEY_METRIC_ISC_STD]),
           "isc_splits": splits, "precision": float(prc[KEY_METRIC_PRECISION]),
           "recall": float(prc[KEY_METRIC_RECALL]),
           "prc_neighborhood": 3, "generated": str(samples), "num_generated": int(len(gen)),
           "reference": f"{data_root}/{split} (centre crop {size} px, {len(ref)} images)",
           "num_reference": int(len(ref))}
    if ref_npz:  # ADM protocol: FID against the reference batch's statistics
        res["fid_ref_npz"] = frechet_distance(mu_g, sig_g, *load_reference_stats(ref_npz))
        res["ref_npz"] = str(ref_npz)
    if bootstrap:  # replicates for the claims' intervals (iar2.bootstrap): same features, resampled rows
        res["bootstrap"] = replicates(g[ext.layer_fid], ref, g[ext.layer_isc], splits, g[ext.layer_prc], ref,
                                      bootstrap, bootstrap_seed, device=pick_device(device))
    res["num_classes_sampled"] = int(len(np.unique(labels)))
    res["image_size"] = int(size)
    return res


@dataclass
class GenMetricsConfig:
    """Settings of `iar2 metrics`: a --config file or the flags of the same names (iar2.cli.add_config_arguments)."""
    split: str = field(default="train", metadata={"help": "reference split (train, as ADM/LlamaGen)"})
    extractor: Literal["inception", "domain"] = field(default="inception", metadata={
        "help": "Inception (needs its weights: `iar2 fetch-weights`) or the domain network (offline)"})
    max_reference: int = field(default=50000, metadata={"min": 1, "help": "reference images at most (spread evenly)"})
    batch_size: int = field(default=64, metadata={"min": 1})
    bootstrap: int = field(default=200, metadata={
        "min": 0, "help": "bootstrap replicates of every metric for the claims' intervals (0: none)"})
    bootstrap_seed: int = field(default=0, metadata={
        "min": 0, "help": "seed of the resample indices; keep it equal across the jobs whose metrics are compared"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N]"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="samples.npz from `iar2 sample` (arr_0: N x H x W x 3 uint8)")
    p.add_argument("--data", required=True, help="ImageFolder root of the reference images")
    p.add_argument("--domain-net", help="reference network checkpoint (`iar2 refnet train`)")
    p.add_argument("--weights-dir", help="folder holding pretrained weight files (else the torch hub cache)")
    p.add_argument("--ref-npz", help="ADM reference batch (.npz with mu, sigma) for the protocol FID")
    p.add_argument("--report", help="`iar2 data check` report: its bad images are excluded")
    p.add_argument("--cache-dir", help="folder caching reference features (computed once per reference set)")
    p.add_argument("--out", required=True, help="metrics JSON")
    add_config_arguments(p, GenMetricsConfig)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(GenMetricsConfig, args)
    params = {**{k: v for k, v in vars(args).items() if not k.startswith("_")}, **to_dict(cfg)}
    with tracking.start_run(f"metrics {args.samples}", params=params, tags={"job": "gen_metrics"}) as mlrun:
        res = _run(args, cfg)
        mlrun.log_metrics(0, {k: v for k, v in res.items() if k in ("fid", "isc_mean", "precision", "recall",
                                                                   "fid_ref_npz")})
        mlrun.log_artifact(args.out)
    return 0


def _run(args: argparse.Namespace, cfg: GenMetricsConfig) -> dict:
    res = evaluate_samples(args.samples, args.data, cfg.split, cfg.extractor, args.domain_net, args.weights_dir,
                           cfg.max_reference, args.ref_npz, args.report, cfg.device, cfg.batch_size,
                           args.cache_dir, cfg.bootstrap, cfg.bootstrap_seed)
    atomic_write_json(args.out, res)
    log.info("FID %.3f  IS %.2f  precision %.3f  recall %.3f (%s extractor) -> %s", res["fid"], res["isc_mean"],
             res["precision"], res["recall"], res["extractor"], args.out)
    return res
