"""`iar2 vq eval`: the JSON's fields, its metrics against a direct recomputation, and missing weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import save_tiny_vq
from iar2.checkpoint import save_weights
from iar2.config import to_dict

SIZE = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from iar2.refnet import RefNet, RefNetConfig

    d = tmp_path_factory.mktemp("eval_assets")
    torch.manual_seed(0)
    cfg = RefNetConfig(num_classes=10, input_size=32, widths=(8, 16), blocks=1, norm_groups=4)
    save_weights(d / "refnet.safetensors", RefNet(cfg).state_dict(), {"model_config": to_dict(cfg)})
    return {"dual": save_tiny_vq(d / "dual.safetensors", image_size=SIZE),
            "single": save_tiny_vq(d / "single.safetensors", "single", image_size=SIZE),
            "refnet": d / "refnet.safetensors"}


def test_vq_eval_json_fields_and_values(tiny_data, assets, tmp_path):
    from iar2.cli import main
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import eval_transform
    from iar2.metrics import psnr, ssim, to_uint8
    from iar2.perceptual import build_perceptual
    from iar2.tokenizer.evaluate import spread_indices
    from iar2.tokenizer.vq_model import load_vq

    out = tmp_path / "m.json"
    rc = main(["vq", "eval", "--vq", str(assets["dual"]), "--data", str(tiny_data), "--split", "val",
               "--extractor", "domain", "--domain-net", str(assets["refnet"]), "--perceptual", "domain",
               "--max-images", "12", "--batch-size", "5", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    for key in ("rfid", "psnr", "ssim", "ssim_llamagen", "lpips", "semantic_usage", "semantic_perplexity",
                "detail_usage", "detail_perplexity", "extractor", "extractor_weights", "perceptual", "split",
                "num_images", "num_reference", "num_generated", "vq_config_hash", "reference", "images_per_s"):
        assert key in m, key
    assert m["extractor"] == "domain" and m["perceptual"] == "domain" and m["split"] == "val"
    assert m["num_images"] == m["num_reference"] == m["num_generated"] == 12 and m["num_images_in_split"] == 40
    assert m["image_size"] == SIZE and m["quantizer"] == "semantic_detail"

    # recompute directly on the same 12 images (spread over the split: every class is present)
    ds = ImageFolderDataset(tiny_data, "val", eval_transform(SIZE))
    idx = spread_indices(len(ds), 12)
    assert len({ds.targets[i] for i in idx}) == 10
    x = torch.stack([ds[i][0] for i in idx])
    model = load_vq(assets["dual"])
    with torch.no_grad():
        recon, q = model(x)
    o8, r8 = to_uint8(x), to_uint8(recon)
    assert m["psnr"] == pytest.approx(psnr(r8, o8).mean().item(), rel=1e-9)
    assert m["ssim"] == pytest.approx(ssim(r8, o8).mean().item(), rel=1e-9)
    lp = build_perceptual("domain", domain_net=assets["refnet"])
    with torch.no_grad():
        expected_lpips = lp(o8.float() / 127.5 - 1, r8.float() / 127.5 - 1).mean().item()
    assert m["lpips"] == pytest.approx(expected_lpips, rel=1e-5)
    sem = q.indices[:, 0].unique().numel()
    assert m["semantic_usage"] == pytest.approx(sem / 16) and m["semantic_codes_used"] == sem
    assert m["detail_codes_used"] == q.indices[:, 1].unique().numel()
    assert math.isfinite(m["rfid"]) and m["rfid"] > 0
    # bootstrap replicates over the images (by default): replicate b is the mean over the resampled images
    from iar2.bootstrap import resample_indices

    boot = m["bootstrap"]
    assert boot["replicates"] == 200 and len(boot["rfid"]) == len(boot["psnr"]) == len(boot["lpips"]) == 200
    per_image = psnr(r8, o8).double()
    assert boot["psnr"][7] == pytest.approx(per_image[resample_indices(0, 7, 12)].mean().item(), rel=1e-9)


def test_vq_eval_single_codebook_without_perceptual(tiny_data, assets):
    from iar2.tokenizer.evaluate import evaluate_reconstruction

    m = evaluate_reconstruction(assets["single"], tiny_data, "val", extractor="domain", domain_net=assets["refnet"],
                                perceptual="none", max_images=8, device="cpu")
    assert m["lpips"] is None and m["perceptual"] == "none"
    assert 0 < m["codebook_usage"] <= 1 and m["codebook_perplexity"] >= 1 and "semantic_usage" not in m
    assert m["num_images"] == 8


def test_vq_eval_missing_inception_weights(tiny_data, assets, tmp_path, monkeypatch):
    from iar2.tokenizer.evaluate import evaluate_reconstruction

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as e:
        evaluate_reconstruction(assets["single"], tiny_data, "val", extractor="inception", perceptual="none",
                                weights_dir=tmp_path / "w", max_images=4)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(e.value) and "iar2 fetch-weights" in str(e.value)


def test_spread_indices():
    from iar2.tokenizer.evaluate import spread_indices

    idx = spread_indices(40, 12)
    assert idx[0] == 0 and idx[-1] == 39 and len(idx) == 12 and idx == sorted(set(idx))
    assert spread_indices(5, None) == list(range(5)) and spread_indices(5, 9) == list(range(5))
    assert np.all(np.diff(idx) >= 3)


def test_cli_help():
    from iar2.cli import main

    with pytest.raises(SystemExit) as e:
        main(["vq", "eval", "--help"])
    assert e.value.code == 0
