"""`iar2 diagnose`: measurements that tell a defect from a lack of scale (issue 16).

    iar2 diagnose tokenizer   per-level codebook usage, perplexity and entropy over a split; rFID / PSNR of the
                              full decode and (dual) of the semantic-only decode; what constant code maps decode to
                              (are flat tiles one code? detail code 0?); a PNG of those constant decodes.
    iar2 diagnose ar          per-level teacher-forced CE and top-1 accuracy on training and held-out tokens, next to
                              the data's token entropies; how far conditional and unconditional predictions differ
                              (KL per level: does the class reach the head and the detail prediction?); samples at
                              T = 1 without guidance against guided ones: class accuracy under the reference network,
                              flat images, token repetition, tokens the training data never uses, FID / recall.
    iar2 diagnose budget      optimiser steps, sequences seen, wall time and final losses of AR runs and tokenizers.
    iar2 diagnose joint-tokens  a dual token folder as one joint vocabulary k * V_d + j: LlamaGen trained on it
                              against IAR2 on the same tokens splits the tokenizer's share of a gap from the AR's.

Each writes one JSON (atomically). Every number is computed by the package's own code paths (load_vq, load_ar,
TokenDataset, generate, decode_to_uint8, the metrics' feature extractor), so the diagnosis measures what the
pipeline runs. The AR part lives in iar2/diagnose_ar.py (module size).
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from iar2 import layout
from iar2.cli import positive_int
from iar2.data.imagefolder import ImageFolderDataset
from iar2.data.transforms import eval_transform
from iar2.distributed import pick_device
from iar2.io import atomic_write_json, read_json
from iar2.metrics import FeatureCollector, psnr, resolve_extractor, to_uint8
from iar2.sample import decode_to_uint8, save_grid
from iar2.tokenizer.evaluate import spread_indices
from iar2.tokenizer.usage import usage_stats
from iar2.tokenizer.vq_model import default_image_size, load_vq

# iar2.diagnose_ar builds on this module, so it is imported where `iar2 diagnose ar` / `joint-tokens` need it.

log = logging.getLogger(__name__)

# An image whose pixel standard deviation (uint8 units, mean over channels) is below this is "flat". Some real
# classes are smooth (default scale, val at 32 px: median 30, 20 % below 10, mostly moon / cameraman / rocket), so
# flatness is compared per class against the data, never read alone.
FLAT_STD = 10.0


# ----------------------------------------------------------------------------- histogram statistics

def entropy_of(x: np.ndarray, size: int) -> float:
    return usage_stats(np.bincount(np.asarray(x, dtype=np.int64).ravel(), minlength=size))["entropy"]


def conditional_entropy(x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> float:
    """H(X | Y) = H(X, Y) - H(Y) in nats, from paired samples (same shapes)."""
    x, y = np.asarray(x, dtype=np.int64).ravel(), np.asarray(y, dtype=np.int64).ravel()
    return entropy_of(y * nx + x, nx * ny) - entropy_of(y, ny)


def flat_fraction(images: np.ndarray, threshold: float = FLAT_STD) -> tuple[float, np.ndarray]:
    """(fraction of flat images, per-image std) for uint8 images (N, H, W, 3)."""
    std = images.reshape(len(images), -1, images.shape[-1]).astype(np.float64).std(axis=1).mean(axis=1)
    return float((std < threshold).mean()) if len(std) else 0.0, std


# ----------------------------------------------------------------------------- tokenizer

@torch.no_grad()
def tokenizer_report(vq_path, data_root, split: str = "val", domain_net=None, report=None, max_images: int | None = 200,
                     batch_size: int = 50, device: str = "auto", extractor: str = "domain"):
    """(JSON-ready dict, uint8 constant-map decodes (K, H, W, 3)) for one tokenizer (module doc)."""
    dev = pick_device(device)
    vq = load_vq(vq_path, dev)
    size = default_image_size(vq_path)
    ds = ImageFolderDataset(data_root, split, eval_transform(size), report=report, verify=report is None)
    idx = spread_indices(len(ds), max_images)
    col = FeatureCollector(resolve_extractor(extractor, domain_net=domain_net), device=dev)
    names, vocabs = vq.level_names(), vq.vocab_sizes()
    decodes = ["full", "semantic"] if vq.cfg.quantizer == "semantic_detail" else ["full"]
    psnrs = {d: [] for d in decodes}
    stds = {d: [] for d in ["original", *decodes]}
    codes = []
    for x, _ in DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False):
        x = x.to(dev)
        ind = vq.encode_indices(x)
        codes.append(ind.reshape(len(x), len(names), -1).cpu())
        orig = to_uint8(x)
        col.add("original", orig)
        stds["original"].append(flat_fraction(orig.permute(0, 2, 3, 1).cpu().numpy())[1])
        for d in decodes:
            rec = to_uint8(vq.decode_indices(ind, d))
            col.add(d, rec)
            psnrs[d].append(psnr(rec, orig).cpu())
            stds[d].append(flat_fraction(rec.permute(0, 2, 3, 1).cpu().numpy())[1])
    codes = torch.cat(codes).numpy()  # (N, levels, h*w)
    out: dict = {"vq": str(vq_path), "quantizer": vq.cfg.quantizer, "split": split, "num_images": len(idx),
                 "extractor": extractor, "levels": {}}
    for lvl, (name, v) in enumerate(zip(names, vocabs)):
        out["levels"][name] = {"size": v, **usage_stats(np.bincount(codes[:, lvl].ravel(), minlength=v))}
    if len(names) == 2:
        out["levels"]["detail"]["entropy_given_semantic"] = conditional_entropy(codes[:, 1], codes[:, 0], *vocabs[::-1])
    for d in decodes:
        out[f"{d}_decode"] = {"rfid": col.fid(d, "original"), "psnr": float(torch.cat(psnrs[d]).double().mean()),
                              "pixel_std_median": float(np.median(np.concatenate(stds[d]))),
                              "flat_fraction": float((np.concatenate(stds[d]) < FLAT_STD).mean())}
    out["original_pixel_std_median"] = float(np.median(np.concatenate(stds["original"])))
    out["original_flat_fraction"] = float((np.concatenate(stds["original"]) < FLAT_STD).mean())
    const, images = constant_maps(vq, codes, vocabs, int(np.sqrt(codes.shape[-1])), dev)
    out["constant_maps"] = const
    return out, images


@torch.no_grad()
def constant_maps(vq, codes: np.ndarray, vocabs: list[int], grid: int, dev, top: int = 16):
    """Decode maps filled with one code (dual: one (k, j) pair) and measure how flat they are.

    Dual: every semantic code k with detail 0 and with its most frequent detail code in `codes`; single: code 0 and
    the `top` most frequent codes. Returns (rows, uint8 images)."""
    m = grid * grid
    hist = np.bincount(codes[:, 0].ravel(), minlength=vocabs[0])
    rows, maps = [], []
    if len(vocabs) == 2:
        for k in range(vocabs[0]):
            det = codes[:, 1][codes[:, 0] == k]
            mode = int(np.bincount(det).argmax()) if det.size else 0
            for j, why in ((0, "detail 0"), (mode, "most frequent detail")):
                rows.append({"semantic": k, "detail": j, "what": why, "semantic_share": float(hist[k] / hist.sum())})
                maps.append(torch.tensor([[k] * m, [j] * m]))
    else:
        for c in dict.fromkeys([0, *np.argsort(-hist)[:top].tolist()]):
            rows.append({"code": int(c), "share": float(hist[c] / hist.sum())})
            maps.append(torch.full((m,), int(c)))
    images = decode_to_uint8(vq, torch.stack(maps).to(dev), grid, None).numpy()
    _, std = flat_fraction(images)
    for r, s, im in zip(rows, std, images):
        r["pixel_std"] = float(s)
        r["mean_rgb"] = [round(float(v), 1) for v in im.reshape(-1, 3).mean(0)]
    return rows, images


# ----------------------------------------------------------------------------- budget

def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def loss_trend(rows: list[dict], key: str) -> dict | None:
    """First, middle and last logged value of `key`, and the relative drop over the last half of training
    (near 0: converged; large: still learning when the budget ended)."""
    vals = [(int(float(r["step"])), _num(r.get(key))) for r in rows if _num(r.get(key)) is not None]
    if len(vals) < 2:
        return None
    first, mid, last = vals[0], vals[len(vals) // 2], vals[-1]
    return {"first": first[1], "middle": mid[1], "last": last[1], "steps": [first[0], mid[0], last[0]],
            "last_half_drop": (mid[1] - last[1]) / abs(mid[1]) if mid[1] else None}


def budget_report(results, runs: list[str], tokenizers: list[str]) -> dict:
    """Steps, sequences seen, wall time and loss trends of AR runs and tokenizers under `results`."""
    results = Path(results)
    out: dict = {"ar": {}, "tokenizers": {}}
    for run in runs:
        meta_path = results / layout.model_meta(run)
        meta = read_json(meta_path) if meta_path.is_file() else {}
        rc = meta.get("run_config", {})
        tr = rc.get("train", {})
        rows = _csv_rows(results / layout.train_metrics(run))
        n_img = None
        if tr.get("tokens") and (Path(tr["tokens"]) / "meta.json").is_file():
            n_img = read_json(Path(tr["tokens"]) / "meta.json")["num_images"]
        steps = meta.get("step")
        keys = [k for k in ("loss", "token_ce", "semantic_ce", "detail_ce") if rows and k in rows[0]]
        out["ar"][run] = {
            "steps": steps, "batch_size": tr.get("batch_size"), "elapsed_s": meta.get("elapsed_s"),
            "params": meta.get("params"), "paradigm": meta.get("model_config", {}).get("paradigm"),
            "seconds_per_step": meta["elapsed_s"] / steps if steps and meta.get("elapsed_s") else None,
            "data_passes": steps * tr["batch_size"] / n_img if steps and n_img else None,
            "loss": {k: loss_trend(rows, k) for k in keys}}
    for tok in tokenizers:
        d = results / layout.tokenizer_dir(tok)
        entry = {}
        for stage_dir in sorted([p for p in d.iterdir() if p.is_dir()] if d.is_dir() else []) + [d]:
            rows = _csv_rows(stage_dir / layout.TRAIN_METRICS)
            if not rows:
                continue
            keys = [k for k in rows[0] if k not in ("step", "lr", "steps_per_s", "epoch")]
            entry[stage_dir.name] = {"steps": int(float(rows[-1]["step"])), **{k: loss_trend(rows, k) for k in keys}}
        out["tokenizers"][tok] = entry
    return out


# ----------------------------------------------------------------------------- CLI

def add_arguments_for(words: tuple[str, ...], p: argparse.ArgumentParser) -> None:
    if words[1] == "joint-tokens":
        p.add_argument("--tokens", required=True, help="a dual tokenizer's `iar2 tokenize` folder")
        p.add_argument("--out", required=True, help="folder for the joint (single-level) tokens")
        return
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    if words[1] == "tokenizer":
        p.add_argument("--vq", required=True, help="VQ tokenizer (.safetensors with its .json)")
        p.add_argument("--data", required=True, help="ImageFolder root")
        p.add_argument("--split", default="val")
        p.add_argument("--domain-net", required=True, help="reference network (rFID features)")
        p.add_argument("--report", default=None, help="`iar2 data check` report")
        p.add_argument("--max-images", type=positive_int, default=200)
        p.add_argument("--png", default=None, help="also write the constant-map decodes as a PNG")
    elif words[1] == "ar":
        from iar2.diagnose_ar import add_arguments as add_ar

        add_ar(p)
    else:
        p.add_argument("--results", required=True, help="a scale's results folder (e.g. results/default)")
        p.add_argument("--runs", nargs="*", default=[], help="AR run ids (e.g. llamagen-B-16 iar2-B-16)")
        p.add_argument("--tokenizers", nargs="*", default=[], help="tokenizer ids (e.g. vq-16384 sd-256-4096)")


def save_tiles(images: np.ndarray, path, ncols: int = 16) -> None:
    """A plain grid of uint8 images (N, H, W, 3), row-major."""
    save_grid(images, np.arange(len(images)) // ncols, Path(path), ncols)


def run_for(words: tuple[str, ...], args: argparse.Namespace) -> int:
    if words[1] == "joint-tokens":
        from iar2.diagnose_ar import write_joint_tokens

        meta = write_joint_tokens(args.tokens, args.out)
        log.info("joint tokens (vocabulary %d) written to %s", meta["vocab_sizes"][0], args.out)
        return 0
    if words[1] == "tokenizer":
        res, images = tokenizer_report(args.vq, args.data, args.split, args.domain_net, args.report, args.max_images,
                                       device=args.device)
        if args.png:
            save_tiles(images, args.png)
    elif words[1] == "ar":
        from iar2.diagnose_ar import run as run_ar

        res = run_ar(args)
    else:
        res = budget_report(args.results, args.runs, args.tokenizers)
    atomic_write_json(args.out, res)
    log.info("diagnosis written to %s", args.out)
    return 0
