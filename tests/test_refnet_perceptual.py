"""The domain reference network and the perceptual distances (LPIPS-VGG from a local file, domain LPIPS)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import random_images
from iar2.perceptual import DomainLPIPS, LPIPSVGG, build_perceptual, unit_normalize
from iar2.refnet import RefNet, RefNetConfig, load_refnet, train_refnet

TINY = dict(input_size=32, widths=(8, 16, 32), norm_groups=4, batch_size=40)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("refnet") / "refnet.safetensors"
    meta = train_refnet(tiny_data, out, steps=60, seed=0, lr=3e-3, **TINY)
    return out, meta


def test_refnet_learns_above_chance(trained):
    path, meta = trained
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk["val_accuracy"] == meta["val_accuracy"]
    assert meta["num_val"] == 40 and meta["chance_accuracy"] == pytest.approx(0.1)
    assert meta["val_accuracy"] >= 0.3, meta  # chance is 0.1; held-out crops from unseen image regions


def test_refnet_training_deterministic(tiny_data, tmp_path):
    a = train_refnet(tiny_data, tmp_path / "a.safetensors", steps=4, seed=1, **TINY)
    b = train_refnet(tiny_data, tmp_path / "b.safetensors", steps=4, seed=1, **TINY)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a["val_accuracy"] == b["val_accuracy"]


def test_load_refnet_round_trip(trained, tiny_data):
    path, meta = trained
    net = load_refnet(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = random_images(3, 32, seed=0)
    assert net(x).shape == (3, 10) and net.pool_features(x).shape == (3, net.feature_dim) == (3, 32)
    maps = net.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [(3, 8, 32, 32), (3, 16, 16, 16), (3, 32, 8, 8)]
    # logits are the head applied to the pooled last feature map
    assert torch.allclose(net(x), net.head(maps[-1].mean(dim=(2, 3))), atol=1e-6)


def test_refnet_input_conventions():
    torch.manual_seed(0)
    net = RefNet(RefNetConfig(num_classes=4, input_size=16, widths=(8, 16), norm_groups=4)).eval()
    u = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(net.pool_features(u), net.pool_features(u.float() / 127.5 - 1), atol=1e-6)
    big = torch.rand(2, 3, 40, 40) * 2 - 1  # other sizes are resized to input_size for logits / features
    small = F.interpolate(big, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(net(big), net(small), atol=1e-6)
    assert net.feature_maps(big)[0].shape[-1] == 40  # feature maps: native resolution (for LPIPS)
    with pytest.raises(ValueError):
        net(torch.zeros(2, 1, 16, 16))


# ----------------------------------------------------------------------------- domain LPIPS

@pytest.fixture(scope="module")
def domain(trained):
    return build_perceptual("domain", domain_net=trained[0])


def test_domain_lpips_is_the_lpips_formula(domain, tiny_data):
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import eval_transform

    ds = ImageFolderDataset(tiny_data, "val", eval_transform(32))
    x = torch.stack([ds[i][0] for i in (0, 5, 10, 15)])
    y = torch.stack([ds[i][0] for i in (20, 25, 30, 35)])
    d = domain(x, y)
    assert d.shape == (4,)
    expect = torch.zeros(4)
    for fx, fy in zip(domain.net.feature_maps(x), domain.net.feature_maps(y)):
        nx = fx / fx.norm(dim=1, keepdim=True)
        ny = fy / fy.norm(dim=1, keepdim=True)
        expect += ((nx - ny) ** 2).sum(1).mean((1, 2))
    assert torch.allclose(d, expect, rtol=1e-4, atol=1e-6)
    assert torch.allclose(domain(x, x), torch.zeros(4), atol=1e-6)  # d(x, x) = 0
    assert torch.allclose(d, domain(y, x), atol=1e-6)  # symmetric


def test_domain_lpips_grows_with_noise(domain, tiny_data):
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import eval_transform

    ds = ImageFolderDataset(tiny_data, "val", eval_transform(32))
    x = torch.stack([ds[i][0] for i in range(0, 40, 4)])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    dists = [domain(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert dists[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_perceptual_is_frozen_but_passes_gradients(domain):
    x = random_images(2, 32, seed=3).requires_grad_(True)
    domain.train()  # a parent's .train() must not change it
    assert not domain.training and not domain.net.training
    domain(x, random_images(2, 32, seed=4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in domain.parameters())


def test_unit_normalize():
    f = torch.randn(2, 5, 3, 3)
    n = unit_normalize(f)
    assert torch.allclose(n.norm(dim=1), torch.ones(2, 3, 3), atol=1e-6)


def test_build_perceptual_kinds(trained):
    assert build_perceptual("none") is None
    assert isinstance(build_perceptual("domain", domain_net=load_refnet(trained[0])), DomainLPIPS)
    with pytest.raises(ValueError, match="domain_net"):
        build_perceptual("domain")
    with pytest.raises(ValueError, match="allowed values"):
        build_perceptual("alex")
    with pytest.raises(FileNotFoundError, match="iar2 refnet train"):
        build_perceptual("domain", domain_net=trained[0].with_name("missing.safetensors"))


# ----------------------------------------------------------------------------- LPIPS-VGG

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16 trunk saved as torchvision's vgg16-397923af.pth.

    Only the `features.*` entries (the part LPIPS uses) are written: the full state dict is 0.5 GB."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # exactly torchvision.models.vgg16().features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return home, path, state


@pytest.fixture()
def no_downloads(monkeypatch, tmp_path):
    import torch.hub
    import urllib.request

    def refuse(*a, **k):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # keep ~/.cache out of the search


def test_lpips_vgg_loads_local_weights(vgg_file, no_downloads, monkeypatch):
    import lpips

    home, path, state = vgg_file
    monkeypatch.setenv("TORCH_HOME", str(home))
    m = build_perceptual("lpips_vgg")
    assert isinstance(m, LPIPSVGG) and not m.training
    assert not any(p.requires_grad for p in m.parameters())
    assert torch.equal(m.lpips.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(m.lpips.net.slice5.state_dict()["28.bias"], state["features.28.bias"])
    # reference: lpips loading its own shipped linear weights (pnet_rand: no trunk download), same trunk
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    ref.net.load_state_dict(m.lpips.net.state_dict())
    for a, b in zip(m.lpips.lins.parameters(), ref.lins.parameters()):
        assert torch.equal(a, b)
    x, y = random_images(2, 32, seed=5), random_images(2, 32, seed=6)
    d = m(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, ref(x, y).flatten(), atol=1e-6)
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-7)


def test_lpips_vgg_from_weights_dir(vgg_file, no_downloads, monkeypatch, tmp_path):
    home, path, state = vgg_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    from iar2.weights import find_weight

    assert find_weight("vgg16", weights_dir=path.parent) == path


def test_lpips_vgg_missing_weights_error(no_downloads, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(FileNotFoundError) as e:
        build_perceptual("lpips_vgg", weights_dir=tmp_path / "wdir")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and "iar2 fetch-weights" in msg
    assert str(tmp_path / "wdir") in msg and str(tmp_path / "empty_home" / "hub" / "checkpoints") in msg
