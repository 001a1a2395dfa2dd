"""PatchGAN discriminator and hinge losses (the adversarial part of the LlamaGen VQ recipe).

A stack of 4x4 convolutions: the first n_layers halve the resolution (the widths double from
ndf up to 8*ndf), then one stride-1 block and a stride-1 projection to one logit per patch.
BatchNorm after every convolution except the first and the last; LeakyReLU(0.2).
The output is a map of logits, each judging one receptive-field patch of the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            # no conv bias: BatchNorm's shift replaces it
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GAN convention (DCGAN): conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), shifts zero
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def min_image_size(n_layers: int) -> int:
        """Smallest input side that still leaves one output logit."""
        # each 4x4/p1 stride-1 conv takes one pixel off; n_layers stride-2 convs halve
        return 2 ** n_layers * 3


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: real logits pushed above +1, fake below -1 (averaged halves)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()
