"""Figure 3 (paper §3.1): how far can a code move before the decoded image changes?

Images are tokenised with a VQ, every token of one codebook level is replaced by a code at a given
"code distance" (Euclidean distance between the two codebook vectors the lookup uses), and the
result is decoded. The decoded image is compared, by MSE and an LPIPS-style distance, with the
reconstruction from the original codes and with the source image. The paper finds both grow with
the distance and stay negligible for small distances, which motivates grouping near codes (IAR).

Replacement rule: for a target distance t > 0, code i is replaced by the other code k whose
distance d(i, k) is closest to t (ties: lowest index); t = 0 keeps every code. The table
(targets x codes) is computed once from the codebook distance matrix in row blocks, so tokens are
replaced by one gather. The distances actually achieved are reported: a code may have no
neighbour near t (below the nearest-neighbour distance the replacement is the nearest code).

MSE is measured on [0, 1] pixels; images are clamped to [-1, 1] as saved images would be.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from iar2.cli import nonneg_float, positive_int
from iar2.config import ConfigError
from iar2.data.imagefolder import ImageFolderDataset
from iar2.data.transforms import eval_transform
from iar2.distributed import pick_device
from iar2.io import atomic_write_json
from iar2.perceptual import build_perceptual
from iar2.tokenizer.evaluate import spread_indices
from iar2.tokenizer.vq_model import default_image_size, load_vq

log = logging.getLogger(__name__)

LEVEL_INDEX = {"semantic": 0, "detail": 1}


def replacement_table(codebook: torch.Tensor, targets: list[float], max_elements: int = 1 << 24
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target t and code i, the code whose distance from i is closest to t (another code if t > 0).

    Returns (replace (T, N) int64, achieved (T, N) float64 distances d(i, replace[t, i])).
    Rows of the N x N distance matrix are computed in blocks of at most `max_elements` per target set.
    """
    c = codebook.detach().double()
    n = c.shape[0]
    t = torch.tensor(targets, dtype=torch.float64, device=c.device)
    rows = max(1, max_elements // max(n * len(targets), 1))
    replace = torch.empty(len(targets), n, dtype=torch.long, device=c.device)
    achieved = torch.empty(len(targets), n, dtype=torch.float64, device=c.device)
    for s in range(0, n, rows):
        # no matmul shortcut: each distance computed directly, so blocks do not change the values
        d = torch.cdist(c[s:s + rows], c, compute_mode="donot_use_mm_for_euclid_dist")  # (r, N)
        r = torch.arange(d.shape[0], device=c.device)
        d[r, s + r] = 0.0  # exact zero on the diagonal
        gap = (d[None] - t[:, None, None]).abs()  # (T, r, N)
        gap[:, r, s + r] = torch.where(t > 0, torch.inf, 0.0).to(gap.dtype)[:, None]  # t > 0: always another code
        k = gap.argmin(-1)  # (T, r)
        replace[:, s:s + rows] = k
        achieved[:, s:s + rows] = d[None].expand(len(targets), -1, -1).gather(2, k[..., None]).squeeze(-1)
    return replace, achieved


def distance_quantiles(codebook: torch.Tensor, qs=(0.0, 0.05, 0.5, 0.95, 1.0), max_rows: int = 512) -> dict:
    """Quantiles of the off-diagonal code distances (exact for small codebooks, rows spread evenly otherwise)."""
    c = codebook.detach().double().cpu()
    n = c.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(np.int64))
    d = torch.cdist(c[rows], c, compute_mode="donot_use_mm_for_euclid_dist")
    off = torch.ones_like(d, dtype=torch.bool)
    off[torch.arange(len(rows)), torch.from_numpy(rows)] = False
    vals = np.quantile(d[off].numpy(), qs)
    return {f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(qs, vals)}


def default_targets(codebook: torch.Tensor, count: int = 9) -> list[float]:
    """`count` targets evenly spaced from 0 to the 95th percentile of code distances."""
    top = distance_quantiles(codebook, (0.95,))["q95"]
    return [round(float(v), 6) for v in np.linspace(0.0, top, count)]


def _replace_level(indices: torch.Tensor, table: torch.Tensor, level: str) -> torch.Tensor:
    if level == "single":
        return table[indices]
    out = indices.clone()
    k = LEVEL_INDEX[level]
    out[:, k] = table[indices[:, k]]
    return out


def _tokens(indices: torch.Tensor, level: str) -> torch.Tensor:
    return indices if level == "single" else indices[:, LEVEL_INDEX[level]]


def _stats(values: list[torch.Tensor]) -> dict | None:
    if not values:
        return None
    v = torch.cat(values).double()
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False))}


@torch.no_grad()
def code_distance_curve(model, batches, targets: list[float], level: str = "single", perceptual=None,
                        device: str | torch.device = "cpu", total: int | None = None) -> dict:
    """Replace every `level` token at each target distance; per-target means/stds (module doc).

    batches: iterable of image tensors (B, 3, H, W) in [-1, 1] (or (images, labels) pairs).
    perceptual: a module (x, y) -> (B,) distances, or None to skip LPIPS.
    """
    device = torch.device(device)
    codebook = model.codebook_vectors(level).to(device)  # validates the level
    replace, achieved = replacement_table(codebook, targets)
    per = [{k: [] for k in ("mse_vs_recon", "lpips_vs_recon", "mse_vs_source", "lpips_vs_source", "achieved",
                            "replaced")} for _ in targets]
    ref = {"mse_vs_source": [], "lpips_vs_source": []}
    n_images = 0
    bar = tqdm(total=total, desc="code distance", unit="img", dynamic_ncols=True, mininterval=1.0)
    for batch in batches:
        x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        idx = model.encode_indices(x)
        rec0 = model.decode_indices(idx).clamp(-1, 1)
        ref["mse_vs_source"].append(_mse(rec0, x))
        if perceptual is not None:
            ref["lpips_vs_source"].append(perceptual(rec0, x).reshape(-1).double().cpu())
        tok = _tokens(idx, level)
        for ti in range(len(targets)):
            rec = model.decode_indices(_replace_level(idx, replace[ti], level)).clamp(-1, 1)
            p = per[ti]
            p["mse_vs_recon"].append(_mse(rec, rec0))
            p["mse_vs_source"].append(_mse(rec, x))
            if perceptual is not None:
                p["lpips_vs_recon"].append(perceptual(rec, rec0).reshape(-1).double().cpu())
                p["lpips_vs_source"].append(perceptual(rec, x).reshape(-1).double().cpu())
            p["achieved"].append(achieved[ti][tok].reshape(-1).cpu())
            p["replaced"].append((replace[ti][tok] != tok).reshape(-1).double().cpu())
        n_images += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    if not n_images:
        raise ValueError("no images to measure")
    results = []
    for t, p in zip(targets, per):
        a = _stats(p["achieved"])
        results.append({"target": float(t), "achieved_mean": a["mean"], "achieved_std": a["std"],
                        "replaced_fraction": _stats(p["replaced"])["mean"],
                        **{k: _stats(p[k]) for k in ("mse_vs_recon", "lpips_vs_recon", "mse_vs_source",
                                                     "lpips_vs_source")}})
    return {"level": level, "codebook_size": int(codebook.shape[0]), "num_images": n_images,
            "codebook_distances": distance_quantiles(codebook),
            "reference": {k: _stats(v) for k, v in ref.items()}, "results": results}


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image MSE on [0, 1] pixels."""
    return (((a.float() - b.float()) / 2) ** 2).flatten(1).mean(1).double().cpu()


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", required=True, help="VQ tokenizer (.safetensors with its .json, or a checkpoint folder)")
    p.add_argument("--data", required=True, help="ImageFolder root holding <split>/<class>/<images>")
    p.add_argument("--split", default="val")
    p.add_argument("--image-size", type=positive_int, default=None, help="image size (default: the VQ's training size)")
    p.add_argument("--level", choices=["single", "semantic", "detail"], default=None,
                   help="codebook whose tokens are replaced (default: single, or detail for dual tokenizers)")
    p.add_argument("--distances", type=nonneg_float, nargs="+", default=None,
                   help="target code distances (default: 9 from 0 to the 95th percentile of code distances)")
    p.add_argument("--num-images", type=positive_int, default=64, help="images spread evenly over the split")
    p.add_argument("--perceptual", choices=["lpips_vgg", "domain", "none"], default="domain",
                   help="LPIPS backend: the domain network (offline), LPIPS-VGG, or none")
    p.add_argument("--domain-net", default=None, help="reference network checkpoint (`iar2 refnet train`)")
    p.add_argument("--weights-dir", default=None, help="folder holding pretrained weight files (lpips_vgg)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", required=True, help="result JSON to write")


def run(args: argparse.Namespace) -> int:
    if args.perceptual == "domain" and not args.domain_net:
        raise ConfigError("--domain-net: required with --perceptual domain (a checkpoint from `iar2 refnet train`)")
    dev = pick_device(args.device)
    perc = build_perceptual(args.perceptual, domain_net=args.domain_net, weights_dir=args.weights_dir)
    if perc is not None:
        perc = perc.to(dev).eval()
    model = load_vq(args.vq, dev)
    level = args.level or ("single" if model.cfg.quantizer == "single" else "detail")
    image_size = args.image_size or default_image_size(args.vq)
    if not image_size:
        raise ConfigError("--image-size: the VQ metadata does not record its image size; pass it")
    model.grid(image_size)
    targets = args.distances or default_targets(model.codebook_vectors(level))
    ds = ImageFolderDataset(args.data, args.split, eval_transform(image_size))
    idx = spread_indices(len(ds), args.num_images)
    loader = DataLoader(Subset(ds, idx), batch_size=args.batch_size, shuffle=False)
    log.info("code distance: %d %s images, level %s, targets %s", len(idx), args.split, level, targets)
    t0 = time.perf_counter()
    result = code_distance_curve(model, loader, targets, level, perc, dev, total=len(idx))
    result.update(vq=str(args.vq), data=str(args.data), split=args.split, image_size=image_size,
                  perceptual=args.perceptual, domain_net=args.domain_net, quantizer=model.cfg.quantizer,
                  mse_scale="[0,1] pixels", seconds=time.perf_counter() - t0)
    atomic_write_json(args.out, result)
    for r in result["results"]:
        lp = r["lpips_vs_recon"]
        log.info("target %.3f (achieved %.3f): MSE %.5f  LPIPS %s", r["target"], r["achieved_mean"],
                 r["mse_vs_recon"]["mean"], "n/a" if lp is None else f"{lp['mean']:.4f}")
    log.info("wrote %s", args.out)
    return 0
