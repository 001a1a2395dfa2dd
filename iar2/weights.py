"""Pretrained weight files the pipeline can use, where they are looked for, and `iar2 fetch-weights`.

Nothing here is downloaded implicitly: code that needs a file calls `find_weight`, which raises
FileNotFoundError naming the file, the folders searched and the command that fetches it. The search
order is: an explicit `weights_dir`, then `$TORCH_HOME/hub/checkpoints`, then
`~/.cache/torch/hub/checkpoints` (torch hub's own cache, where torchvision and torch-fidelity put them).

Each file name carries the first 8 hex digits of its sha256 (torch hub convention); downloads are
checked against it before they are renamed into place.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from iar2.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    name: str  # registry key
    filename: str
    url: str
    sha256_prefix: str
    used_for: str


REGISTRY: dict[str, WeightFile] = {w.name: w for w in (
    WeightFile("inception", "weights-inception-2015-12-05-6726825d.pth",
               "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth", "6726825d",
               "FID / IS / precision-recall (torch-fidelity's InceptionV3, `feature_extractor_weights_path`)"),
    WeightFile("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
               "397923af", "the VGG16 trunk of LPIPS-VGG (perceptual loss and LPIPS metric)"),
    WeightFile("resnet50", "resnet50-11ad3fa6.pth", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
               "11ad3fa6", "the ImageNet classifier that scores samples for reject sampling (paper scale)"),
)}


def torch_home() -> Path:
    """$TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch (torch hub's rule)."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch"


def search_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    dirs = []
    if weights_dir:
        dirs.append(Path(weights_dir).expanduser())
    dirs.append(torch_home() / "hub" / "checkpoints")
    dirs.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    out: list[Path] = []
    for d in dirs:  # keep order, drop duplicates
        if d not in out:
            out.append(d)
    return out


def find_weight(name: str, weights_dir: str | Path | None = None) -> Path:
    """Path of registered weight file `name` ("inception", "vgg16"); FileNotFoundError if absent."""
    if name not in REGISTRY:
        raise KeyError(f"unknown weight file {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    w = REGISTRY[name]
    dirs = search_dirs(weights_dir)
    for d in dirs:
        if (d / w.filename).is_file():
            return d / w.filename
    raise FileNotFoundError(
        f"pretrained weights {w.filename} ({w.used_for}) not found; looked in: "
        + ", ".join(str(d) for d in dirs)
        + f". Fetch it with `iar2 fetch-weights --only {name}` (needs internet) or copy it into one of these folders "
          f"(source: {w.url})")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(w: WeightFile, dest_dir: Path) -> Path:
    """Download `w` into dest_dir atomically, checking its sha256 prefix."""
    final = dest_dir / w.filename
    log.info("downloading %s -> %s", w.url, final)
    with atomic_path(final) as tmp:
        with urllib.request.urlopen(w.url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=w.filename) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        digest = sha256_file(tmp)
        if not digest.startswith(w.sha256_prefix):
            raise OSError(f"{w.url}: sha256 {digest[:16]}... does not start with {w.sha256_prefix}; not saved")
    return final


# ----------------------------------------------------------------------------- CLI: iar2 fetch-weights

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None,
                   help="folder to store the files in (default: $TORCH_HOME/hub/checkpoints, where they are found)")
    p.add_argument("--only", nargs="+", choices=sorted(REGISTRY), default=None, help="fetch only these files")
    p.add_argument("--force", action="store_true", help="download even if the file is already present")


def run(args: argparse.Namespace) -> int:
    dest = Path(args.dir).expanduser() if args.dir else torch_home() / "hub" / "checkpoints"
    for name in args.only or sorted(REGISTRY):
        w = REGISTRY[name]
        if not args.force:
            try:
                log.info("%s already present: %s", name, find_weight(name, args.dir))
                continue
            except FileNotFoundError:
                pass
        download(w, dest)
    return 0
