"""Metrics: PSNR / SSIM against direct computation and scikit-image, the Frechet distance against
torch-fidelity and scipy, FID with the domain extractor, and Inception weights loaded from a local file."""
from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch

from iar2.checkpoint import save_weights
from iar2.config import to_dict
from iar2.metrics import (SSIM_LLAMAGEN, FeatureCollector, UInt8ImageDataset, compute_fidelity, feature_statistics,
                          frechet_distance, load_reference_stats, psnr, resolve_extractor, ssim, to_uint8)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images (upsampled noise) so SSIM's local statistics are not pure noise
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)


def _noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_identical_is_inf_and_known_noise_level():
    x = _images()
    assert torch.isinf(psnr(x, x)).all()
    # +-10 everywhere without clipping: MSE = 100 exactly -> 10 log10(255^2 / 100)
    base = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    sign = (torch.arange(16 * 16).reshape(16, 16) % 2) * 2 - 1
    y = (base.int() + 10 * sign).to(torch.uint8)
    expected = 10 * math.log10(255 ** 2 / 100)
    assert torch.allclose(psnr(base, y), torch.full((2,), expected, dtype=torch.float64))


def test_psnr_matches_skimage_per_image():
    from skimage.metrics import peak_signal_noise_ratio

    x = _images(3)
    y = _noisy(x, 12)
    ref = [peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=255) for i in range(3)]
    assert np.allclose(psnr(x, y).numpy(), ref, rtol=1e-10)


def test_ssim_identical_is_one_and_decreases_with_noise():
    x = _images()
    for kw in ({}, SSIM_LLAMAGEN):
        assert torch.allclose(ssim(x, x, **kw), torch.ones(4, dtype=torch.float64))
        values = [ssim(x, _noisy(x, s), **kw).mean().item() for s in (2, 10, 30, 80)]
        assert all(a > b for a, b in zip(values, values[1:])), values


def test_ssim_matches_skimage_both_protocols():
    from skimage.metrics import structural_similarity

    x = _images(3, size=29)
    y = _noisy(x, 15)
    hwc = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    gauss = [structural_similarity(hwc(x[i]), hwc(y[i]), gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=255, channel_axis=-1) for i in range(3)]
    assert np.allclose(ssim(x, y).numpy(), gauss, atol=1e-10)
    # LlamaGen's reconstruction script: skimage defaults on [0, 1] floats with data_range=2.0
    llama = [structural_similarity(hwc(x[i]) / 255.0, hwc(y[i]) / 255.0, data_range=2.0, channel_axis=-1)
             for i in range(3)]
    assert np.allclose(ssim(x, y, **SSIM_LLAMAGEN).numpy(), llama, atol=1e-10)


def test_to_uint8_roundtrips_dataset_pixels():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = u.float() / 127.5 - 1.0  # what the data pipeline feeds the model
    assert torch.equal(to_uint8(x), u)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# ----------------------------------------------------------------------------- Frechet distance

def _random_stats(d, n, seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    return feature_statistics(f)


def test_frechet_distance_matches_torch_fidelity_and_scipy():
    import scipy.linalg
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    mu1, s1 = _random_stats(16, 200, 0)
    mu2, s2 = _random_stats(16, 150, 1)
    ours = frechet_distance(mu1, s1, mu2, s2)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-8)
    assert ours == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_identities():
    mu, s = _random_stats(8, 50, 2)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    shift = np.arange(8, dtype=np.float64)
    assert frechet_distance(mu + shift, s, mu, s) == pytest.approx(float(shift @ shift), rel=1e-9)
    # singular covariances (fewer samples than dimensions) stay finite and ~0 against themselves
    # (square roots of the null-space eigenvalues' rounding noise leave ~1e-7 of the trace)
    mu3, s3 = _random_stats(32, 10, 3)
    assert abs(frechet_distance(mu3, s3, mu3, s3)) < 1e-6 * np.trace(s3)


def test_load_reference_stats(tmp_path):
    mu, s = _random_stats(4, 20, 4)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=s)
    mu2, s2 = load_reference_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(s, s2)
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- FID (domain extractor)

@pytest.fixture(scope="module")
def refnet_path(tmp_path_factory):
    from iar2.refnet import RefNet, RefNetConfig

    torch.manual_seed(0)
    cfg = RefNetConfig(num_classes=4, input_size=32, widths=(8, 16), blocks=1, norm_groups=4)
    net = RefNet(cfg)
    for m in net.modules():  # random (untrained) net: un-zero the block gains so every layer contributes
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.ones_(m.weight)
    path = tmp_path_factory.mktemp("refnet") / "refnet.safetensors"
    save_weights(path, net.state_dict(), {"model_config": to_dict(cfg)})
    return path


def test_domain_fid_zero_against_itself_and_grows_with_noise(refnet_path):
    ext = resolve_extractor("domain", domain_net=refnet_path)
    x = _images(24, seed=5)
    ref = UInt8ImageDataset(x)
    same = compute_fidelity(UInt8ImageDataset(x.clone()), ref, ext, batch_size=8)
    fids = [compute_fidelity(UInt8ImageDataset(_noisy(x, s)), ref, ext, batch_size=8)["fid"] for s in (10, 40, 100)]
    assert abs(same["fid"]) < 1e-6 * fids[0]
    assert fids[0] > 0 and fids[0] < fids[1] < fids[2], fids
    # the result names the extractor, the sets and the counts
    assert same["extractor"] == "domain" and same["extractor_weights"] == str(refnet_path)
    assert same["num_generated"] == 24 and same["num_reference"] == 24
    assert same["reference"] == "reference" and same["feature_layer_fid"] == "pool"


def test_inception_score_of_constant_predictions_is_one(refnet_path):
    # identical images -> identical class posteriors -> p(y|x) = p(y) -> KL 0 -> IS = exp(0) = 1
    ext = resolve_extractor("domain", domain_net=refnet_path)
    one = _images(1, seed=3).expand(20, -1, -1, -1).clone()
    res = compute_fidelity(UInt8ImageDataset(one), UInt8ImageDataset(one), ext, fid=False, isc=True, batch_size=8)
    assert res["isc_mean"] == pytest.approx(1.0, abs=1e-5)
    varied = compute_fidelity(UInt8ImageDataset(_images(20, seed=4)), UInt8ImageDataset(one), ext, fid=False,
                              isc=True, batch_size=8)
    assert varied["isc_mean"] > 1.0


def test_streaming_features_equal_torch_fidelity(refnet_path):
    from iar2.refnet import load_refnet

    ext = resolve_extractor("domain", domain_net=refnet_path)
    x, y = _images(12, seed=6), _noisy(_images(12, seed=6), 30)
    col = FeatureCollector(ext, layers=("pool", "logits"))
    for chunk in y.split(5):  # uneven batches: streaming must not depend on batching
        col.add("gen", chunk)
    col.add("ref", x)
    full = compute_fidelity(UInt8ImageDataset(y), UInt8ImageDataset(x), ext, batch_size=4, isc=True, prc=True)
    assert col.fid("gen", "ref") == pytest.approx(full["fid"], rel=1e-5)
    net = load_refnet(refnet_path)
    assert torch.allclose(col.features("gen", "pool"), net.pool_features(y), atol=1e-5)
    assert torch.allclose(col.features("gen", "logits"), net(y), atol=1e-5)
    assert col.count("gen") == 12
    assert set(full) >= {"isc_mean", "isc_std", "precision", "recall", "f_score", "isc_splits"}
    assert 0.0 <= full["precision"] <= 1.0 and full["isc_mean"] >= 1.0


def test_domain_extractor_needs_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="refnet train"):
        resolve_extractor("domain", domain_net=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        resolve_extractor("domain")


# ----------------------------------------------------------------------------- Inception weights (local file)

def _isolate_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_missing_inception_weights_names_file_and_command(monkeypatch, tmp_path):
    _isolate_torch_home(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        resolve_extractor("inception", weights_dir=tmp_path / "weights")
    assert INCEPTION_FILE in str(e.value) and "iar2 fetch-weights" in str(e.value)


def test_inception_weights_refused_if_not_plain_tensors(monkeypatch, tmp_path):
    _isolate_torch_home(monkeypatch, tmp_path)
    torch.save({"when": datetime.datetime(2020, 1, 1)}, tmp_path / INCEPTION_FILE)  # needs full unpickling
    from iar2.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="refused") as e:
        resolve_extractor("inception", weights_dir=tmp_path)
    assert "weights_only=False" not in str(e.value)  # never advise unpickling an untrusted file


@pytest.mark.slow  # builds torch-fidelity's 24M-parameter InceptionV3 on the CPU (~10 s)
def test_inception_weights_loaded_from_local_file(monkeypatch, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    _isolate_torch_home(monkeypatch, tmp_path)

    class _ShapesOnly(FeatureExtractorInceptionV3):  # learn the expected keys/shapes without real weights
        def load_state_dict(self, *a, **k):
            return None

    torch.save({}, tmp_path / "empty.pth")
    with torch.device("meta"):
        shapes = _ShapesOnly("shapes", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth")).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in shapes.items():  # He-scaled random convolutions, identity batch norms
        if v.dtype == torch.int64:
            sd[k] = torch.zeros(v.shape, dtype=torch.int64)
        elif v.dim() > 1:
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("running_var") or k.endswith("weight"):
            sd[k] = torch.ones(v.shape)
        else:
            sd[k] = torch.zeros(v.shape)
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save(sd, wdir / INCEPTION_FILE)

    ext = resolve_extractor("inception", weights_dir=wdir)
    assert ext.weights_path == str(wdir / INCEPTION_FILE) and ext.name == "inception-v3-compat"
    col = FeatureCollector(ext)
    loaded = col.model.state_dict()
    assert torch.equal(loaded["fc.weight"], sd["fc.weight"])
    assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"], sd["Mixed_7c.branch_pool.conv.weight"])
    col.add("a", _images(2, size=32))
    f = col.features("a")
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and f.abs().sum() > 0
