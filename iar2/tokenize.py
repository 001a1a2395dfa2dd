"""Tokenization: encode a dataset split into memory-mapped VQ codes with LlamaGen's augmentations.

The AR generator trains on pre-extracted codes, one augmentation picked at random per sample and epoch.
Augmentations (applied to the ADM centre crop of each image):
    none     1: the centre crop at image_size
    flip     2: the centre crop and its horizontal flip
    tencrop 10: centre crop at int(image_size * crop_range), then torchvision's ten-crop at image_size
                (top-left, top-right, bottom-left, bottom-right, centre, then the same five crops of the
                horizontally flipped image)

Output folder (codes for every image and every augmentation):
    codes.npy    (num_images, num_aug, levels, h*w) uint16 (int32 if a vocabulary exceeds 65536);
                 levels: 1 for a single codebook, 2 for dual codebooks = (semantic, detail); tokens raster order
    labels.npy   (num_images,) int32 class indices (classes listed in meta.json)
    meta.json    VQ path + fingerprint, grid, vocabulary sizes, augmentation names, class index, counts.
                 Written last: its presence marks a complete folder.
Bad images are excluded by the dataset (from a `iar2 data check` report, or by decoding everything first),
so row i of codes.npy and labels.npy is the i-th readable image in class / file-name order.

Deterministic (eval-mode model, fixed order, no randomness) and resumable: rows are written in chunks into
`codes.partial.npy` / `labels.partial.npy` (np.lib.format.open_memmap); after each chunk is flushed,
`progress.json` is replaced atomically. `--resume` continues from the last finished chunk. Chunks are whole
batches from a chunk boundary, so a resumed run encodes exactly the batches an uninterrupted run does and the
arrays are identical. On completion the partial files are renamed to their final names and meta.json is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from iar2.cli import add_config_arguments, load_run_config, positive_int
from iar2.config import config_hash, to_dict
from iar2.data.imagefolder import ImageFolderDataset, data_digest, listing_fingerprint
from iar2.data.transforms import EpochSeeded, center_crop_arr
from iar2.distributed import pick_device
from iar2.fingerprint import FORMAT
from iar2.io import atomic_write_json, read_json
from iar2.tokenizer.vq_model import default_image_size, load_vq

log = logging.getLogger(__name__)

AUGMENTATIONS = {
    "none": ("center",),
    "flip": ("center", "center_flip"),
    # torchvision's ten-crop order; the last five are crops *of the flipped image* ("flipped_top_left" is
    # the top-left of the mirror image, i.e. the mirrored top-right crop): together the 5 crops + their flips
    "tencrop": ("top_left", "top_right", "bottom_left", "bottom_right", "center", "flipped_top_left",
                "flipped_top_right", "flipped_bottom_left", "flipped_bottom_right", "flipped_center"),
}
CODES, LABELS, META, PROGRESS = "codes.npy", "labels.npy", "meta.json", "progress.json"
PARTIAL = {CODES: "codes.partial.npy", LABELS: "labels.partial.npy"}


# ----------------------------------------------------------------------------- augmentations

class CenterCropUInt8:
    """PIL image -> uint8 (3, size, size): the ADM centre crop, kept as bytes until the batch is on device."""

    needs_generator = False

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(center_crop_arr(img, self.size))).permute(2, 0, 1)  # own, writable copy

    def __repr__(self) -> str:
        return f"CenterCropUInt8({self.size})"


def crop_size(aug: str, image_size: int, crop_range: float) -> int:
    """Side of the centre crop the dataset yields: larger than image_size only for ten-crop."""
    return int(image_size * crop_range) if aug == "tencrop" else image_size


def augment(x: torch.Tensor, aug: str, image_size: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, A, 3, image_size, image_size) in the order of AUGMENTATIONS[aug]."""
    if aug == "none":
        return x[:, None]
    if aug == "flip":
        return torch.stack([x, x.flip(-1)], dim=1)
    if aug == "tencrop":
        return torch.stack(TF.ten_crop(x, [image_size, image_size]), dim=1)
    raise ValueError(f"aug {aug!r}: allowed values: {', '.join(map(repr, AUGMENTATIONS))}")


@torch.no_grad()
def encode_batch(model, x_uint8: torch.Tensor, aug: str, image_size: int) -> torch.Tensor:
    """Codes (B, A, levels, h*w) of every augmentation of a uint8 batch, in one encoder call."""
    views = augment(x_uint8, aug, image_size)
    b, a = views.shape[:2]
    x = views.flatten(0, 1).float().div_(127.5).sub_(1.0)  # the data pipeline's [-1, 1] mapping
    idx = model.encode_indices(x)
    if idx.dim() == 3:  # single codebook: one level
        idx = idx[:, None]
    return idx.reshape(b, a, idx.shape[1], -1)


# ----------------------------------------------------------------------------- helpers

def vq_fingerprint(model) -> str:
    """sha256 of the model config and every weight tensor (independent of the file it was loaded from)."""
    h = hashlib.sha256(json.dumps(to_dict(model.cfg), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- tokenization

def tokenize(vq_path: str | Path, data_root: str | Path, split: str, out_dir: str | Path, aug: str = "flip",
             crop_range: float = 1.1, image_size: int | None = None, batch_size: int = 64, chunk_size: int = 1024,
             resume: bool = False, device: str = "auto", num_workers: int = 0, report: str | Path | None = None,
             max_images: int | None = None, max_chunks: int | None = None) -> dict | None:
    """Encode `data_root/split` into `out_dir` (module doc). Returns meta.json's content when complete, or
    None when stopped early by `max_chunks` (used to simulate a killed run)."""
    if aug not in AUGMENTATIONS:
        raise ValueError(f"aug {aug!r}: allowed values: {', '.join(map(repr, AUGMENTATIONS))}")
    if crop_range < 1.0:
        raise ValueError(f"crop_range {crop_range}: must be >= 1 (the ten-crop is cut from a larger centre crop)")
    out = Path(out_dir)
    dev = pick_device(device)
    model = load_vq(vq_path, dev)
    image_size = image_size or default_image_size(vq_path)
    if not image_size:
        raise ValueError(f"{vq_path}: its metadata does not record the image size; pass --image-size")
    side = model.grid(image_size)
    levels, vocabs = len(model.level_names()), model.vocab_sizes()
    dtype = np.uint16 if max(vocabs) <= 65536 else np.int32
    chunk = max(batch_size, (chunk_size // batch_size) * batch_size)  # whole batches per chunk

    ds = ImageFolderDataset(data_root, split, CenterCropUInt8(crop_size(aug, image_size, crop_range)),
                            report=report, verify=report is None, workers=0)
    n = len(ds) if max_images is None else min(max_images, len(ds))
    num_aug = len(AUGMENTATIONS[aug])
    shape = (n, num_aug, levels, side * side)
    signature = {"vq_fingerprint": vq_fingerprint(model), "listing_sha256": listing_fingerprint(ds.samples[:n]),
                 "data": data_digest(data_root, split, report), "format": FORMAT,
                 "aug": aug, "crop_range": crop_range if aug == "tencrop" else None, "image_size": image_size,
                 "batch_size": batch_size, "chunk_size": chunk, "shape": list(shape), "dtype": np.dtype(dtype).name}

    # --- where to start
    done = 0
    old = None
    if resume and (out / META).is_file():
        meta = read_json(out / META)
        if meta.get("signature") == signature:
            log.info("%s is already complete; nothing to do", out)
            return meta
        old = meta.get("signature") or {}
    elif resume and (out / PROGRESS).is_file():
        prog = read_json(out / PROGRESS)
        if prog.get("signature") == signature:
            done = int(prog["done"])
            log.info("resuming %s at image %d of %d", out, done, n)
        else:
            old = prog.get("signature") or {}
    if done == 0:  # a fresh run: no stale pieces (those of other inputs are kept aside for inspection)
        out.mkdir(parents=True, exist_ok=True)
        pieces = [out / name for name in (META, PROGRESS, CODES, LABELS, *PARTIAL.values()) if (out / name).is_file()]
        if old is not None and pieces:
            stale = out.with_name(out.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            stale.mkdir()
            for p in pieces:
                os.replace(p, stale / p.name)
            changed = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
            log.warning("tokenize %s: %s changed since its rows were written; they are set aside in %s and "
                        "recomputed", out, ", ".join(changed) or "the format", stale)
        for p in pieces:
            p.unlink(missing_ok=True)

    if done < n:
        if done == 0:
            codes = np.lib.format.open_memmap(out / PARTIAL[CODES], mode="w+", dtype=dtype, shape=shape)
            labels = np.lib.format.open_memmap(out / PARTIAL[LABELS], mode="w+", dtype=np.int32, shape=(n,))
        else:
            codes = np.lib.format.open_memmap(out / PARTIAL[CODES], mode="r+")
            labels = np.lib.format.open_memmap(out / PARTIAL[LABELS], mode="r+")
        finished = _encode_rows(model, ds, aug, image_size, codes, labels, done, chunk, batch_size, dev,
                                num_workers, out, signature, max_chunks)
        del codes, labels  # close the memmaps before renaming
        if not finished:
            return None
    for final, partial in PARTIAL.items():  # all rows are durable: give the arrays their final names
        if (out / partial).is_file():
            os.replace(out / partial, out / final)

    meta = {
        "format": "iar2-codes-v1",
        "codes_file": CODES, "labels_file": LABELS,
        "layout": "codes[image, augmentation, level, row * grid + col]",
        "shape": list(shape), "dtype": np.dtype(dtype).name,
        "num_images": n, "num_augmentations": num_aug, "augmentations": list(AUGMENTATIONS[aug]),
        "aug": aug, "crop_range": signature["crop_range"], "image_size": image_size,
        "grid": [side, side], "levels": model.level_names(), "vocab_sizes": vocabs,
        "vq": str(vq_path), "vq_fingerprint": signature["vq_fingerprint"],
        "vq_config": to_dict(model.cfg), "vq_config_hash": config_hash(model.cfg),
        "data_root": str(data_root), "split": split, "classes": ds.classes, "num_classes": len(ds.classes),
        "num_bad": ds.num_bad, "bad_files": sorted(ds.bad_files), "signature": signature,
    }
    atomic_write_json(out / META, meta)
    (out / PROGRESS).unlink(missing_ok=True)
    log.info("tokenized %d images x %d augmentations -> %s", n, num_aug, out)
    return meta


def _encode_rows(model, ds, aug, image_size, codes, labels, start, chunk, batch_size, dev, num_workers, out,
                 signature, max_chunks) -> bool:
    """Fill rows [start, n) chunk by chunk; return False if stopped by max_chunks."""
    n = codes.shape[0]
    loader = DataLoader(Subset(ds, range(start, n)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    pos, chunks_done = start, 0
    bar = tqdm(total=n, initial=start, desc=f"tokenize {aug}", unit="img", dynamic_ncols=True, mininterval=1.0)
    for x, y in loader:
        c = encode_batch(model, x.to(dev, non_blocking=True), aug, image_size)
        b = c.shape[0]
        codes[pos:pos + b] = c.cpu().numpy().astype(codes.dtype)
        labels[pos:pos + b] = y.numpy()
        pos += b
        bar.update(b)
        if pos % chunk == 0 or pos == n:  # a chunk is finished: make it durable, then record it
            codes.flush()
            labels.flush()
            atomic_write_json(out / PROGRESS, {"done": pos, "num_images": n, "signature": signature})
            chunks_done += 1
            if max_chunks is not None and chunks_done >= max_chunks and pos < n:
                bar.close()
                log.info("stopping after %d chunk(s) at image %d of %d (max_chunks)", chunks_done, pos, n)
                return False
    bar.close()
    return True


# ----------------------------------------------------------------------------- reader

class TokenDataset(EpochSeeded, torch.utils.data.Dataset):
    """Codes written by `iar2 tokenize`, memory-mapped: item i -> (codes (levels, h*w) long, label int).

    The augmentation of each item is drawn at random: by `get(i, generator)` from a given generator, or by
    `__getitem__` from a generator seeded by (seed, epoch, index), so the draw does not depend on DataLoader
    workers. `aug=k` fixes augmentation k instead (0 is the plain centre crop). Call `set_epoch` each epoch.
    """

    def __init__(self, root: str | Path, seed: int = 0, aug: int | None = None):
        self.root = Path(root)
        if not (self.root / META).is_file():
            raise FileNotFoundError(f"no complete tokenization in {self.root} (missing {META}); run "
                                    f"`iar2 tokenize ... --out {self.root}` (add --resume to continue a stopped run)")
        self.meta = read_json(self.root / META)
        self.codes = np.load(self.root / self.meta["codes_file"], mmap_mode="r")
        self.labels = np.load(self.root / self.meta["labels_file"], mmap_mode="r")
        if list(self.codes.shape) != self.meta["shape"] or self.labels.shape[0] != self.codes.shape[0]:
            raise ValueError(f"{self.root}: array shapes {self.codes.shape}, {self.labels.shape} do not match "
                             f"meta.json {self.meta['shape']}")
        self.num_aug = self.codes.shape[1]
        if aug is not None and not 0 <= aug < self.num_aug:
            raise ValueError(f"aug {aug}: allowed values: 0..{self.num_aug - 1} ({self.meta['augmentations']})")
        self.seed, self.epoch, self.aug = seed, 0, aug

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def vocab_sizes(self) -> list[int]:
        return list(self.meta["vocab_sizes"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return self.codes.shape[0]

    def get(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        a = self.aug if self.aug is not None else int(torch.randint(self.num_aug, (), generator=generator))
        codes = torch.from_numpy(self.codes[index, a].astype(np.int64))
        return codes, int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.get(index, None if self.aug is not None else self.generator(index))


# ----------------------------------------------------------------------------- CLI

@dataclass
class TokenizeConfig:
    """Settings of `iar2 tokenize`: a --config file or the flags of the same names (iar2.cli.add_config_arguments)."""
    split: str = field(default="train", metadata={"help": "split to encode"})
    aug: str = field(default="flip", metadata={
        "choices": tuple(AUGMENTATIONS),
        "help": "none: centre crop; flip: + horizontal flip (2); tencrop: LlamaGen ten-crop (10)"})
    crop_range: float = field(default=1.1, metadata={
        "min": 1.0, "help": "tencrop: centre crop at image_size * crop_range before the ten-crop (LlamaGen 1.1 / 1.05)"})
    image_size: int | None = field(default=None, metadata={
        "min": 1, "help": "image size (default: the VQ's training size)"})
    batch_size: int = field(default=64, metadata={"min": 1, "help": "source images per encoder call"})
    chunk_size: int = field(default=1024, metadata={
        "min": 1, "help": "images per durable chunk (rounded to whole batches); a resumed run restarts at a chunk"})
    max_images: int | None = field(default=None, metadata={
        "min": 1, "help": "encode only the first N images (smoke tests)"})
    num_workers: int = field(default=0, metadata={"min": 0, "help": "DataLoader workers decoding images"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N]"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", required=True, help="VQ tokenizer (.safetensors with its .json, or a checkpoint folder)")
    p.add_argument("--data", required=True, help="ImageFolder root holding <split>/<class>/<images>")
    p.add_argument("--out", required=True, help="output folder (codes.npy, labels.npy, meta.json)")
    p.add_argument("--report", default=None,
                   help="`iar2 data check` report: exclude its bad images without decoding everything first")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --out from its last chunk")
    p.add_argument("--max-chunks", type=positive_int, default=None, help="stop after N chunks (testing resumption)")
    add_config_arguments(p, TokenizeConfig)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(TokenizeConfig, args)
    meta = tokenize(args.vq, args.data, cfg.split, args.out, aug=cfg.aug, crop_range=cfg.crop_range,
                    image_size=cfg.image_size, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
                    resume=args.resume, device=cfg.device, num_workers=cfg.num_workers, report=args.report,
                    max_images=cfg.max_images, max_chunks=args.max_chunks)
    if meta is None:
        log.info("stopped early; rerun with --resume to finish")
    return 0
