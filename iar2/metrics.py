"""Image-quality metrics shared by reconstruction (rFID, PSNR, SSIM) and generation (gFID, IS, precision/recall).

Conventions
- Images are compared as uint8 (B, 3, H, W): model outputs in [-1, 1] are quantised exactly as the saved
  PNGs would be (`to_uint8`), so the numbers are those of the images a user can look at.
- PSNR: per image over all pixels and channels with peak 255, then the mean over images.
- SSIM: Wang et al. (Gaussian window 11x11, sigma 1.5, population covariance, K1=0.01, K2=0.03) with data
  range 255, per channel, averaged over the valid region and the channels (skimage's `channel_axis`
  handling). `SSIM_LLAMAGEN` reproduces the protocol behind the SSIM column of LlamaGen / IAR2 tables
  (skimage defaults: 7x7 uniform window, sample covariance, and data_range=2.0 on [0, 1] images, i.e.
  510 on the uint8 scale); it reads higher than the standard SSIM.
- FID / IS / precision-recall come from torch-fidelity 0.4.0 with one of two feature extractors:
  "inception": torch-fidelity's `inception-v3-compat` (the TF-Inception port every paper uses) with weights
  from a local file (no download here: `iar2 fetch-weights`);
  "domain": the project's reference network (iar2.refnet.RefNet) trained on the dataset itself, for the
  offline pipeline. Its numbers are not comparable to published FIDs, and every result says which it is.
- Inputs to torch-fidelity are Datasets of uint8 3xHxW tensors (`UInt8ImageDataset`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from iar2.checkpoint import safe_torch_load
from iar2.distributed import pick_device
from iar2.refnet import load_refnet
from iar2.weights import find_weight

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's registry name
DOMAIN_NAME = "iar2-refnet"  # our RefNet wrapper, registered on first use
ISC_SPLIT_SIZE = 5000  # ADM's evaluator splits IS into chunks of 5000 samples

# The SSIM protocol of LlamaGen's reconstruction script (see module doc); pass as **SSIM_LLAMAGEN.
SSIM_LLAMAGEN = {"window": "uniform", "data_range": 510.0}


# ----------------------------------------------------------------------------- pixel metrics

def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounding to nearest (127.5x + 128, truncated): the saved-PNG values.

    Images that came from uint8 through ToTensor + Normalize(0.5, 0.5) map back to their exact bytes.
    """
    return torch.clamp(127.5 * x.detach().float() + 128.0, 0, 255).to(torch.uint8)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,) float64; inf for identical images. Inputs uint8 (or floats on that scale)."""
    _check_pair(x, y)
    diff = x.to(torch.float64) - y.to(torch.float64)
    mse = diff.pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)  # mse 0 -> inf


def _ssim_window(kind: str, channels: int, device) -> tuple[torch.Tensor, bool]:
    """Depthwise 2-D window (C, 1, k, k) in float64 and whether covariances use the N-1 normalisation."""
    if kind == "gaussian":
        sigma, radius = 1.5, 5  # scipy's truncate=3.5 gives radius int(3.5 * 1.5 + 0.5) = 5 -> 11 taps
        t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        g = g / g.sum()
        w, sample_cov = torch.outer(g, g), False
    elif kind == "uniform":
        w, sample_cov = torch.full((7, 7), 1.0 / 49, dtype=torch.float64, device=device), True
    else:
        raise ValueError(f"SSIM window {kind!r}: allowed values: 'gaussian', 'uniform'")
    return w.expand(channels, 1, *w.shape).contiguous(), sample_cov


def ssim(x: torch.Tensor, y: torch.Tensor, window: str = "gaussian", data_range: float = 255.0) -> torch.Tensor:
    """Per-image SSIM, (B,) float64, for uint8 (or 0..255-scale) batches (B, C, H, W).

    Local statistics come from a depthwise convolution over the valid region only (skimage computes the
    full map and then crops the window radius, which is the same set of pixels); the result is the mean
    over that region and over channels.
    """
    _check_pair(x, y)
    c = x.shape[1]
    w, sample_cov = _ssim_window(window, c, x.device)
    if min(x.shape[-2:]) < w.shape[-1]:
        raise ValueError(f"SSIM needs images of at least {w.shape[-1]} px, got {tuple(x.shape[-2:])}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    # one conv for the five local moments: stack them along the channel axis
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    mom = F.conv2d(maps, w.repeat(5, 1, 1, 1), groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = mom.split(c, dim=1)
    n = w.shape[-1] * w.shape[-2]
    norm = n / (n - 1) if sample_cov else 1.0
    var_x = norm * (e_xx - mu_x * mu_x)
    var_y = norm * (e_yy - mu_y * mu_y)
    cov = norm * (e_xy - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


# ----------------------------------------------------------------------------- Frechet distance

def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features in float64 (sigma with the N-1 normalisation, as np.cov)."""
    f = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    f = f.astype(np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) for Gaussians (e.g. ADM reference .npz stats).

    tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2); the inner matrix is symmetric PSD, so a symmetric
    eigendecomposition gives it stably even for the singular covariances of small sample sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    ev1, vec1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vec1 * np.sqrt(np.clip(ev1, 0, None))) @ vec1.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a reference batch .npz holding arrays 'mu' and 'sigma' (ADM's evaluator format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        missing = {"mu", "sigma"} - set(z.files)
        if missing:
            raise KeyError(f"{path}: no {sorted(missing)} arrays (has {z.files})")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


# ----------------------------------------------------------------------------- torch-fidelity inputs

class UInt8ImageDataset(Dataset):
    """A stack of uint8 images (N, 3, H, W) as torch-fidelity wants them: item i -> uint8 (3, H, W)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ----------------------------------------------------------------------------- feature extractors

def _domain_extractor_class():
    """Build (once) and register the torch-fidelity wrapper of the reference network."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DOMAIN_NAME in FEATURE_EXTRACTORS_REGISTRY:
        return FEATURE_EXTRACTORS_REGISTRY[DOMAIN_NAME]

    class RefNetFeatureExtractor(FeatureExtractorBase):
        """RefNet features for torch-fidelity: 'pool' (FID, KID, precision/recall) and 'logits' (IS).

        torch-fidelity constructs it by name, passing the RefNet checkpoint as
        `feature_extractor_weights_path`. Input: uint8 (B, 3, H, W), mapped to [-1, 1] as the data
        pipeline does (u / 127.5 - 1).
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise FileNotFoundError("the domain feature extractor needs a reference network checkpoint "
                                        "(train one with `iar2 refnet train`)")
            self.net = load_refnet(feature_extractor_weights_path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return ("pool", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "pool"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            x = x.float() / 127.5 - 1.0
            pool = self.net.pool_features(x)  # the logits are the head on these: one trunk pass serves both
            out = {"pool": pool.float(), "logits": self.net.head(pool).float()}
            return tuple(out[k] for k in self.features_list)

    torch_fidelity.register_feature_extractor(DOMAIN_NAME, RefNetFeatureExtractor)
    return RefNetFeatureExtractor


@dataclass(frozen=True)
class Extractor:
    """A resolved feature extractor: torch-fidelity name, weight file and the layer used per metric."""
    kind: str  # "inception" | "domain"
    name: str  # torch-fidelity registry name
    weights_path: str
    layer_fid: str
    layer_isc: str
    layer_prc: str

    def describe(self) -> dict:
        return {"extractor": self.kind, "extractor_name": self.name, "extractor_weights": self.weights_path,
                "feature_layer_fid": self.layer_fid, "feature_layer_isc": self.layer_isc,
                "feature_layer_prc": self.layer_prc}


def inception_weights_path(weights_dir: str | Path | None = None) -> Path:
    """The local torch-fidelity Inception weights file; FileNotFoundError naming it and the fix if absent.

    torch-fidelity unpickles the file with weights_only=False; we first load it with weights_only=True,
    which refuses anything but tensors, so an untrusted file can never run code.
    """
    try:
        path = find_weight("inception", weights_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; offline, the domain extractor (--extractor domain) needs no download") from None
    safe_torch_load(path)  # refuses anything but tensors before torch-fidelity loads it
    return Path(path)


def resolve_extractor(kind: str, weights_dir: str | Path | None = None,
                      domain_net: str | Path | None = None) -> Extractor:
    """'inception' (torch-fidelity inception-v3-compat, ADM's pool-2048 features) or 'domain' (RefNet)."""
    if kind == "inception":
        path = inception_weights_path(weights_dir)
        return Extractor("inception", INCEPTION_NAME, str(path), "2048", "logits_unbiased", "2048")
    if kind == "domain":
        if domain_net is None:
            raise FileNotFoundError("the domain extractor needs --domain-net: a reference network checkpoint "
                                    "from `iar2 refnet train`")
        if not Path(domain_net).exists():
            raise FileNotFoundError(f"reference network checkpoint not found: {domain_net} "
                                    "(train one with `iar2 refnet train`)")
        _domain_extractor_class()
        return Extractor("domain", DOMAIN_NAME, str(domain_net), "pool", "logits", "pool")
    raise ValueError(f"extractor {kind!r}: allowed values: 'inception', 'domain'")


def extract_features(dataset: Dataset, extractor: Extractor, layers: tuple[str, ...] | None = None,
                     batch_size: int = 64, device=None, verbose: bool = False) -> dict[str, torch.Tensor]:
    """Features {layer: (N, D) float32} of a uint8 image dataset (e.g. to compare against reference stats)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layers = tuple(layers or (extractor.layer_fid,))
    cuda = pick_device(device).type == "cuda"
    fe = create_feature_extractor(extractor.name, list(layers), cuda=cuda, verbose=verbose,
                                  feature_extractor_weights_path=extractor.weights_path)
    return get_featuresdict_from_dataset(dataset, fe, batch_size, cuda, save_cpu_ram=True, verbose=verbose)


class FeatureCollector:
    """Features of uint8 image batches, collected set by set as batches stream past (no image is kept).

    For sets too large to hold as images (50k reconstructions at 256 px are ~10 GB); one extractor serves
    every named set, e.g. "reconstructed" and "original".
    """

    def __init__(self, extractor: Extractor, layers: tuple[str, ...] | None = None, device=None):
        from torch_fidelity.utils import create_feature_extractor

        self.extractor = extractor
        self.layers = tuple(layers or (extractor.layer_fid,))
        self.device = pick_device(device)
        self.model = create_feature_extractor(extractor.name, list(self.layers), cuda=self.device.type == "cuda",
                                              verbose=False, feature_extractor_weights_path=extractor.weights_path)
        self._feats: dict[str, dict[str, list[torch.Tensor]]] = {}

    @torch.no_grad()
    def add(self, name: str, images: torch.Tensor) -> None:
        """Append the features of a uint8 (B, 3, H, W) batch to set `name`."""
        out = self.model.convert_features_tuple_to_dict(self.model(images.to(self.device)))
        store = self._feats.setdefault(name, {k: [] for k in self.layers})
        for k in self.layers:
            store[k].append(out[k].detach().float().cpu())

    def features(self, name: str, layer: str | None = None) -> torch.Tensor:
        return torch.cat(self._feats[name][layer or self.layers[0]])

    def count(self, name: str) -> int:
        return sum(f.shape[0] for f in self._feats.get(name, {}).get(self.layers[0], []))

    def fid(self, generated: str, reference: str) -> float:
        layer = self.extractor.layer_fid
        return fid_from_features(self.features(generated, layer), self.features(reference, layer))


def fid_from_features(f_generated: torch.Tensor, f_reference: torch.Tensor) -> float:
    """FID between two (N, D) feature sets (the same formula as torch-fidelity, float64)."""
    return frechet_distance(*feature_statistics(f_generated), *feature_statistics(f_reference))


def compute_fidelity(generated: Dataset, reference: Dataset, extractor: Extractor, *, fid: bool = True,
                     isc: bool = False, prc: bool = False, batch_size: int = 64, device=None,
                     generated_name: str = "generated", reference_name: str = "reference",
                     prc_neighborhood: int = 3, verbose: bool = False) -> dict:
    """FID (and optionally IS, precision/recall) of `generated` against `reference` with torch-fidelity.

    Conventions follow ADM's evaluator where torch-fidelity allows: precision/recall with k=3 on the same
    pool features as FID; IS over unshuffled splits of ~5000 samples (one split below 10k samples).
    The result names the extractor, its weights, the sets and their sizes.
    """
    import torch_fidelity

    n_gen, n_ref = len(generated), len(reference)
    isc_splits = max(1, round(n_gen / ISC_SPLIT_SIZE))
    cuda = pick_device(device).type == "cuda"
    log.info("torch-fidelity: %s (%d) vs %s (%d), extractor %s, fid=%s isc=%s prc=%s", generated_name, n_gen,
             reference_name, n_ref, extractor.name, fid, isc, prc)
    raw = torch_fidelity.calculate_metrics(
        input1=generated, input2=reference if (fid or prc) else None, cuda=cuda, batch_size=batch_size,
        fid=fid, isc=isc, prc=prc, feature_extractor=extractor.name,
        feature_layer_fid=extractor.layer_fid, feature_layer_isc=extractor.layer_isc,
        feature_layer_prc=extractor.layer_prc, feature_extractor_weights_path=extractor.weights_path,
        isc_splits=isc_splits, samples_shuffle=False, prc_neighborhood=prc_neighborhood,
        cache=False, save_cpu_ram=True, verbose=verbose)
    out = {**extractor.describe(), "generated": generated_name, "reference": reference_name,
           "num_generated": n_gen, "num_reference": n_ref}
    if fid:
        out["fid"] = float(raw[torch_fidelity.KEY_METRIC_FID])
    if isc:
        out.update(isc_mean=float(raw[torch_fidelity.KEY_METRIC_ISC_MEAN]),
                   isc_std=float(raw[torch_fidelity.KEY_METRIC_ISC_STD]), isc_splits=isc_splits)
    if prc:
        out.update(precision=float(raw[torch_fidelity.KEY_METRIC_PRECISION]),
                   recall=float(raw[torch_fidelity.KEY_METRIC_RECALL]),
                   f_score=float(raw[torch_fidelity.KEY_METRIC_F_SCORE]), prc_neighborhood=prc_neighborhood)
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            log.warning("metric %s is %s", k, v)
    return out
