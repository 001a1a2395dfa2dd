"""Bootstrap replicates of the generation metrics, and percentile intervals of differences and trends.

A metrics job resamples its two feature sets B times and stores B replicates of FID, IS, precision and recall
beside the point estimates. The resample indices are a function only of (seed, replicate b, set size n), so

- every metrics job of a scale draws the SAME reference resample in replicate b (the reference set is shared), and
- two sample sets of equal size draw the same generated indices: sample i of every model has the same class label
  and noise stream (`iar2 sample` seeds each sample by its index), so resampling indices jointly is a paired
  bootstrap; for unrelated sets of equal size it is still valid (resampling pairs of independent draws).

The difference of two jobs' replicate b is then one bootstrap replicate of the difference of the two metrics,
and its 2.5 / 97.5 percentiles give a 95 % interval (`percentile_interval`). A claim is decided by where that
interval lies (`verdict`): on the claimed side (reproduced), on the other side (contradicted), or spanning 0.

FID replicate: weighted mean and covariance of the resampled rows (weights = resample counts, so no copy of the
features), Frechet distance by two symmetric eigendecompositions (iar2.metrics.frechet_distance), in torch float64
on the features' device. IS replicate: torch-fidelity's split IS on the resampled logits. Precision / recall:
each generated (reference) sample's indicator of lying inside the other set's k-NN manifold is computed once
(torch-fidelity's definition, so the point values equal its own), and the replicate is the mean of the resampled
indicators; the manifolds are held fixed, because resampling with replacement puts duplicates at distance 0 and
would shrink the k-NN radii.
"""
from __future__ import annotations

import numpy as np
import torch

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
METRICS = ("fid", "isc_mean", "precision", "recall")


def resample_indices(seed: int, replicate: int, n: int) -> np.ndarray:
    """n indices drawn with replacement from range(n); a function of (seed, replicate, n) only."""
    return np.random.default_rng([int(seed), int(replicate), int(n)]).integers(0, n, size=n)


def resample_counts(seed: int, replicate: int, n: int) -> np.ndarray:
    """How often each of the n rows occurs in replicate `replicate` (the weights of a weighted statistic)."""
    return np.bincount(resample_indices(seed, replicate, n), minlength=n)


def weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (N - 1 normalisation, as np.cov of the resampled rows) of rows x (N, D) with integer
    repeat counts w (N,) summing to N."""
    n = w.sum()
    mu = (w[:, None] * x).sum(0) / n
    xc = x - mu
    return mu, (xc.T * w) @ xc / (n - 1)


def frechet_distance_torch(mu1, s1, mu2, s2) -> float:
    """Same formula as iar2.metrics.frechet_distance, in torch (so it runs on the metrics job's device)."""
    ev1, vec1 = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vec1 * ev1.clamp_min(0).sqrt()) @ vec1.T
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)


def manifold_indicators(a: torch.Tensor, b: torch.Tensor, k: int = 3, batch: int = 10000) -> torch.Tensor:
    """For each row of `a`: is it inside some row of `b`'s ball of radius = distance to b's k-th neighbour
    (torch-fidelity's precision/recall; precision = mean over generated a vs reference b, recall = swapped)."""
    radii = torch.cat([torch.cdist(part, b).kthvalue(k + 1, dim=1).values for part in b.split(batch)])
    return torch.cat([(torch.cdist(part, b) <= radii).any(dim=1) for part in a.split(batch)]).double()


def replicates(gen_fid: torch.Tensor, ref_fid: torch.Tensor, gen_logits: torch.Tensor, isc_splits: int,
               gen_prc: torch.Tensor, ref_prc: torch.Tensor, b: int, seed: int = 0, k: int = 3,
               device: str | torch.device | None = None) -> dict:
    """B bootstrap replicates of each metric (lists of floats), plus the point values of precision / recall
    from the same indicators. Statistics in float64 on `device` (default: where the features are; at the paper
    scale, 50k x 2048 features, a GPU makes the B weighted covariances cheap)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    if device is not None:
        gen_fid, ref_fid, gen_logits, gen_prc, ref_prc = (x.to(device) for x in
                                                          (gen_fid, ref_fid, gen_logits, gen_prc, ref_prc))
    g, r = gen_fid.double(), ref_fid.double()
    ng, nr = len(g), len(r)
    in_ref = manifold_indicators(gen_prc.double(), ref_prc.double(), k)  # precision terms, one per generated
    in_gen = manifold_indicators(ref_prc.double(), gen_prc.double(), k)  # recall terms, one per reference
    out = {m: [] for m in METRICS}
    for i in range(b):
        wg = torch.as_tensor(resample_counts(seed, i, ng), dtype=torch.float64, device=g.device)
        wr = torch.as_tensor(resample_counts(seed, i, nr), dtype=torch.float64, device=r.device)
        out["fid"].append(frechet_distance_torch(*weighted_stats(g, wg), *weighted_stats(r, wr)))
        ig = torch.as_tensor(resample_indices(seed, i, ng), device=gen_logits.device)
        out["isc_mean"].append(float(isc_features_to_metric(gen_logits[ig], splits=isc_splits,
                                                            shuffle=False)[KEY_METRIC_ISC_MEAN]))
        out["precision"].append(float((wg.to(in_ref.device) * in_ref).sum() / ng))
        out["recall"].append(float((wr.to(in_gen.device) * in_gen).sum() / nr))
    return {"replicates": b, "seed": seed, "num_generated": ng, "num_reference": nr,
            "precision_point": float(in_ref.mean()), "recall_point": float(in_gen.mean()), **out}


# ----------------------------------------------------------------------------- intervals and verdicts

def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of replicate values."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        raise ValueError("an interval needs at least two replicates")
    a = (1.0 - level) / 2
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def verdict(interval: tuple[float, float], claimed: str = "negative") -> str:
    """Decide a claimed sign of a difference: `claimed` 'negative' (the claim is d < 0) or 'positive' (d > 0).
    Reproduced when the interval lies on the claimed side of 0, contradicted when on the other, else
    inconclusive (it contains 0)."""
    lo, hi = interval
    if claimed not in ("negative", "positive"):
        raise ValueError(f"claimed {claimed!r} is not allowed; allowed values: 'negative', 'positive'")
    below, above = hi < 0, lo > 0
    if not (below or above):
        return INCONCLUSIVE
    return REPRODUCED if below == (claimed == "negative") else CONTRADICTED


def support_verdict(holds, level: float = 0.95) -> str:
    """Decide a claim that is true or false in each bootstrap replicate (a shape, an argmin): reproduced when it
    holds in at least 1 - (1 - level) / 2 of them, contradicted when in at most (1 - level) / 2, else inconclusive.
    For one difference this is the percentile interval lying on one side of 0 (`verdict`)."""
    h = np.asarray(holds, bool)
    if h.size < 2:
        raise ValueError("a verdict needs at least two replicates")
    a = (1.0 - level) / 2
    p = h.mean()
    return REPRODUCED if p >= 1.0 - a else CONTRADICTED if p <= a else INCONCLUSIVE


def recon_replicates(original: torch.Tensor, reconstructed: torch.Tensor, per_image: dict[str, torch.Tensor], b: int,
                     seed: int = 0) -> dict:
    """B replicates of a tokenizer's reconstruction metrics: image i's original and reconstruction are resampled
    together (rFID of the resampled pairs; the mean of per-image PSNR / SSIM / LPIPS). Every tokenizer of a scale
    evaluates the same images, so replicate b resamples the same images for all of them (paired differences)."""
    o, r = original.double(), reconstructed.double()
    n = len(o)
    out = {"rfid": [], **{k: [] for k in per_image}}
    for i in range(b):
        w = torch.as_tensor(resample_counts(seed, i, n), dtype=torch.float64, device=o.device)
        out["rfid"].append(frechet_distance_torch(*weighted_stats(r, w), *weighted_stats(o, w)))
        for k, v in per_image.items():
            out[k].append(float((w.to(v.device) * v.double()).sum() / n))
    return {"replicates": b, "seed": seed, "num_generated": n, "num_reference": n, **out}
