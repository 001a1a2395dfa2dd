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


def test_missing_inception_weights_name_the_file(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path))
    write_samples(tmp_path / "s.npz", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, int))
    rc = main(["metrics", "--samples", str(tmp_path / "s.npz"), "--data", str(tiny_data), "--out", str(tmp_path / "m.json")])
    assert rc == 3 and not (tmp_path / "m.json").exists()
