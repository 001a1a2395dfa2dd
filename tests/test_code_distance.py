"""Figure 3 code-distance experiment: replacement table, the curve on a tiny VQ, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import random_images, tiny_vq
from iar2 import code_distance as C
from iar2.checkpoint import save_weights
from iar2.config import to_dict


def tiny_domain_lpips():
    from iar2.perceptual import build_perceptual
    from iar2.refnet import RefNet, RefNetConfig

    torch.manual_seed(0)
    return build_perceptual("domain", RefNet(RefNetConfig(input_size=16, widths=(8, 16), norm_groups=4)))


# ----------------------------------------------------------------------------- replacement table

def test_replacement_table_matches_brute_force_and_blocks():
    codes = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    targets = [0.0, 0.3, 1.0, 2.5, 100.0]
    replace, achieved = C.replacement_table(codes, targets)
    d = torch.cdist(codes.double(), codes.double())
    for ti, t in enumerate(targets):
        for i in range(40):
            gap = (d[i] - t).abs()
            if t > 0:
                gap[i] = float("inf")  # another code
            k = int(gap.argmin())
            assert int(replace[ti, i]) == k
            assert float(achieved[ti, i]) == pytest.approx(0.0 if k == i else float(d[i, k]), abs=1e-12)
    assert torch.equal(replace[0], torch.arange(40)) and float(achieved[0].abs().max()) == 0.0
    assert not (replace[1:] == torch.arange(40)).any()
    # the largest target picks each code's farthest code
    assert torch.allclose(achieved[-1], d.max(1).values)
    # computing in many small row blocks gives the same table
    r2, a2 = C.replacement_table(codes, targets, max_elements=7)
    assert torch.equal(r2, replace) and torch.equal(a2, achieved)


def test_distance_quantiles_exact_for_small_codebooks():
    codes = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    d = torch.cdist(codes.double(), codes.double()).numpy()
    off = d[~np.eye(30, dtype=bool)]
    q = C.distance_quantiles(codes)
    assert q["q00"] == pytest.approx(off.min()) and q["q100"] == pytest.approx(off.max())
    assert q["q50"] == pytest.approx(np.median(off))
    t = C.default_targets(codes, 5)
    assert t[0] == 0.0 and len(t) == 5 and t[-1] == pytest.approx(np.quantile(off, 0.95), abs=1e-6)


# ----------------------------------------------------------------------------- the curve

def test_curve_zero_distance_is_exact_and_error_grows_with_distance():
    model = tiny_vq("single")
    codes = model.codebook_vectors("single")
    q = C.distance_quantiles(codes)
    targets = [0.0] + [float(v) for v in np.linspace(q["q00"], q["q100"], 7)]
    x = random_images(8)
    perc = tiny_domain_lpips()
    res = C.code_distance_curve(model, [x[:4], (x[4:], torch.zeros(4))], targets, "single", perc)
    assert res["num_images"] == 8 and res["codebook_size"] == 64
    r0 = res["results"][0]
    assert r0["mse_vs_recon"] == {"mean": 0.0, "std": 0.0}
    assert r0["lpips_vs_recon"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert r0["achieved_mean"] == 0.0 and r0["replaced_fraction"] == 0.0
    assert r0["mse_vs_source"]["mean"] == pytest.approx(res["reference"]["mse_vs_source"]["mean"])

    # the reconstruction MSE against the source, recomputed directly
    rec = model.decode_indices(model.encode_indices(x)).clamp(-1, 1)
    direct = (((rec - x) / 2) ** 2).flatten(1).mean(1).double()
    assert res["reference"]["mse_vs_source"]["mean"] == pytest.approx(float(direct.mean()), rel=1e-6)

    rest = res["results"][1:]
    assert all(r["replaced_fraction"] == 1.0 for r in rest)
    # achieved distances follow the targets where most codes have a neighbour at that distance
    # (below the typical nearest-neighbour distance the nearest code is taken, so achieved > target)
    for r in rest:
        if q["q05"] <= r["target"] <= q["q95"]:
            assert abs(r["achieved_mean"] - r["target"]) < 0.1
        assert r["achieved_mean"] >= q["q00"] - 1e-9
    # error grows with distance: every replaced point is above 0, the far half above the near half,
    # and MSE/LPIPS rank-correlate with the achieved distance
    mse = np.array([r["mse_vs_recon"]["mean"] for r in rest])
    lp = np.array([r["lpips_vs_recon"]["mean"] for r in rest])
    dist = np.array([r["achieved_mean"] for r in rest])
    assert (mse > 0).all() and (lp > 0).all()
    assert mse[-2:].mean() > 1.3 * mse[:2].mean() and lp[-2:].mean() > 1.15 * lp[:2].mean()
    assert np.corrcoef(dist, mse)[0, 1] > 0.8 and np.corrcoef(dist, lp)[0, 1] > 0.8


@pytest.mark.parametrize("level", ["semantic", "detail"])
def test_curve_dual_replaces_only_the_chosen_level(level):
    model = tiny_vq("semantic_detail")
    x = random_images(4, seed=3)
    res = C.code_distance_curve(model, [x], [0.0, 1.0], level)
    assert res["results"][0]["mse_vs_recon"]["mean"] == 0.0
    assert res["results"][1]["mse_vs_recon"]["mean"] > 0.0
    assert res["results"][0]["lpips_vs_recon"] is None  # no perceptual module given
    idx = model.encode_indices(x)
    replace, _ = C.replacement_table(model.codebook_vectors(level), [1.0])
    out = C._replace_level(idx, replace[0], level)
    k = C.LEVEL_INDEX[level]
    assert torch.equal(out[:, 1 - k], idx[:, 1 - k]) and torch.equal(out[:, k], replace[0][idx[:, k]])


def test_curve_rejects_wrong_level():
    with pytest.raises(ValueError, match="not allowed"):
        C.code_distance_curve(tiny_vq("single"), [random_images(1)], [0.0], "detail")


# ----------------------------------------------------------------------------- CLI

def test_cli_code_distance(tmp_path, tiny_data):
    from iar2.cli import main
    from iar2.refnet import RefNetConfig

    model = tiny_vq("single", seed=1)
    save_weights(tmp_path / "vq.safetensors", model.state_dict(), {"model_config": to_dict(model.cfg)})
    perc = tiny_domain_lpips()
    save_weights(tmp_path / "refnet.safetensors", perc.net.state_dict(),
                 {"model_config": to_dict(RefNetConfig(input_size=16, widths=(8, 16), norm_groups=4))})
    out = tmp_path / "cd.json"
    rc = main(["code-distance", "--vq", str(tmp_path / "vq.safetensors"), "--data", str(tiny_data), "--split", "val",
               "--image-size", "16", "--perceptual", "domain", "--domain-net", str(tmp_path / "refnet.safetensors"),
               "--distances", "0", "0.6", "1.2", "--num-images", "6", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 6 and res["level"] == "single" and res["split"] == "val"
    assert [r["target"] for r in res["results"]] == [0.0, 0.6, 1.2]
    assert res["results"][0]["mse_vs_recon"]["mean"] == 0.0
    assert res["results"][2]["mse_vs_recon"]["mean"] > res["results"][0]["mse_vs_recon"]["mean"]
    assert res["results"][2]["lpips_vs_source"]["mean"] > 0
    # --perceptual domain without a network is a configuration error
    assert main(["code-distance", "--vq", str(tmp_path / "vq.safetensors"), "--data", str(tiny_data),
                 "--image-size", "16", "--out", str(tmp_path / "x.json")]) == 2
