"""Perceptual distances for the tokenizer loss and the LPIPS metric: LPIPS-VGG or the domain variant.

- "lpips_vgg": the `lpips` package's LPIPS(net="vgg") with the linear-layer weights it ships, on the
  torchvision ImageNet VGG16 trunk read from the local file `vgg16-397923af.pth` (iar2.weights). The
  lpips/torchvision constructors would download that file when it is missing; here the model is built
  with a random trunk (`pnet_rand=True`) and the weights are loaded from disk, or a FileNotFoundError
  says where to put them. Nothing is ever downloaded.
- "domain": the LPIPS formula over the feature maps of the reference network trained on the dataset
  (iar2.refnet): per layer, unit-normalise each position's channel vector, take the squared difference,
  sum over channels with uniform weights (LPIPS's "baseline" variant: there is no human-judgement data
  here to fit channel weights), average over positions; sum over layers.
- "none": no perceptual term (None).

Both modules are frozen and stay in eval mode (a parent's .train() cannot switch on LPIPS's dropout);
gradients flow to the inputs. Inputs: float (B, 3, H, W) in [-1, 1]. Output: (B,) distances.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from iar2.checkpoint import safe_torch_load
from iar2.refnet import load_refnet
from iar2.weights import find_weight

log = logging.getLogger(__name__)

# torchvision vgg16().features indices -> lpips.pretrained_networks.vgg16 slices (relu1_2 ... relu5_3)
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


class FrozenDistance(nn.Module):
    """A perceptual distance whose parameters never train and whose mode is always eval."""

    def freeze(self) -> "FrozenDistance":
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "FrozenDistance":
        return super().train(False)


def vgg_trunk_state(vgg_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG16 state dict (full or features-only) -> keys of lpips' `net` (its VGG slices)."""
    out = {}
    for s, idxs in _VGG_SLICES:
        for i in idxs:
            for p in ("weight", "bias"):
                key = f"features.{i}.{p}"
                if key in vgg_state:
                    out[f"slice{s}.{i}.{p}"] = vgg_state[key]
    return out


class LPIPSVGG(FrozenDistance):
    """LPIPS-VGG (lpips 0.1.4, v0.1 linear weights) on a locally loaded ImageNet VGG16 trunk."""

    def __init__(self, weights_dir: str | Path | None = None):
        super().__init__()
        import lpips

        vgg_path = find_weight("vgg16", weights_dir)  # FileNotFoundError names the file, folders and command
        # pretrained=False / pnet_rand=True: lpips neither loads nor downloads anything; we load both parts below
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        trunk = vgg_trunk_state(safe_torch_load(vgg_path))
        missing = sorted(set(self.lpips.net.state_dict()) - set(trunk))
        if missing:
            raise ValueError(f"{vgg_path} is not a torchvision VGG16 state dict (missing {missing[:4]}...)")
        self.lpips.net.load_state_dict(trunk)
        lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        if not lin_path.is_file():
            raise FileNotFoundError(f"LPIPS linear weights not found: {lin_path} (reinstall lpips==0.1.4)")
        lins = safe_torch_load(lin_path)
        self.lpips.lins.load_state_dict({k[len("lin"):]: v for k, v in lins.items()
                                         if k.startswith("lin")}, strict=True)
        log.info("LPIPS-VGG: trunk from %s, linear layers from %s", vgg_path, lin_path)
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y).flatten()


def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each position's channel vector by its L2 norm (LPIPS's normalize_tensor)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class DomainLPIPS(FrozenDistance):
    """The LPIPS formula (uniform channel weights) over RefNet.feature_maps at the input's resolution."""

    def __init__(self, refnet: nn.Module):
        super().__init__()
        self.net = refnet
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        maps = self.net.feature_maps(torch.cat([x, y]))  # one pass for both images
        d = x.new_zeros(b)
        for f in maps:
            fx, fy = unit_normalize(f[:b]), unit_normalize(f[b:])
            d = d + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        return d


def build_perceptual(kind: str, domain_net: str | Path | nn.Module | None = None,
                     weights_dir: str | Path | None = None) -> nn.Module | None:
    """"lpips_vgg" | "domain" (domain_net: a RefNet or its .safetensors path) | "none" -> frozen module or None."""
    if kind == "none":
        return None
    if kind == "lpips_vgg":
        return LPIPSVGG(weights_dir)
    if kind == "domain":
        if domain_net is None:
            raise ValueError("perceptual 'domain' needs domain_net: a RefNet checkpoint from `iar2 refnet train`")
        if not isinstance(domain_net, nn.Module):
            domain_net = load_refnet(domain_net)
        return DomainLPIPS(domain_net)
    raise ValueError(f"perceptual kind {kind!r} is not allowed; allowed values: 'lpips_vgg', 'domain', 'none'")
