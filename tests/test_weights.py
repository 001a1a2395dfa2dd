"""Pretrained-weight registry: search order, clear errors, atomic checked downloads (file:// URLs only)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from iar2 import weights
from iar2.cli import main as cli_main
from iar2.weights import REGISTRY, WeightFile, download, find_weight, search_dirs, torch_home


@pytest.fixture()
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path


def _put(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REGISTRY[name].filename).write_bytes(b"x")
    return folder / REGISTRY[name].filename


def test_registry_names():
    assert REGISTRY["inception"].filename == "weights-inception-2015-12-05-6726825d.pth"
    assert REGISTRY["vgg16"].filename == "vgg16-397923af.pth"
    for w in REGISTRY.values():  # torch hub convention: the name carries the sha256 prefix
        assert w.sha256_prefix in w.filename and w.url.endswith(w.filename)


def test_search_order(env):
    home_cache = _put(env / "home" / ".cache" / "torch" / "hub" / "checkpoints", "inception")
    assert find_weight("inception") == home_cache
    th = _put(env / "th" / "hub" / "checkpoints", "inception")
    assert find_weight("inception") == th
    wd = _put(env / "wd", "inception")
    assert find_weight("inception", weights_dir=env / "wd") == wd
    assert search_dirs(env / "wd") == [env / "wd", env / "th" / "hub" / "checkpoints",
                                      env / "home" / ".cache" / "torch" / "hub" / "checkpoints"]


def test_torch_home_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert torch_home() == tmp_path / "xdg" / "torch"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    assert torch_home() == tmp_path / "t"


def test_missing_weight_error(env):
    with pytest.raises(FileNotFoundError) as e:
        find_weight("inception", weights_dir=env / "wd")
    msg = str(e.value)
    assert REGISTRY["inception"].filename in msg and "iar2 fetch-weights --only inception" in msg
    for d in search_dirs(env / "wd"):
        assert str(d) in msg
    with pytest.raises(KeyError, match="registered"):
        find_weight("alexnet")


def _local_weight(tmp_path: Path, payload: bytes, prefix: str | None = None) -> WeightFile:
    src = tmp_path / "src" / "w-file.pth"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    return WeightFile("local", "w-file.pth", src.as_uri(), prefix or digest[:8], "test")


def test_download_checks_hash_and_is_atomic(tmp_path):
    w = _local_weight(tmp_path, b"weights" * 1000)
    out = download(w, tmp_path / "dest")
    assert out.read_bytes() == b"weights" * 1000
    bad = _local_weight(tmp_path, b"other", prefix="00000000")
    with pytest.raises(OSError, match="sha256"):
        download(bad, tmp_path / "dest2")
    assert not (tmp_path / "dest2" / "w-file.pth").exists()
    assert not [p for p in (tmp_path / "dest2").iterdir()]  # no temporary left behind


def test_fetch_weights_skips_present_files(env, monkeypatch):
    _put(env / "th" / "hub" / "checkpoints", "vgg16")

    def refuse(*a, **k):
        raise AssertionError("should not download a file that is present")

    monkeypatch.setattr(weights, "download", refuse)
    assert cli_main(["fetch-weights", "--only", "vgg16"]) == 0
