"""Transforms, the built-in dataset, and the ImageFolder (class order, bad images, check reports)."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iar2.cli import main as cli_main
from iar2.data import imagefolder as imf
from iar2.data.builtin import CATALOGUE, crop_side_range, make_builtin, split_region
from iar2.data.imagefolder import (DatasetError, ImageFolderDataset, find_classes, scan_imagefolder,
                                   write_class_index)
from iar2.data.transforms import (center_crop_arr, eval_transform, random_crop_arr, to_tensor, to_uint8,
                                  train_transform)


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- transforms

def test_center_crop_matches_adm_recipe():
    img = _noise_image(128, 96)
    out = center_crop_arr(img, 32)
    # direct computation: 96 >= 2*32 -> one BOX halving to 64x48; 48 < 64 stops; bicubic to short side 32
    half = img.resize((64, 48), Image.BOX)
    res = np.asarray(half.resize((round(64 * 32 / 48), 32), Image.BICUBIC))  # (32, 43)
    left = (res.shape[1] - 32) // 2
    np.testing.assert_array_equal(out, res[:, left:left + 32])
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("wh", [(32, 32), (40, 33), (33, 200), (300, 64), (17, 20)])
def test_center_crop_sizes(wh):
    assert center_crop_arr(_noise_image(*wh), 32).shape == (32, 32, 3)


def test_eval_transform_range_and_layout():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, 16:] = 255
    arr[0, 0] = (10, 20, 30)
    x = eval_transform(32)(Image.fromarray(arr))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 20, 30]) / 127.5 - 1)  # CHW, channels in RGB order


def test_uint8_round_trip():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    t = to_tensor(arr)
    assert t.min() == -1 and t.max() == 1
    np.testing.assert_array_equal(to_uint8(t).permute(1, 2, 0).numpy(), arr)


def test_train_transform_deterministic_by_generator():
    img, t = _noise_image(80, 60, 1), train_transform(32, crop_min=0.5, flip=True)
    a, b = t(img, _gen(3)), t(img, _gen(3))
    assert torch.equal(a, b) and a.shape == (3, 32, 32) and -1 <= a.min() and a.max() <= 1
    outs = {t(img, _gen(s)).sum().item() for s in range(8)}
    assert len(outs) > 1  # different seeds give different crops


def test_random_crop_covers_the_requested_fraction():
    # an image whose short side equals the target: with crop_min=1 the crop is the centre-cropped image
    img = _noise_image(48, 32, 2)
    for s in range(5):
        arr = random_crop_arr(img, 32, 1.0, 1.0, _gen(s))
        left = [x for x in range(17) if np.array_equal(arr, np.asarray(img)[:, x:x + 32])]
        assert len(left) == 1  # a pure translation: no resampling when the short side already fits
    # with crop_min=0.5 the short side is first resized to a random length in [32, ceil(32 / 0.5)]


def test_random_crop_scale_range(monkeypatch):
    from iar2.data import transforms

    lens, real = [], transforms._resize_short
    monkeypatch.setattr(transforms, "_resize_short", lambda im, short: lens.append(short) or real(im, short))
    img = _noise_image(48, 32, 2)
    for s in range(60):
        assert random_crop_arr(img, 32, 0.5, 1.0, _gen(s)).shape == (32, 32, 3)
    assert min(lens) >= 32 and max(lens) <= math.ceil(32 / 0.5) and len(set(lens)) > 10
    lens.clear()
    for s in range(20):
        random_crop_arr(img, 30, 0.8, 1.0, _gen(s))
    assert set(lens) <= set(range(30, math.ceil(30 / 0.8) + 1))  # LlamaGen's 0.8-1.0


def test_flip_only_flips():
    arr = np.asarray(_noise_image(32, 32, 4))
    t = train_transform(32, crop_min=1.0, flip=True)
    seen = set()
    for s in range(12):
        out = to_uint8(t(Image.fromarray(arr), _gen(s))).permute(1, 2, 0).numpy()
        if np.array_equal(out, arr):
            seen.add("same")
        elif np.array_equal(out, arr[:, ::-1]):
            seen.add("flipped")
        else:
            raise AssertionError("output is neither the image nor its mirror")
    assert seen == {"same", "flipped"}


# ----------------------------------------------------------------------------- built-in dataset

def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_builtin_deterministic_by_seed(tmp_path):
    a = make_builtin(tmp_path / "a", num_classes=10, train_per_class=2, val_per_class=1, size=16, seed=5)
    b = make_builtin(tmp_path / "b", num_classes=10, train_per_class=2, val_per_class=1, size=16, seed=5)
    c = make_builtin(tmp_path / "c", num_classes=10, train_per_class=2, val_per_class=1, size=16, seed=6)
    ta, tb, tc = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    assert ta == tb
    assert set(ta) == set(tc) and ta != tc
    # a class's images depend only on (seed, class, split): more classes leave existing ones unchanged
    d = make_builtin(tmp_path / "d", num_classes=12, train_per_class=2, val_per_class=1, size=16, seed=5)
    td = _tree_bytes(d)
    assert all(td[k] == v for k, v in ta.items() if k.endswith(".png"))
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_builtin_layout(tiny_data):
    classes = json.loads((tiny_data / "classes.json").read_text())["classes"]
    assert len(classes) == 10 and classes == sorted(classes) == sorted(c.name for c in CATALOGUE[:10])
    for split, n in (("train", 8), ("val", 4)):
        assert sorted(p.name for p in (tiny_data / split).iterdir()) == classes
        for c in classes:
            files = sorted((tiny_data / split / c).glob("*.png"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.size == (32, 32) and im.mode == "RGB"


@pytest.mark.parametrize("shape", [(512, 512), (300, 451), (640, 427), (872, 1000), (660, 550)])
def test_builtin_train_val_regions_disjoint(shape):
    t, v = split_region(shape, "train"), split_region(shape, "val")
    mask = np.zeros(shape, np.int8)
    for top, left, h, w in (t, v):
        mask[top:top + h, left:left + w] += 1
    assert mask.max() == 1 and mask.min() == 1  # a partition: disjoint and covering
    lo, hi = crop_side_range(shape)
    assert 8 <= lo <= hi <= min(v[2], v[3]) and hi <= min(t[2], t[3])  # every crop fits either region


# ----------------------------------------------------------------------------- ImageFolder

def test_dataset_items_and_class_order(tiny_data):
    ds = ImageFolderDataset(tiny_data, "val", eval_transform(32))
    assert len(ds) == 40 and ds.num_bad == 0
    assert ds.classes == sorted(ds.classes) and ds.targets == sorted(ds.targets)
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 1 and -1 <= x.min() and x.max() <= 1


def test_dataset_augmentation_reproducible(tiny_data):
    ds = ImageFolderDataset(tiny_data, "train", train_transform(32, 0.5, True), seed=3)
    a, b = ds[7][0], ds[7][0]
    assert torch.equal(a, b)
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], a)  # a new epoch, new augmentations
    other = ImageFolderDataset(tiny_data, "train", train_transform(32, 0.5, True), seed=3)
    other.set_epoch(1)
    assert torch.equal(other[7][0], ds[7][0])  # a function of (seed, epoch, index) only


def test_write_class_index(tiny_data, tmp_path):
    path = write_class_index(tiny_data, tmp_path / "classes.json")
    assert json.loads(path.read_text())["classes"] == find_classes(tiny_data)


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    _noise_image(32, 32, seed).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    _noise_image(64, 64, seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def dirty_data(tiny_data, tmp_path) -> Path:
    """tiny_data with four broken files added to train/ (garbage, truncated PNG, truncated JPEG, empty)."""
    root = tmp_path / "dirty"
    shutil.copytree(tiny_data, root)
    (root / "train" / "cat" / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (root / "train" / "cat" / "zz_truncated.png").write_bytes(_png_bytes(1)[:300])
    (root / "train" / "coffee" / "truncated.jpg").write_bytes(_jpeg_bytes(2)[:1200])
    (root / "train" / "moon" / "empty.jpeg").write_bytes(b"")
    return root


BROKEN = {"cat/garbage.png", "cat/zz_truncated.png", "coffee/truncated.jpg", "moon/empty.jpeg"}


def test_scan_counts_bad_images(dirty_data):
    res = scan_imagefolder(dirty_data, "train")
    assert set(res.bad) == BROKEN and all(res.bad.values())
    assert len(res.good) == 80 and len(res.samples) == 84
    summary = res.summary()
    assert summary["num_bad"] == 4 and summary["per_class"]["cat"] == {"good": 8, "bad": 2}


def test_dataset_excludes_bad_images(dirty_data):
    ds = ImageFolderDataset(dirty_data, "train", eval_transform(32), verify=True)
    assert len(ds) == 80 and ds.num_bad == 4 and set(ds.bad_files) == BROKEN
    # without a check, a bad file met at load time is replaced by the next sample, deterministically
    lazy = ImageFolderDataset(dirty_data, "train", eval_transform(32))
    rels = [rel for rel, _ in lazy.samples]
    i = rels.index("cat/garbage.png")
    j = next(k for k in range(i + 1, len(rels)) if rels[k] not in BROKEN)  # skips cat/zz_truncated.png too
    assert j == i + 2
    x, y = lazy[i]
    assert torch.equal(x, lazy[j][0]) and y == lazy.samples[j][1]


def test_check_report_reused_without_decoding(dirty_data, tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    assert cli_main(["data", "check", "--root", str(dirty_data), "--out", str(out), "--workers", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["splits"]["train"]["num_bad"] == 4 and report["splits"]["val"]["num_bad"] == 0
    assert {b["path"] for b in report["bad"]} == BROKEN
    assert all(b["reason"] and b["split"] == "train" for b in report["bad"])

    def no_decoding(path):
        raise AssertionError("the report should make decoding unnecessary")

    monkeypatch.setattr(imf, "verify_image", no_decoding)
    ds = ImageFolderDataset(dirty_data, "train", eval_transform(32), report=out)
    assert len(ds) == 80 and ds.num_bad == 4
    # a report of a folder that has changed since is refused
    (dirty_data / "train" / "cat" / "new.png").write_bytes(_png_bytes(9))
    with pytest.raises(DatasetError, match="rerun `iar2 data check"):
        ImageFolderDataset(dirty_data, "train", report=out)


def test_scan_in_worker_processes(dirty_data):
    assert set(scan_imagefolder(dirty_data, "train", workers=2, chunksize=8).bad) == BROKEN


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "train" / "apples").mkdir(parents=True)
    (tmp_path / "train" / "pears").mkdir(parents=True)
    _noise_image(8, 8).save(tmp_path / "train" / "apples" / "a.png")
    (tmp_path / "train" / "pears" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"pears"):
        ImageFolderDataset(tmp_path, "train")


def test_missing_or_empty_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="iar2 data builtin"):
        ImageFolderDataset(tmp_path, "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolderDataset(tmp_path, "val")


def test_class_index_must_match_folders(tiny_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_data, root)
    shutil.rmtree(root / "train" / "moon")
    with pytest.raises(DatasetError, match="moon"):
        ImageFolderDataset(root, "train")


def test_iterating_a_dataset_ends(tiny_data):
    from iar2.data.imagefolder import ImageFolderDataset

    ds = ImageFolderDataset(tiny_data, "val", None)
    assert sum(1 for _ in ds) == len(ds) == 40


def test_one_per_sample_generator_for_images_and_tokens(tiny_data, tmp_path):
    """Both datasets draw from sample_generator; its seeds are those the datasets used before it was shared."""
    from iar2.data.transforms import sample_generator
    from iar2.tokenize import TokenDataset
    from helpers import make_tokens

    # (seed, epoch, index) -> the generator's seed, as recorded before the two copies became one
    assert sample_generator(0, 0, 0).initial_seed() == 12750949206108985319
    assert sample_generator(3, 1, 17).initial_seed() == 16286222169794638651
    images = ImageFolderDataset(tiny_data, "train", seed=3)
    tokens = TokenDataset(make_tokens(tmp_path / "tok"), seed=3)
    for ds in (images, tokens):
        ds.set_epoch(1)
        assert ds.generator(17).initial_seed() == 16286222169794638651
