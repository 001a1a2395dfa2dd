"""ImageNet-style ImageFolder: root/<split>/<class>/<image>, with unreadable images skipped and counted.

Class indices are the sorted class-folder names, written out as `classes.json` so that every stage
(tokenizer, codes, generator, metrics) agrees on them; when `root/classes.json` exists it is the
authority and must match the folders.

Bad images (unreadable, truncated, zero-sized) are found by `scan_imagefolder`, which fully decodes
every file in parallel. `iar2 data check` saves the scan as a JSON report; passing that report to
`ImageFolderDataset(report=...)` excludes the bad files without decoding ImageNet's 1.28M images again.
The report records a fingerprint of the file listing, so a report from a different or changed folder
is refused rather than silently misapplied. Without a report, a file that fails to decode at load time
is logged and replaced by the next sample (so one bad JPEG cannot kill a multi-day run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

from iar2.cli import nonneg_int
from iar2.data.transforms import EpochSeeded
from iar2.fingerprint import file_digest, tree_digest
from iar2.io import atomic_write_json

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CLASSES_FILE = "classes.json"


class DatasetError(ValueError):
    """A dataset folder that cannot be used as it is; the message names the folder."""


# ----------------------------------------------------------------------------- listing and classes

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def split_dir(root: str | Path, split: str) -> Path:
    d = Path(root) / split
    if not d.is_dir():
        raise FileNotFoundError(f"dataset split folder not found: {d} (expected {Path(root)}/{split}/<class>/<images>; "
                                "build the offline dataset with `iar2 data builtin`)")
    return d


def find_classes(root: str | Path, split: str = "train") -> list[str]:
    """Class names in index order: `root/classes.json` if present (checked against the folders), else the
    sorted class-folder names of `split`."""
    d = split_dir(root, split)
    folders = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DatasetError(f"no class folders in {d} (expected {d}/<class>/<images>)")
    index_file = Path(root) / CLASSES_FILE
    if index_file.is_file():
        classes = read_class_index(index_file)
        missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
        if missing or extra:
            raise DatasetError(f"{index_file} does not match the class folders of {d}: "
                               f"missing folders {missing}, folders not in the index {extra}")
        return classes
    return folders


def read_class_index(path: str | Path) -> list[str]:
    with open(path) as fh:
        data = json.load(fh)
    return list(data["classes"] if isinstance(data, dict) else data)


def write_class_index(root: str | Path, path: str | Path | None = None, split: str = "train") -> Path:
    """Write the class order (sorted folder names of `split`) to `path` (default root/classes.json)."""
    classes = find_classes(root, split)
    path = Path(path) if path is not None else Path(root) / CLASSES_FILE
    atomic_write_json(path, {"classes": classes, "num_classes": len(classes)})
    return path


def list_images(root: str | Path, split: str, classes: list[str] | None = None) -> list[tuple[str, int]]:
    """(path relative to root/split, label) for every image file, in class then file-name order.

    Raises DatasetError naming the folder if a class folder holds no images."""
    d = split_dir(root, split)
    classes = classes if classes is not None else find_classes(root, split)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        cdir = d / name
        if not cdir.is_dir():
            raise DatasetError(f"class folder missing: {cdir} (class {label} of {len(classes)})")
        files = sorted(e.name for e in os.scandir(cdir) if e.is_file() and _is_image(e.name))
        if not files:
            raise DatasetError(f"class folder has no images: {cdir} (accepted extensions: "
                               f"{', '.join(IMG_EXTENSIONS)})")
        samples.extend((f"{name}/{f}", label) for f in files)
    return samples


def listing_fingerprint(samples: list[tuple[str, int]]) -> str:
    """sha256 of the (relative path, label) listing: identifies which files a report describes."""
    h = hashlib.sha256()
    for rel, label in samples:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def content_fingerprint(samples: list[tuple[str, int]], digests: list[str]) -> str:
    """sha256 of the listing with each file's content digest: changes when any image's bytes change."""
    h = hashlib.sha256()
    for (rel, label), d in zip(samples, digests):
        h.update(f"{rel}\t{label}\t{d}\n".encode())
    return h.hexdigest()


def read_report(report: str | Path | dict) -> dict:
    """A data-check report, checked for the fields the pipeline reads (one clear error if malformed)."""
    if isinstance(report, dict):
        data, name = report, "(dict)"
    else:
        name = str(report)
        try:
            data = json.loads(Path(report).read_text())
        except FileNotFoundError:
            raise DatasetError(f"data-check report not found: {report} (write it with `iar2 data check`)") from None
        except (OSError, ValueError) as e:
            raise DatasetError(f"data-check report {report} is unreadable ({type(e).__name__}: {e}); "
                               "rerun `iar2 data check` to rewrite it") from None
    ok = (isinstance(data, dict) and isinstance(data.get("splits"), dict) and isinstance(data.get("classes"), list)
          and isinstance(data.get("bad"), list)
          and all(isinstance(s, dict) and "listing_sha256" in s for s in data["splits"].values())
          and all(isinstance(b, dict) and {"split", "path", "reason"} <= set(b) for b in data["bad"]))
    if not ok:
        raise DatasetError(f"data-check report {name} is malformed (expected classes, splits.<split>.listing_sha256 "
                           "and bad[].split/path/reason); rerun `iar2 data check` to rewrite it")
    return data


def data_digest(root: str | Path, split: str, report: str | Path | None = None) -> str:
    """Content digest of `root/split` for in-job cache keys (iar2/fingerprint.py): the data-check report's
    content fingerprint when a report is given (the check reads every byte once), else every file hashed here."""
    if report is not None:
        info = read_report(report)["splits"].get(split) or {}
        if info.get("content_sha256"):
            return "sha256:" + info["content_sha256"]
    return "sha256:" + tree_digest(split_dir(root, split))


# ----------------------------------------------------------------------------- verification

def _inspect(path: str) -> tuple[str | None, str]:
    """(why the file is unusable or None, sha256 of its bytes): one pass of `iar2 data check` over a file."""
    return verify_image(path), file_digest(path)


def verify_image(path: str | Path) -> str | None:
    """None if the file decodes completely to a non-empty image, else the reason it does not."""
    try:
        with Image.open(path) as im:
            im.load()  # full decode: truncated files fail here, not at open()
            if im.width == 0 or im.height == 0:
                return "empty image (0 pixels)"
    except Exception as e:  # PIL raises many types for broken files; all mean "unusable"
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class ScanResult:
    split: str
    classes: list[str]
    samples: list[tuple[str, int]]  # every listed file (relative path, label)
    bad: dict[str, str] = field(default_factory=dict)  # relative path -> reason
    digests: list[str] = field(default_factory=list)  # sha256 of each listed file's bytes (same order)

    @property
    def good(self) -> list[tuple[str, int]]:
        return [s for s in self.samples if s[0] not in self.bad]

    def summary(self) -> dict:
        per_class = {c: {"good": 0, "bad": 0} for c in self.classes}
        for rel, label in self.samples:
            per_class[self.classes[label]]["bad" if rel in self.bad else "good"] += 1
        return {"num_files": len(self.samples), "num_good": len(self.samples) - len(self.bad),
                "num_bad": len(self.bad), "listing_sha256": listing_fingerprint(self.samples),
                "content_sha256": content_fingerprint(self.samples, self.digests), "per_class": per_class}


def scan_imagefolder(root: str | Path, split: str, workers: int = 0, classes: list[str] | None = None,
                     chunksize: int = 256) -> ScanResult:
    """Decode every image of `root/split` (in `workers` processes; 0 = this process) and sort them into
    good and bad. Use `iar2 data check` to keep the result."""
    classes = classes if classes is not None else find_classes(root, split)
    samples = list_images(root, split, classes)
    base = split_dir(root, split)
    paths = [str(base / rel) for rel, _ in samples]
    bar = tqdm(total=len(paths), desc=f"scan {split}", unit="img", mininterval=1.0)
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            reasons = []
            for r in pool.map(_inspect, paths, chunksize=chunksize):
                reasons.append(r)
                bar.update(1)
    else:
        reasons = []
        for p in paths:
            reasons.append(_inspect(p))
            bar.update(1)
    bar.close()
    bad = {rel: r for (rel, _), (r, _) in zip(samples, reasons) if r is not None}
    log.info("scanned %s/%s: %d images, %d unreadable", root, split, len(samples), len(bad))
    return ScanResult(split, classes, samples, bad, [d for _, d in reasons])


def check_report(root: str | Path, splits: tuple[str, ...] = ("train", "val"), workers: int = 0) -> dict:
    """Scan the splits of `root` and return the JSON-ready report `iar2 data check` writes."""
    classes = find_classes(root, splits[0])
    report = {"root": str(Path(root).resolve()), "classes": classes, "splits": {}, "bad": []}
    for split in splits:
        res = scan_imagefolder(root, split, workers=workers, classes=classes)
        report["splits"][split] = res.summary()
        report["bad"].extend({"split": split, "path": rel, "reason": why} for rel, why in sorted(res.bad.items()))
    return report


# ----------------------------------------------------------------------------- dataset

class ImageFolderDataset(EpochSeeded, torch.utils.data.Dataset):
    """Images of `root/split` as (transform(image), label); bad images excluded.

    transform: called as `transform(pil_rgb_image)`, or `transform(image, generator)` when it has
      `needs_generator = True` (iar2.data.transforms.TrainTransform); the generator is seeded by
      (seed, epoch, index), so augmentation is reproducible with any number of workers. Call
      `set_epoch(e)` each epoch for fresh augmentations. None returns the PIL image.
    report: a JSON report of `iar2 data check` for this root; its bad files are excluded (no decoding).
    verify: decode everything now (`scan_imagefolder`) to find bad files; ignored when a report is given.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 report: str | Path | dict | None = None, verify: bool = False, workers: int = 0,
                 seed: int = 0, classes: list[str] | None = None):
        self.root, self.split, self.transform = Path(root), split, transform
        self.seed, self.epoch = seed, 0
        self.classes = classes if classes is not None else find_classes(root, split)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        listed = list_images(root, split, self.classes)
        if report is not None:
            self.bad_files = self._bad_from_report(report, listed)
            source = f"report {report if not isinstance(report, dict) else '(dict)'}"
        elif verify:
            self.bad_files = scan_imagefolder(root, split, workers=workers, classes=self.classes).bad
            source = "full decode"
        else:
            self.bad_files, source = {}, "not checked (bad files are replaced when met)"
        self.samples = [s for s in listed if s[0] not in self.bad_files]
        if not self.samples:
            raise DatasetError(f"no readable images in {split_dir(root, split)}")
        self.targets = [label for _, label in self.samples]
        log.info("%s/%s: %d images in %d classes; %d unreadable excluded (%s)", root, split, len(self.samples),
                 len(self.classes), len(self.bad_files), source)

    @property
    def num_bad(self) -> int:
        return len(self.bad_files)

    def _bad_from_report(self, report, listed) -> dict[str, str]:
        report = read_report(report)
        split_info = report.get("splits", {}).get(self.split)
        if split_info is None:
            raise DatasetError(f"the check report has no split {self.split!r} (has {sorted(report.get('splits', {}))})")
        if split_info["listing_sha256"] != listing_fingerprint(listed) or report["classes"] != self.classes:
            raise DatasetError(f"the check report does not describe {self.root}/{self.split} as it is now "
                               f"(files or classes changed); rerun `iar2 data check --root {self.root}`")
        return {b["path"]: b["reason"] for b in report["bad"] if b["split"] == self.split}

    def path(self, index: int) -> Path:
        return self.root / self.split / self.samples[index][0]

    def load(self, index: int) -> Image.Image:
        with Image.open(self.path(index)) as im:
            return im.convert("RGB")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} images")  # ends `for x in ds`
        index %= len(self.samples)
        # a file that fails to decode (not in the report) is replaced by the next one, deterministically
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            try:
                img = self.load(i)
                break
            except Exception as e:
                log.warning("skipping unreadable image %s: %s: %s", self.path(i), type(e).__name__, e)
        else:
            raise DatasetError(f"no readable images in {self.root / self.split}")
        label = self.samples[i][1]
        if self.transform is None:
            return img, label
        if getattr(self.transform, "needs_generator", False):
            return self.transform(img, self.generator(index)), label
        return self.transform(img), label


# ----------------------------------------------------------------------------- CLI: iar2 data check

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="ImageFolder root holding <split>/<class>/<images>")
    p.add_argument("--out", required=True, help="JSON report to write (pass it to the dataset as `report`)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to scan (default: train val)")
    p.add_argument("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (0: in this process)")
    p.add_argument("--classes-out", default=None, help="also write the class index (classes.json) here")


def run(args: argparse.Namespace) -> int:
    try:
        report = check_report(args.root, tuple(args.splits), workers=args.workers)
        if args.classes_out:
            write_class_index(args.root, args.classes_out, split=args.splits[0])
    except DatasetError as e:
        print(f"iar2: {e}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, report)
    for split, s in report["splits"].items():
        log.info("%s: %d files, %d good, %d bad", split, s["num_files"], s["num_good"], s["num_bad"])
    log.info("report written to %s", args.out)
    return 0
