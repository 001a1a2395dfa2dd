"""Bootstrap replicates of the generation metrics and the three-way verdicts of their intervals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iar2.bootstrap import (CONTRADICTED, INCONCLUSIVE, REPRODUCED, frechet_distance_torch, manifold_indicators,
                            percentile_interval, replicates, resample_counts, resample_indices, verdict,
                            weighted_stats)
from iar2.metrics import feature_statistics, frechet_distance


def _feats(n, d=6, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_resample_indices_depend_only_on_seed_replicate_and_size():
    a = resample_indices(0, 3, 50)
    assert np.array_equal(a, resample_indices(0, 3, 50))  # every job of a scale draws the same reference rows
    assert not np.array_equal(a, resample_indices(0, 4, 50)) and not np.array_equal(a, resample_indices(1, 3, 50))
    assert a.min() >= 0 and a.max() < 50 and len(a) == 50
    assert resample_counts(0, 3, 50).sum() == 50 and np.array_equal(np.bincount(a, minlength=50),
                                                                   resample_counts(0, 3, 50))


def test_weighted_stats_equal_the_stats_of_the_resampled_rows():
    x = _feats(40)
    idx = resample_indices(5, 0, 40)
    mu, cov = weighted_stats(x, torch.as_tensor(resample_counts(5, 0, 40), dtype=torch.float64))
    want_mu, want_cov = feature_statistics(x[idx])
    np.testing.assert_allclose(mu.numpy(), want_mu, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), want_cov, atol=1e-12)


def test_torch_frechet_distance_matches_numpy():
    a, b = _feats(60), _feats(80, shift=0.5, seed=1)
    want = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    ones_a, ones_b = torch.ones(60, dtype=torch.float64), torch.ones(80, dtype=torch.float64)
    got = frechet_distance_torch(*weighted_stats(a, ones_a), *weighted_stats(b, ones_b))
    assert got == pytest.approx(want, rel=1e-9)


def test_precision_recall_indicators_match_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen, ref = _feats(70, shift=0.3).float(), _feats(90, seed=2).float()
    want = prc_features_to_metric(gen, ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True,
                                  verbose=False)
    assert manifold_indicators(gen, ref).mean().item() == pytest.approx(want["precision"], abs=1e-6)  # its mean is float32
    assert manifold_indicators(ref, gen).mean().item() == pytest.approx(want["recall"], abs=1e-6)
    # batching does not change the answer
    assert torch.equal(manifold_indicators(gen, ref, batch=7), manifold_indicators(gen, ref))


def test_replicates_are_deterministic_and_centred_on_the_point_values():
    gen, ref = _feats(120, shift=0.4), _feats(150, seed=3)
    logits = _feats(120, d=5, seed=4) * 2
    r1 = replicates(gen, ref, logits, 1, gen, ref, b=60, seed=0)
    r2 = replicates(gen, ref, logits, 1, gen, ref, b=60, seed=0)
    assert r1 == r2 and len(r1["fid"]) == 60 and r1["num_generated"] == 120 and r1["num_reference"] == 150
    fid = frechet_distance(*feature_statistics(gen), *feature_statistics(ref))
    lo, hi = percentile_interval(r1["fid"])
    # the plug-in FID is biased upwards on resamples (fewer distinct rows); the point value is near the interval
    assert lo - 0.5 * (hi - lo) < fid < hi
    for m in ("precision", "recall"):
        lo, hi = percentile_interval(r1[m])
        assert lo <= r1[f"{m}_point"] <= hi


def test_paired_difference_separates_a_real_gap_and_not_a_null_one():
    # two "models" against the same reference: one shifted, one drawn from the reference distribution
    ref = _feats(300, seed=10)
    near, far, twin = _feats(200, seed=11), _feats(200, shift=0.6, seed=12), _feats(200, seed=13)
    logits = _feats(200, d=5, seed=14)
    rn, rf, rt = (replicates(x, ref, logits, 1, x, ref, b=100) for x in (near, far, twin))
    gap = percentile_interval(np.subtract(rn["fid"], rf["fid"]))
    assert verdict(gap, "negative") == REPRODUCED and verdict(gap, "positive") == CONTRADICTED
    null = percentile_interval(np.subtract(rn["fid"], rt["fid"]))
    assert verdict(null, "negative") == INCONCLUSIVE


@pytest.mark.parametrize("interval,claimed,want", [
    ((-2.0, -0.1), "negative", REPRODUCED), ((0.1, 2.0), "negative", CONTRADICTED),
    ((-1.0, 1.0), "negative", INCONCLUSIVE), ((0.1, 2.0), "positive", REPRODUCED),
    ((-2.0, -0.1), "positive", CONTRADICTED), ((0.0, 1.0), "positive", INCONCLUSIVE)])
def test_verdict_by_the_side_of_zero(interval, claimed, want):
    assert verdict(interval, claimed) == want


def test_percentile_interval():
    lo, hi = percentile_interval(np.arange(1001))
    assert (lo, hi) == pytest.approx((25.0, 975.0))
    with pytest.raises(ValueError):
        percentile_interval([1.0])


@pytest.mark.parametrize("held,want", [(200, REPRODUCED), (195, REPRODUCED), (194, INCONCLUSIVE),
                                       (100, INCONCLUSIVE), (6, INCONCLUSIVE), (5, CONTRADICTED), (0, CONTRADICTED)])
def test_support_verdict_matches_a_two_sided_95_percent_interval(held, want):
    from iar2.bootstrap import support_verdict

    assert support_verdict([True] * held + [False] * (200 - held)) == want
