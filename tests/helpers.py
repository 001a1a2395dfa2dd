"""Builders shared by several test modules: a tiny VQ tokenizer, random images, tokenizer-run configs, token sets
and AR run configs.

Test modules import them with `from helpers import ...` (tests/ is on sys.path under pytest's rootdir import mode).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from iar2.ar.config import ARRunConfig
from iar2.checkpoint import save_weights
from iar2.config import deep_merge, from_dict, to_dict
from iar2.tokenizer.config import TokenizerRunConfig, VQModelConfig
from iar2.tokenizer.vq_model import VQModel

# A VQ small enough for CPU tests: downsample 4 (16 px -> 4x4 tokens), codebooks of 64 (single) or 16 + 64 (dual).
TINY_VQ = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=8, norm_groups=4,
               codebook_size=64, semantic_size=16, detail_size=64)


def tiny_vq(quantizer: str = "single", seed: int = 0, spread: bool = True) -> VQModel:
    """A seeded tiny VQModel in eval mode. spread: redraw the code rows as N(0, 0.5^2) (raw, unnormalised rows, as
    stored in released checkpoints); the default init puts the codes very close together."""
    torch.manual_seed(seed)
    model = VQModel(VQModelConfig(**TINY_VQ, quantizer=quantizer)).eval()
    if spread:
        with torch.no_grad():
            for p in model.quantize.parameters():
                p.copy_(torch.randn(p.shape) * 0.5)
    return model


def save_tiny_vq(path, quantizer: str = "semantic_detail", seed: int = 0, image_size: int | None = None):
    """Write a freshly initialised (not spread) tiny VQ as a weights file with its model config; returns path."""
    model = tiny_vq(quantizer, seed, spread=False)
    meta = {"model_config": to_dict(model.cfg)}
    if image_size is not None:
        meta["image_size"] = image_size
    save_weights(path, model.state_dict(), meta)
    return path


def random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n uniform-noise RGB images in [-1, 1], (n, 3, size, size), from their own seeded generator."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_cfg(root, base: dict | None = None, **sections) -> TokenizerRunConfig:
    """A tokenizer-training run on the tiny VQ at 16 px on the CPU, discriminator off, no perceptual loss.
    base: the calling module's own defaults merged over these; sections: one test's overrides, merged last."""
    common = {"data": {"root": str(root), "image_size": 16},
              "model": dict(TINY_VQ),
              "loss": {"perceptual": "none", "disc_start": 10**6, "disc_layers": 2, "disc_ndf": 8},
              "train": {"batch_size": 8, "device": "cpu"}}
    return from_dict(TokenizerRunConfig, deep_merge(deep_merge(common, base or {}), sections))


def make_tokens(root, n=8, grid=4, vocab=(6, 10), num_classes=4, num_aug=2, seed=0):
    """A token set in the `iar2 tokenize` layout: codes[image, aug, level, cell] + labels + meta.json."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    codes = np.stack([rng.integers(0, v, size=(n, num_aug, grid * grid)) for v in vocab], axis=2).astype(np.uint16)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    np.save(root / "codes.npy", codes)
    np.save(root / "labels.npy", labels)
    meta = {"codes_file": "codes.npy", "labels_file": "labels.npy", "shape": list(codes.shape), "grid": [grid, grid],
            "vocab_sizes": list(vocab), "num_classes": num_classes, "augmentations": [f"a{i}" for i in range(num_aug)]}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def run_config(tokens, paradigm="fused_hierarchical", vocab=(6, 10), **train_kw):
    model = dict(dim=32, n_layer=2, n_head=2, paradigm=paradigm, head_layers=1, grid=4, num_classes=4,
                 class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    if paradigm == "single":
        model["vocab_size"] = vocab[0]
    else:
        model["semantic_size"], model["detail_size"] = vocab
    train_cfg = dict(tokens=str(tokens), steps=12, batch_size=4, lr=3e-3, precision="fp32", device="cpu",
                     log_every=4, ckpt_every=1000, seed=0)
    train_cfg.update(train_kw)
    return from_dict(ARRunConfig, {"name": "t", "model": model, "train": train_cfg})


def load_script(name: str):
    """A module from workflow/scripts/ (they are scripts, not a package), loaded fresh for each test."""
    path = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
