"""The built-in offline dataset: class-conditional photographs from scikit-image, as an ImageFolder.

No ImageNet is reachable here, so the pipeline's default dataset is made from the photographs that
ship inside the scikit-image wheel (read straight from the package folder, so pooch never downloads).
Each class is one photograph (or a group of photographs of one scene); its images are random square
crops at random scales, randomly flipped, with a small colour jitter, resized to `size`.

Train and val never share pixels: every photograph is cut along its long axis, train crops come from
the first 65% and val crops from the last 35%. Crop sizes are drawn from the same range for both
splits, so the splits differ only in where the crops come from.

Output layout (the ImageNet layout, written atomically: built in a temporary folder, then renamed):

    out_root/train/<class>/<class>_00000.png    out_root/val/<class>/...
    out_root/classes.json                       class names in index order (sorted folder names)
    out_root/builtin.json                       the parameters that made it

Deterministic: the bytes are a function of (num_classes, counts, size, seed). A class's images depend
only on (seed, the class's catalogue position, split), so adding classes never changes existing ones.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from iar2.cli import int_range, nonneg_int, positive_int
from iar2.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.65  # share of each photograph's long axis given to train crops; the rest is val's


@dataclass(frozen=True)
class BuiltinClass:
    name: str  # folder name
    files: tuple[str, ...]  # photographs in skimage/data (a group shares one class)


# Catalogue order is fixed: `num_classes=N` takes the first N. Photographs first, gray ones last
# (gray photographs are replicated to RGB; colour jitter then tints them slightly).
CATALOGUE: tuple[BuiltinClass, ...] = (
    BuiltinClass("astronaut", ("astronaut.png",)),
    BuiltinClass("cat", ("chelsea.png",)),
    BuiltinClass("coffee", ("coffee.png",)),
    BuiltinClass("rocket", ("rocket.jpg",)),
    BuiltinClass("motorcycle", ("motorcycle_left.png", "motorcycle_right.png")),
    BuiltinClass("galaxy", ("hubble_deep_field.jpg",)),
    BuiltinClass("tissue", ("ihc.png",)),
    BuiltinClass("cameraman", ("camera.png",)),
    BuiltinClass("coins", ("coins.png",)),
    BuiltinClass("moon", ("moon.png",)),
    BuiltinClass("brick", ("brick.png",)),
    BuiltinClass("grass", ("grass.png",)),
    BuiltinClass("gravel", ("gravel.png",)),
    BuiltinClass("clock", ("clock_motion.png",)),
    BuiltinClass("cell", ("cell.png",)),
)
MAX_CLASSES = len(CATALOGUE)
_SPLIT_ID = {"train": 0, "val": 1}


def skimage_data_dir() -> Path:
    import skimage.data  # a slow import, needed only here

    return Path(skimage.data.__file__).parent


def load_photo(name: str) -> np.ndarray:
    """One photograph shipped with scikit-image as uint8 (H, W, 3)."""
    path = skimage_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-image photograph not found: {path} (the built-in dataset needs the "
                                "scikit-image wheel's data files; reinstall scikit-image>=0.22)")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def split_region(shape: tuple[int, int], split: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of a photograph a split's crops come from."""
    h, w = shape
    if w >= h:  # cut across the long axis
        cut = int(round(w * TRAIN_FRACTION))
        return (0, 0, h, cut) if split == "train" else (0, cut, h, w - cut)
    cut = int(round(h * TRAIN_FRACTION))
    return (0, 0, cut, w) if split == "train" else (cut, 0, h - cut, w)


def crop_side_range(shape: tuple[int, int]) -> tuple[int, int]:
    """Crop sides in pixels, the same for both splits: up to 40% of the short side, capped so that
    the largest crop still fits the (smaller) val region."""
    short, long_ = min(shape), max(shape)
    hi = int(min(0.4 * short, (1 - TRAIN_FRACTION) * long_))
    return max(8, hi // 2), hi


def make_crop(photo: np.ndarray, split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One random crop of `photo` from `split`'s region: scale, position, flip, colour jitter, resize."""
    top, left, rh, rw = split_region(photo.shape[:2], split)
    lo, hi = crop_side_range(photo.shape[:2])
    side = int(rng.integers(lo, hi + 1))
    y = top + int(rng.integers(0, rh - side + 1))
    x = left + int(rng.integers(0, rw - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
    arr = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    # small colour jitter: contrast about the mean, overall brightness, per-channel gain
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
    gain = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    mean = arr.mean()
    arr = ((arr - mean) * contrast + mean) * brightness * gain
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def class_images(cls_pos: int, split: str, count: int, size: int, seed: int,
                 photos: list[np.ndarray]) -> list[np.ndarray]:
    # one stream per (seed, class, split): classes and splits are independent of each other
    rng = np.random.default_rng([seed, cls_pos, _SPLIT_ID[split]])
    out = []
    for _ in range(count):
        photo = photos[int(rng.integers(0, len(photos)))]
        out.append(make_crop(photo, split, size, rng))
    return out


def make_builtin(out_root: str | Path, num_classes: int = 10, train_per_class: int = 100,
                 val_per_class: int = 50, size: int = 64, seed: int = 0) -> Path:
    """Materialise the built-in dataset at `out_root` (replacing a previous one atomically)."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes: {num_classes} is out of range; allowed values: [2, {MAX_CLASSES}]")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be >= 1")
    if size < 8:
        raise ValueError(f"size: {size} is out of range; allowed values: >= 8")
    out_root = Path(out_root)
    classes = CATALOGUE[:num_classes]
    names = sorted(c.name for c in classes)  # index order = sorted folder names (as the ImageFolder reads it)
    log.info("building the built-in dataset at %s: %d classes, %d train + %d val images each, %d px, seed %d",
             out_root, num_classes, train_per_class, val_per_class, size, seed)
    with atomic_path(out_root, is_dir=True) as tmp:
        total = num_classes * (train_per_class + val_per_class)
        with tqdm(total=total, desc="builtin", unit="img") as bar:
            for pos, cls in enumerate(classes):
                photos = [load_photo(f) for f in cls.files]
                for split, count in (("train", train_per_class), ("val", val_per_class)):
                    folder = tmp / split / cls.name
                    folder.mkdir(parents=True)
                    for i, img in enumerate(class_images(pos, split, count, size, seed, photos)):
                        # no timestamps or other varying chunks: same inputs -> same bytes
                        Image.fromarray(img).save(folder / f"{cls.name}_{i:05d}.png", optimize=False)
                        bar.update(1)
        atomic_write_json(tmp / "classes.json", {"classes": names, "num_classes": len(names)})
        atomic_write_json(tmp / "builtin.json", {
            "source": "scikit-image photographs", "num_classes": num_classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed,
            "classes": {c.name: list(c.files) for c in classes}, "train_fraction": TRAIN_FRACTION})
        os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; a dataset is meant to be read by others
    log.info("wrote %d images to %s", total, out_root)
    return out_root


# ----------------------------------------------------------------------------- CLI: iar2 data builtin

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/builtin", help="output ImageFolder root (replaced atomically)")
    p.add_argument("--num-classes", type=int_range(2, MAX_CLASSES), default=10,
                   help=f"number of classes, 2..{MAX_CLASSES}")
    p.add_argument("--train-per-class", type=positive_int, default=100, help="train images per class")
    p.add_argument("--val-per-class", type=positive_int, default=50, help="val images per class")
    p.add_argument("--size", type=positive_int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (same seed -> same bytes)")


def run(args: argparse.Namespace) -> int:
    make_builtin(args.out, num_classes=args.num_classes, train_per_class=args.train_per_class,
                 val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    return 0
