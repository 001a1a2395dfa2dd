"""Tokenization: codes equal direct encodings of each augmentation, runs are deterministic, a stopped run
resumed equals an uninterrupted one, bad images are skipped with labels kept aligned, and the reader."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from helpers import save_tiny_vq
from iar2.tokenize import AUGMENTATIONS, TokenDataset, tokenize

SIZE = 16  # tokenizer input size (tiny_data images are 32 px); grid 4x4 with downsample 4


@pytest.fixture(scope="module")
def vqs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vq")
    return {"dual": save_tiny_vq(d / "dual.safetensors", image_size=SIZE),
            "single": save_tiny_vq(d / "single.safetensors", "single", image_size=SIZE)}


@pytest.fixture(scope="module")
def flip_run(tiny_data, vqs, tmp_path_factory):
    """An uninterrupted flip tokenization of the train split (the reference for several tests)."""
    out = tmp_path_factory.mktemp("codes") / "flip"
    meta = tokenize(vqs["dual"], tiny_data, "train", out, aug="flip", batch_size=8, chunk_size=16)
    return out, meta


def _crops(tiny_data, split, size, n=None):
    """uint8 centre crops and labels straight from the dataset, in dataset order."""
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.tokenize import CenterCropUInt8

    ds = ImageFolderDataset(tiny_data, split, CenterCropUInt8(size))
    n = len(ds) if n is None else n
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), list(ys)


def _encode(vq_path, x_uint8):
    from iar2.tokenizer.vq_model import load_vq

    idx = load_vq(vq_path).encode_indices(x_uint8.float() / 127.5 - 1.0)
    return (idx if idx.dim() == 4 else idx[:, None]).flatten(2).numpy()


def test_flip_codes_equal_direct_encoding(tiny_data, vqs, flip_run):
    out, meta = flip_run
    codes, labels = np.load(out / "codes.npy"), np.load(out / "labels.npy")
    x, y = _crops(tiny_data, "train", SIZE)
    assert codes.shape == (80, 2, 2, 16) and codes.dtype == np.uint16 and labels.dtype == np.int32
    assert labels.tolist() == y
    assert np.array_equal(codes[:, 0], _encode(vqs["dual"], x))
    assert np.array_equal(codes[:, 1], _encode(vqs["dual"], x.flip(-1)))  # flip codes = codes of the flipped image
    assert codes[:, :, 0].max() < 16 and codes[:, :, 1].max() < 64
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["augmentations"] == ["center", "center_flip"] and meta["levels"] == ["semantic", "detail"]
    assert meta["vocab_sizes"] == [16, 64] and meta["grid"] == [4, 4] and meta["num_images"] == 80
    assert meta["num_classes"] == 10 and len(meta["classes"]) == 10 and meta["num_bad"] == 0
    assert len(meta["vq_fingerprint"]) == 16 and meta["image_size"] == SIZE
    assert not (out / "progress.json").exists() and not list(out.glob("*.partial.npy"))


def test_deterministic_across_runs_and_cli(tiny_data, vqs, flip_run, tmp_path):
    from iar2.cli import main

    out, _ = flip_run
    rc = main(["tokenize", "--vq", str(vqs["dual"]), "--data", str(tiny_data), "--split", "train",
               "--out", str(tmp_path / "again"), "--aug", "flip", "--batch-size", "8", "--chunk-size", "16"])
    assert rc == 0
    for name in ("codes.npy", "labels.npy"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_resume_equals_uninterrupted_run(tiny_data, vqs, flip_run, tmp_path, monkeypatch):
    import iar2.tokenize as tk

    out, _ = flip_run
    part = tmp_path / "part"
    assert tokenize(vqs["dual"], tiny_data, "train", part, aug="flip", batch_size=8, chunk_size=16,
                    max_chunks=2) is None  # a "killed" run: two chunks (32 images) durable
    assert not (part / "meta.json").exists() and not (part / "codes.npy").exists()
    assert json.loads((part / "progress.json").read_text())["done"] == 32

    calls = []
    real = tk.encode_batch
    monkeypatch.setattr(tk, "encode_batch", lambda m, x, *a: calls.append(len(x)) or real(m, x, *a))
    meta = tokenize(vqs["dual"], tiny_data, "train", part, aug="flip", batch_size=8, chunk_size=16, resume=True)
    assert sum(calls) == 80 - 32  # only the unfinished rows were encoded
    for name in ("codes.npy", "labels.npy"):
        assert np.array_equal(np.load(part / name), np.load(out / name))
    assert meta["signature"] == json.loads((out / "meta.json").read_text())["signature"]
    # a complete folder resumes to a no-op; different settings are recomputed, the old rows set aside
    calls.clear()
    assert tokenize(vqs["dual"], tiny_data, "train", part, aug="flip", batch_size=8, chunk_size=16,
                    resume=True)["num_images"] == 80 and not calls
    meta = tokenize(vqs["dual"], tiny_data, "train", part, aug="none", batch_size=8, chunk_size=16, resume=True)
    assert meta["aug"] == "none" and sum(calls) == 80 and (tmp_path / "part.stale" / "codes.npy").is_file()


def test_resume_recomputes_progress_from_other_settings(tiny_data, vqs, tmp_path, caplog):
    part = tmp_path / "part"
    tokenize(vqs["dual"], tiny_data, "train", part, aug="flip", batch_size=8, chunk_size=8, max_chunks=1)
    with caplog.at_level("WARNING"):
        meta = tokenize(vqs["single"], tiny_data, "train", part, aug="flip", batch_size=8, chunk_size=8, resume=True)
    assert meta["levels"] == ["single"] and np.load(part / "codes.npy").shape[2] == 1
    assert "vq_fingerprint" in caplog.text and "set aside" in caplog.text


def test_tencrop_layout(tiny_data, vqs, tmp_path):
    meta = tokenize(vqs["single"], tiny_data, "val", tmp_path / "ten", aug="tencrop", crop_range=1.1,
                    batch_size=4, max_images=6)
    codes = np.load(tmp_path / "ten" / "codes.npy")
    assert codes.shape == (6, 10, 1, 16) and meta["augmentations"] == list(AUGMENTATIONS["tencrop"])
    assert meta["crop_range"] == 1.1 and meta["levels"] == ["single"] and meta["vocab_sizes"] == [64]
    big, _ = _crops(tiny_data, "val", int(SIZE * 1.1), n=6)  # 17 px centre crop, then the ten crops at 16
    tl, tr, br = big[..., :SIZE, :SIZE], big[..., :SIZE, -SIZE:], big[..., -SIZE:, -SIZE:]
    center = TF.center_crop(big, [SIZE, SIZE])
    assert np.array_equal(codes[:, 0], _encode(vqs["single"], tl))
    assert np.array_equal(codes[:, 3], _encode(vqs["single"], br))
    assert np.array_equal(codes[:, 4], _encode(vqs["single"], center))
    # the last five are the same crops of the mirrored image: its top-left is the mirrored top-right
    assert np.array_equal(codes[:, 5], _encode(vqs["single"], tr.flip(-1)))
    # (the centre of the mirrored 17 px crop is not the mirrored centre crop: the offset rounds the same way)
    assert np.array_equal(codes[:, 9], _encode(vqs["single"], TF.center_crop(big.flip(-1), [SIZE, SIZE])))


def test_corrupt_image_skipped_and_labels_stay_aligned(tiny_data, vqs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    classes = json.loads((root / "classes.json").read_text())
    classes = classes["classes"] if isinstance(classes, dict) else classes
    victim = sorted((root / "train" / classes[3]).iterdir())[2]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    clean = tokenize(vqs["single"], tiny_data, "train", tmp_path / "clean", aug="none", batch_size=8)
    meta = tokenize(vqs["single"], root, "train", tmp_path / "bad", aug="none", batch_size=8)
    assert meta["num_images"] == 79 and meta["num_bad"] == 1
    assert meta["bad_files"] == [f"{classes[3]}/{victim.name}"]
    dropped = 3 * 8 + 2  # class 3 starts at row 24 (8 train images per class); the victim is its third
    keep = [i for i in range(clean["num_images"]) if i != dropped]
    c_clean, l_clean = np.load(tmp_path / "clean" / "codes.npy"), np.load(tmp_path / "clean" / "labels.npy")
    c_bad, l_bad = np.load(tmp_path / "bad" / "codes.npy"), np.load(tmp_path / "bad" / "labels.npy")
    assert np.array_equal(l_bad, l_clean[keep]) and np.array_equal(c_bad, c_clean[keep])
    assert (l_bad == 3).sum() == 7


def test_token_dataset_reader(flip_run):
    out, meta = flip_run
    codes = np.load(out / "codes.npy")
    ds = TokenDataset(out, seed=3)
    assert len(ds) == 80 and ds.grid == (4, 4) and ds.vocab_sizes == [16, 64] and ds.num_classes == 10
    c, y = ds[5]
    assert c.dtype == torch.long and c.shape == (2, 16) and isinstance(y, int)
    assert any(torch.equal(c, torch.from_numpy(codes[5, a].astype(np.int64))) for a in range(2))
    # the augmentation is a function of (seed, epoch, index): repeatable, and it varies across epochs
    assert all(torch.equal(ds[i][0], ds[i][0]) for i in range(10))
    picks = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        picks.append([int(np.flatnonzero([torch.equal(ds[i][0], torch.from_numpy(codes[i, a].astype(np.int64)))
                                          for a in range(2)])[0]) for i in range(20)])
    assert len({tuple(p) for p in picks}) > 1 and 0 < np.mean(picks) < 1
    # an explicit generator drives the choice when given
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert all(torch.equal(ds.get(i, g1)[0], ds.get(i, g2)[0]) for i in range(20))
    fixed = TokenDataset(out, aug=1)
    assert torch.equal(fixed[7][0], torch.from_numpy(codes[7, 1].astype(np.int64)))
    with pytest.raises(ValueError):
        TokenDataset(out, aug=2)


def test_token_dataset_needs_complete_folder(tiny_data, vqs, tmp_path):
    tokenize(vqs["dual"], tiny_data, "train", tmp_path / "part", aug="flip", batch_size=8, chunk_size=8,
             max_chunks=1)
    with pytest.raises(FileNotFoundError, match="--resume"):
        TokenDataset(tmp_path / "part")


def test_bench_tokenize(tmp_path, capsys):
    import argparse

    from iar2.bench.tokenize import add_bench_arguments, run_bench

    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(["--images", "16", "--image-size", "16", "--batch-size", "8", "--augs", "none", "flip",
                         "--device", "cpu", "--out", str(tmp_path / "bench.json")])
    assert run_bench(args) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert [r["aug"] for r in res["results"]] == ["none", "flip"]
    assert all(r["images"] == 16 and r["images_per_s"] > 0 for r in res["results"])
    assert res["results"][0]["relative"] == 1.0
    assert "img/s" in capsys.readouterr().out


def test_cli_help():
    from iar2.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tokenize", "--help"])
    assert e.value.code == 0
