"""Image transforms of the ADM / LlamaGen recipes, returning float tensors in [-1, 1], CHW.

- `center_crop_arr` (evaluation, tokenization): halve the image with a BOX filter while its short
  side is at least twice the target (cheap, alias-free downsampling), BICUBIC-resize so the short side
  equals `size`, then take the centre square. This is the crop the ADM evaluation protocol and
  LlamaGen use for ImageNet at 256 or 384 px.
- `random_crop_arr` (tokenizer training): the same, but the short side is first resized to a random
  length in [size / max_frac, size / min_frac] and the square is taken at a random position, so a crop
  covers between min_frac and max_frac of the short side (LlamaGen trains the tokenizer with 0.8-1.0),
  followed by a random horizontal flip.

Randomness is explicit: random transforms take a `torch.Generator`. `ImageFolderDataset` hands each
sample a generator seeded by (seed, epoch, index), so augmentations do not depend on the number of
DataLoader workers or the order in which they fetch samples.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample: a function of (seed, epoch, index) only, so a draw does not depend on the number
    of DataLoader workers or the order in which they fetch samples."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochSeeded:
    """Mixin of the datasets that draw per-sample randomness (ImageFolderDataset, TokenDataset): `generator(index)`
    from (self.seed, self.epoch, index). Call `set_epoch` each epoch for fresh draws."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        return sample_generator(self.seed, self.epoch, index)


def _box_halve(img: Image.Image, target_short: int) -> Image.Image:
    # successive 2x BOX reductions while the image is at least twice the target: each is an exact
    # average of 2x2 blocks, so the final bicubic step never has to shrink by more than 2x
    while min(img.size) >= 2 * target_short:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    return img


def _resize_short(img: Image.Image, short: int) -> Image.Image:
    img = _box_halve(img, short)
    scale = short / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: uint8 array (size, size, 3) from an RGB PIL image."""
    arr = np.asarray(_resize_short(img.convert("RGB"), size))
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def random_crop_arr(img: Image.Image, size: int, min_frac: float = 0.8, max_frac: float = 1.0,
                    generator: torch.Generator | None = None) -> np.ndarray:
    """Random crop covering min_frac..max_frac of the short side: uint8 array (size, size, 3)."""
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"crop fractions must satisfy 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    short = _randint(math.ceil(size / max_frac), math.ceil(size / min_frac), generator)
    arr = np.asarray(_resize_short(img.convert("RGB"), short))
    top = _randint(0, arr.shape[0] - size, generator)
    left = _randint(0, arr.shape[1] - size, generator)
    return arr[top:top + size, left:left + size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1] (x / 127.5 - 1, as LlamaGen's Normalize(0.5, 0.5))."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # copy: PIL arrays are read-only
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 with LlamaGen's rounding (clamp(127.5 x + 128, 0, 255))."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


class EvalTransform:
    """Deterministic: ADM centre crop at `size`, then [-1, 1] CHW."""

    needs_generator = False

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_tensor(center_crop_arr(img, self.size))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


class TrainTransform:
    """Random crop (crop_min..1 of the short side) + optional horizontal flip, then [-1, 1] CHW.

    Call as `t(img, generator)`; without a generator torch's global RNG is used (which DataLoader seeds
    per worker), so prefer the dataset's per-sample generators for reproducible runs."""

    needs_generator = True

    def __init__(self, size: int, crop_min: float = 0.8, flip: bool = True):
        self.size, self.crop_min, self.flip = size, crop_min, flip

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        arr = random_crop_arr(img, self.size, self.crop_min, 1.0, generator)
        if self.flip and torch.rand((), generator=generator).item() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr)

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, crop_min={self.crop_min}, flip={self.flip})"


def eval_transform(size: int) -> EvalTransform:
    return EvalTransform(size)


def train_transform(size: int, crop_min: float = 0.8, flip: bool = True) -> TrainTransform:
    return TrainTransform(size, crop_min, flip)
