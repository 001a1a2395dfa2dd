"""Classifier-scored reject sampling (the "-re" rows of Table 2; the paper's FID 1.50 for IAR2-XXL).

The paper gives no rule, and the released code has none. Ours, documented and configurable:
draw `factor` x per_class candidates for every class, score each candidate by the classifier's
probability of its own class, and keep the `per_class` best of each class (ties by sample index).
This is the usual top-1/factor acceptance of LlamaGen-era "-re" results. Classifiers: the domain
reference network (offline scales) or torchvision's ImageNet ResNet-50 (paper scale; local weights
file, see `iar2 fetch-weights`), both in the standard ImageNet class order.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from iar2.checkpoint import safe_torch_load
from iar2.refnet import load_refnet
from iar2.weights import find_weight


class Scorer:
    """p(label | image) for uint8 images (B, H, W, 3)."""

    def __init__(self, kind: str, domain_net: str | None = None, weights_dir: str | None = None, device="cpu"):
        self.kind, self.device = kind, torch.device(device)
        if kind == "domain":
            if not domain_net:
                raise FileNotFoundError("reject.classifier 'domain' needs reject.domain_net (`iar2 refnet train`)")
            self.net = load_refnet(domain_net, self.device)
        elif kind == "resnet50":
            import torchvision  # only for this classifier: a slow import

            self.net = torchvision.models.resnet50()
            path = find_weight("resnet50", weights_dir)
            self.net.load_state_dict(safe_torch_load(path))
            self.net = self.net.to(self.device).eval()
        else:
            raise ValueError(f"reject.classifier: {kind!r}; allowed values: 'domain', 'resnet50'")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self.device)
        if self.kind == "domain":
            logits = self.net(x.float() / 127.5 - 1.0)
        else:  # torchvision ImageNet preprocessing at 224 px
            x = F.interpolate(x.float() / 255.0, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
            logits = self.net((x - mean) / std)
        return logits.float().softmax(-1).gather(1, labels.to(self.device)[:, None])[:, 0].cpu()


def select(scores: np.ndarray, labels: np.ndarray, indices: np.ndarray, per_class: int) -> np.ndarray:
    """Positions of the kept candidates: the per_class highest scores of each class, in (class, index) order."""
    keep = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        order = np.lexsort((indices[pos], -scores[pos]))  # score descending, then index ascending
        keep.append(np.sort(pos[order[:per_class]]))
    return np.concatenate(keep)
