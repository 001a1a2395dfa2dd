"""The domain reference network ("RefNet"): a small ResNet classifier trained on the dataset itself.

Offline there are no ImageNet-pretrained Inception or VGG weights, so the pipeline trains its own
reference network on the train split and uses it where the paper uses pretrained networks:
its pooled features for FID / precision / recall (and rFID), its logits for the Inception Score,
and its intermediate feature maps for an LPIPS-style perceptual distance (iar2.perceptual, "domain").
Numbers measured with it are comparable only with other numbers measured with the same checkpoint.

Inputs: float (B, 3, H, W) in [-1, 1], or uint8 (B, 3, H, W) in [0, 255] (mapped by u / 127.5 - 1,
as the data pipeline maps images). `forward` and `pool_features` resize to `input_size` (bilinear,
antialiased) like Inception resizes to 299, so features do not depend on the image resolution;
`feature_maps` runs at the native resolution by default (the net is fully convolutional), as LPIPS
runs VGG at the image's own size.

Architecture: a 3x3 stem, then one stage per width; a stage is `blocks` residual basic blocks (two 3x3
convs, GroupNorm, ReLU), the first of each stage after the stem downsampling by 2. GroupNorm instead of
BatchNorm keeps train and eval behaviour identical and each sample independent of its batch.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from iar2.checkpoint import check_finite, load_meta, load_weights, save_weights
from iar2.cli import add_config_arguments, load_run_config
from iar2.config import ConfigError, from_dict, to_dict
from iar2.distributed import DistInfo
from iar2.training import Job, Loop, NonFiniteGuard, grad_norm

log = logging.getLogger(__name__)


@dataclass
class RefNetConfig:
    num_classes: int = field(default=10, metadata={"min": 2})
    input_size: int = field(default=64, metadata={"min": 8})  # resolution of forward / pool_features
    widths: tuple[int, ...] = (16, 32, 64, 128)  # one stage per width; 3 downsamplings for 4 stages
    blocks: int = field(default=1, metadata={"min": 1})  # residual blocks per stage
    norm_groups: int = field(default=8, metadata={"min": 1})

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not self.widths:
            raise ConfigError(f"{p}widths: needs at least one stage")
        for w in self.widths:
            if w % self.norm_groups:
                raise ConfigError(f"{p}norm_groups: {self.norm_groups} must divide every width (got {list(self.widths)})")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity: stable from step 0
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.skip(x))


class RefNet(nn.Module):
    def __init__(self, cfg: RefNetConfig):
        super().__init__()
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.GroupNorm(cfg.norm_groups, w0), nn.ReLU())
        stages, cin = [], w0
        for i, w in enumerate(cfg.widths):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2, cfg.norm_groups)]
            blocks += [BasicBlock(w, w, 1, cfg.norm_groups) for _ in range(cfg.blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, cfg.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.cfg.widths[-1]

    def prepare(self, x: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """uint8 [0,255] or float [-1,1] (B,3,H,W) -> float [-1,1], resized to input_size if asked."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"RefNet expects (B, 3, H, W) images, got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        x = x.to(self.head.weight.dtype)
        s = self.cfg.input_size
        if resize and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(x)
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def feature_maps(self, x: torch.Tensor, resize: bool = False) -> list[torch.Tensor]:
        """The output of every stage (post-ReLU), highest resolution first: the layers of the LPIPS formula."""
        return self._trunk(self.prepare(x, resize))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, widths[-1]) global-average-pooled last stage: the features for FID / precision / recall."""
        return self._trunk(self.prepare(x))[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.head(self.pool_features(x))


def load_refnet(path: str | Path, device: str | torch.device = "cpu") -> RefNet:
    """A trained RefNet (eval mode, frozen) from `refnet.safetensors` + `refnet.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference network not found: {path} (train it with `iar2 refnet train "
                                f"--data DATA --out {path}`)")
    meta = load_meta(path)
    net = RefNet(from_dict(RefNetConfig, meta["model_config"], "model_config"))
    net.load_state_dict(load_weights(path, device))
    return net.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def evaluate_accuracy(net: RefNet, dataset, batch_size: int = 256, num_workers: int = 0) -> float:
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct = total = 0
    for x, y in loader:
        correct += (net(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(total, 1)


class RefNetSteps(Job):
    """One training step of the reference network for the shared loop (iar2/training.py): cross-entropy with label
    smoothing, AdamW, the LR schedule stepped every step. It trains in one go, without checkpoints."""

    progress_keys = ("loss", "train_acc")

    def __init__(self, net: RefNet, opt: torch.optim.Optimizer, sched, label_smoothing: float):
        self.net, self.opt, self.sched, self.label_smoothing = net, opt, sched, label_smoothing
        # nothing to resume from: a non-finite step stops the run, naming the step
        self.guard = NonFiniteGuard(0, what="refnet train")
        self.guard.last_checkpoint = "none (the reference network trains in one go; rerun the job)"
        self.loss, self.correct, self.seen = math.nan, 0, 0

    def train_step(self, step: int, micro: list) -> None:
        (x, y), = micro
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.guard.allow(step + 1, float(loss.detach()), "loss") and \
                self.guard.allow(step + 1, grad_norm(self.net.parameters())):
            self.opt.step()
        self.sched.step()
        self.loss = loss.item()
        self.correct += (logits.argmax(1) == y).sum().item()
        self.seen += y.numel()

    def pop_metrics(self, step: int, steps_per_s: float) -> dict[str, float]:
        out = {"loss": self.loss, "train_acc": self.correct / self.seen}
        self.correct = self.seen = 0
        return out


def train_refnet(data_root: str | Path, out: str | Path, steps: int = 2000, seed: int = 0,
                 batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05,
                 input_size: int = 64, widths: tuple[int, ...] = (16, 32, 64, 128), blocks: int = 1,
                 norm_groups: int = 8, crop_min: float = 0.6, label_smoothing: float = 0.1,
                 num_workers: int = 0, report: str | Path | None = None) -> dict:
    """Train a RefNet on data_root/train, measure val accuracy, save weights + metadata to `out`.

    AdamW with linear warmup and cosine decay, cross-entropy with label smoothing, random crops
    (crop_min..1 of the short side) and flips. A function of (data, arguments, seed)."""
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import eval_transform, train_transform

    torch.manual_seed(seed)  # parameter init
    train_ds = ImageFolderDataset(data_root, "train", train_transform(input_size, crop_min, True),
                                  report=report, seed=seed)
    val_ds = ImageFolderDataset(data_root, "val", eval_transform(input_size), report=report,
                                classes=train_ds.classes)
    cfg = RefNetConfig(num_classes=len(train_ds.classes), input_size=input_size, widths=tuple(widths),
                       blocks=blocks, norm_groups=norm_groups)
    cfg.validate()
    net = RefNet(cfg)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batch_size = min(batch_size, len(train_ds))
    order = torch.Generator().manual_seed(seed)  # shuffling, one permutation per epoch

    def batches():
        epoch = 0
        while True:
            train_ds.set_epoch(epoch)
            perm = torch.randperm(len(train_ds), generator=order).tolist()
            loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, sampler=perm,
                                                 num_workers=num_workers, drop_last=True)
            yield from loader
            epoch += 1

    log.info("training RefNet %s on %s: %d steps, batch %d, %d params", cfg, data_root, steps, batch_size,
             sum(p.numel() for p in net.parameters()))
    net.train()
    t0 = time.time()
    Loop(RefNetSteps(net, opt, sched, label_smoothing), DistInfo(), desc="refnet", log_every=50).run(batches(), steps)
    train_time = time.time() - t0
    val_acc = evaluate_accuracy(net, val_ds)
    meta = {"model_config": to_dict(cfg), "classes": train_ds.classes, "val_accuracy": val_acc,
            "chance_accuracy": 1.0 / cfg.num_classes, "steps": steps, "seed": seed, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "crop_min": crop_min, "label_smoothing": label_smoothing,
            "data_root": str(data_root), "num_train": len(train_ds), "num_val": len(val_ds),
            "train_seconds": round(train_time, 2),
            "input": "float [-1,1] or uint8 [0,255], (B,3,H,W); resized to input_size for logits/pool features"}
    check_finite(net.state_dict(), f"refnet weights after {steps} steps")
    save_weights(out, net.state_dict(), meta)
    log.info("RefNet val accuracy %.4f (chance %.4f) after %d steps (%.1f s); saved %s",
             val_acc, 1.0 / cfg.num_classes, steps, train_time, out)
    return meta


# ----------------------------------------------------------------------------- CLI: iar2 refnet train

@dataclass
class RefNetRunConfig:
    """Settings of `iar2 refnet train`: a --config file or the flags of the same names (iar2.cli)."""
    steps: int = field(default=2000, metadata={"min": 1, "help": "optimisation steps"})
    seed: int = field(default=0, metadata={"min": 0, "help": "random seed (init, shuffling, augmentation)"})
    batch_size: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=2e-3, metadata={"gt": 0.0, "help": "AdamW peak learning rate (warmup, cosine decay)"})
    weight_decay: float = field(default=0.05, metadata={"min": 0.0})
    input_size: int = field(default=64, metadata={"min": 1, "help": "resolution the network sees"})
    widths: tuple[int, ...] = field(default=(16, 32, 64, 128), metadata={"min": 1, "help": "channels per stage"})
    blocks: int = field(default=1, metadata={"min": 1, "help": "residual blocks per stage"})
    crop_min: float = field(default=0.6, metadata={"gt": 0.0, "max": 1.0,
                                                   "help": "random-crop fraction of the short side (min)"})
    workers: int = field(default=0, metadata={"min": 0, "help": "DataLoader workers"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", required=True, help="output weights (.safetensors; metadata .json beside it)")
    p.add_argument("--report", default=None, help="`iar2 data check` report (bad files excluded)")
    add_config_arguments(p, RefNetRunConfig)


def run(args: argparse.Namespace) -> int:
    if not str(args.out).endswith(".safetensors"):
        print(f"iar2: --out must end with .safetensors (got {args.out})", file=sys.stderr)
        return 2
    cfg = load_run_config(RefNetRunConfig, args)
    train_refnet(args.data, args.out, steps=cfg.steps, seed=cfg.seed, batch_size=cfg.batch_size, lr=cfg.lr,
                 weight_decay=cfg.weight_decay, input_size=cfg.input_size, widths=tuple(cfg.widths),
                 blocks=cfg.blocks, crop_min=cfg.crop_min, num_workers=cfg.workers, report=args.report)
    return 0
