"""`iar2 metrics` on sample sets built from the data itself: real images score like real images."""
import json

import numpy as np
import pytest

from iar2.cli import main
from iar2.generation_metrics import reference_images


@pytest.fixture(scope="module")
def refnet(tiny_data, tmp_path_factory):
    from iar2.refnet import train_refnet

    out = tmp_path_factory.mktemp("refnet") / "refnet.safetensors"
    train_refnet(tiny_data, out, steps=20, seed=0, input_size=32)
    return out


def write_samples(path, images, labels):
    with open(path, "wb") as fh:
        np.savez(fh, arr_0=images, arr_1=labels)


def test_real_images_score_better_than_noise(tiny_data, refnet, tmp_path):
    ref = reference_images(tiny_data, "train", 32, None).permute(0, 2, 3, 1).numpy()
    write_samples(tmp_path / "real.npz", ref, np.arange(len(ref)) % 10)
    rng = np.random.default_rng(0)
    noisy = np.clip(ref.astype(int) + rng.normal(0, 60, ref.shape), 0, 255).astype(np.uint8)
    write_samples(tmp_path / "noisy.npz", noisy, np.arange(len(ref)) % 10)
    out = {}
    for name in ("real", "noisy"):
        assert main(["metrics", "--samples", str(tmp_path / f"{name}.npz"), "--data", str(tiny_data),
                     "--extractor", "domain", "--domain-net", str(refnet), "--out", str(tmp_path / f"{name}.json")]) == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert abs(out["real"]["fid"]) < 1e-3 and out["real"]["precision"] == 1.0 and out["real"]["recall"] == 1.0
    assert out["noisy"]["fid"] > out["real"]["fid"] + 1.0
    assert out["real"]["extractor"] == "domain" and out["real"]["num_generated"] == len(ref)
    assert "centre crop 32 px" in out["real"]["reference"]
    # bootstrap replicates by default (iar2.bootstrap), on the same features as the point values; the paired
    # difference noisy - real of every replicate is positive for FID
    boot = {k: v["bootstrap"] for k, v in out.items()}
    assert boot["real"]["replicates"] == 200 and len(boot["noisy"]["fid"]) == 200
    assert boot["real"]["precision_point"] == out["real"]["precision"]
    assert boot["real"]["recall_point"] == out["real"]["recall"]
    assert min(np.subtract(boot["noisy"]["fid"], boot["real"]["fid"])) > 0


def test_missing_inception_weights_name_the_file(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path))
    write_samples(tmp_path / "s.npz", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, int))
    rc = main(["metrics", "--samples", str(tmp_path / "s.npz"), "--data", str(tiny_data), "--out", str(tmp_path / "m.json")])
    assert rc == 3 and not (tmp_path / "m.json").exists()


def test_streamed_cached_reference_matches_torch_fidelity_in_memory(tiny_data, refnet, tmp_path):
    import torch

    from iar2.generation_metrics import evaluate_samples
    from iar2.metrics import UInt8ImageDataset, compute_fidelity, resolve_extractor

    ref = reference_images(tiny_data, "train", 32, None)
    rng = np.random.default_rng(1)
    gen = np.clip(ref.permute(0, 2, 3, 1).numpy().astype(int) + rng.normal(0, 30, (len(ref), 32, 32, 3)), 0,
                  255).astype(np.uint8)
    write_samples(tmp_path / "g.npz", gen, np.arange(len(gen)) % 10)
    cache = tmp_path / "cache"
    a = evaluate_samples(tmp_path / "g.npz", tiny_data, extractor="domain", domain_net=refnet, cache_dir=cache)
    assert len(list(cache.glob("ref-*.npz"))) == 1
    b = evaluate_samples(tmp_path / "g.npz", tiny_data, extractor="domain", domain_net=refnet, cache_dir=cache)
    assert a == b  # the cached reference gives the same numbers
    ext = resolve_extractor("domain", domain_net=refnet)
    direct = compute_fidelity(UInt8ImageDataset(torch.from_numpy(gen).permute(0, 3, 1, 2).contiguous()),
                              UInt8ImageDataset(ref), ext, isc=True, prc=True)
    for k in ("fid", "isc_mean", "precision", "recall"):
        assert a[k] == pytest.approx(direct[k], rel=1e-4, abs=1e-6), k
