"""`iar2 bench tokenize`: tokenization images/s per augmentation (iar2.tokenize), on a given VQ and dataset or on a
random small-scale dual VQ and a built-in dataset made in a temporary folder."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from iar2.checkpoint import save_weights
from iar2.cli import positive_int
from iar2.config import from_dict, to_dict
from iar2.data.builtin import make_builtin
from iar2.distributed import pick_device
from iar2.io import atomic_write_json
from iar2.tokenize import AUGMENTATIONS, tokenize
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.vq_model import VQModel


# The small-scale tokenizer (32 px, downsample 4, ~0.35M parameters), used when no --vq is given.
SMALL_VQ = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 32, "embed_dim": 8, "norm_groups": 8,
            "quantizer": "semantic_detail", "semantic_size": 16, "detail_size": 256}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", default=None, help="VQ to benchmark (default: a random small-scale dual VQ)")
    p.add_argument("--data", default=None, help="ImageFolder root (default: a built-in dataset made in a temp dir)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--images", type=positive_int, default=256, help="images per measurement")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--augs", nargs="+", choices=list(AUGMENTATIONS), default=list(AUGMENTATIONS))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the figures as JSON")


def run_bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="iar2-bench-tokenize-"))
    try:
        vq = args.vq
        if vq is None:
            torch.manual_seed(0)
            cfg = from_dict(VQModelConfig, SMALL_VQ)
            vq = tmp / "vq.safetensors"
            save_weights(vq, VQModel(cfg).state_dict(), {"model_config": to_dict(cfg), "image_size": args.image_size})
        data = args.data
        if data is None:
            per_class = max(1, -(-args.images // 10))
            data = make_builtin(tmp / "data", num_classes=10, train_per_class=per_class, val_per_class=1,
                                size=args.image_size, seed=0)
        rows = []
        for aug in args.augs:
            t0 = time.perf_counter()
            meta = tokenize(vq, data, args.split, tmp / f"codes-{aug}", aug=aug, image_size=args.image_size,
                            batch_size=args.batch_size, chunk_size=args.images, device=args.device,
                            max_images=args.images)
            dt = time.perf_counter() - t0
            n = meta["num_images"]
            rows.append({"aug": aug, "images": n, "seconds": dt, "images_per_s": n / dt,
                         "encoded_views_per_s": n * meta["num_augmentations"] / dt})
        base = rows[0]["images_per_s"]
        print(f"tokenization, {args.image_size} px, batch {args.batch_size}, device {pick_device(args.device)}")
        print(f"{'aug':>8} {'images':>7} {'img/s':>9} {'views/s':>9} {'rel. to ' + rows[0]['aug']:>12}")
        for r in rows:
            r["relative"] = r["images_per_s"] / base
            print(f"{r['aug']:>8} {r['images']:>7} {r['images_per_s']:9.1f} {r['encoded_views_per_s']:9.1f} "
                  f"{r['relative']:12.2f}")
        if args.out:
            atomic_write_json(args.out, {"benchmark": "tokenize", "image_size": args.image_size,
                                         "batch_size": args.batch_size, "device": str(pick_device(args.device)),
                                         "results": rows})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
