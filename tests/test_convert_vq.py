"""`iar2 vq import`: checkpoints in the documented LlamaGen / IAR2 layouts import exactly, export back, and decode
like an independent implementation of the documented conventions."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_VQ, random_images, tiny_vq
from iar2.cli import main
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.convert import import_checkpoint, to_original
from iar2.tokenizer.vq_model import VQModel, count_parameters, load_vq

G = TINY_VQ["norm_groups"]


def write_original(path, model: VQModel, ema: VQModel | None = None) -> dict:
    """A training checkpoint as the official scripts write it: dict with model/optimizer/steps/args(/ema)."""
    sd = to_original(model.state_dict(), model.cfg.quantizer)
    obj = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "steps": 1234,
           "args": argparse.Namespace(codebook_l2_norm=True, commit_loss_beta=0.25, vq_model="VQ-16")}
    if ema is not None:
        obj["ema"] = to_original(ema.state_dict(), ema.cfg.quantizer)
    torch.save(obj, path)
    return sd


# ----------------------------------------------------------------------------- an independent reference
# Written from the documented conventions of the original layout (checkpoint-formats.md §2.2 / §4), on the raw
# original-layout state_dict, without using any of our modules.

def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _gn_swish(sd, p, x):
    h = F.group_norm(x, G, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    return h * torch.sigmoid(h)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", _gn_swish(sd, p + ".norm1", x), padding=1)
    h = _conv(sd, p + ".conv2", _gn_swish(sd, p + ".norm2", h), padding=1)
    return (_conv(sd, p + ".nin_shortcut", x) if p + ".nin_shortcut.weight" in sd else x) + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = F.group_norm(x, G, sd[p + ".norm.weight"], sd[p + ".norm.bias"], eps=1e-6)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)  # query i attends to key j
    return x + _conv(sd, p + ".proj_out", torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww))


def _blocks(sd, prefix):
    return sorted({int(k.split(".")[len(prefix.split("."))]) for k in sd if k.startswith(prefix + ".")})


def _level(sd, p, h):
    for r in _blocks(sd, p + ".res"):
        h = _res(sd, f"{p}.res.{r}", h)
        if f"{p}.attn.{r}.q.weight" in sd:
            h = _attn(sd, f"{p}.attn.{r}", h)
    if p + ".downsample.conv.weight" in sd:
        h = _conv(sd, p + ".downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    if p + ".upsample.conv.weight" in sd:
        h = _conv(sd, p + ".upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"), padding=1)
    return h


def reference_encode(sd, x):
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for lvl in _blocks(sd, "encoder.conv_blocks"):
        h = _level(sd, f"encoder.conv_blocks.{lvl}", h)
    h = _attn(sd, "encoder.mid.1", _res(sd, "encoder.mid.0", h))
    h = _res(sd, "encoder.mid.2", h)
    h = _conv(sd, "encoder.conv_out", _gn_swish(sd, "encoder.norm_out", h), padding=1)
    z = F.normalize(_conv(sd, "quant_conv", h).permute(0, 2, 3, 1), dim=-1)  # BHWC, l2 on
    e1 = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    k = torch.cdist(z.double(), e1.double()).argmin(-1)
    if "quantize.embedding_second" not in sd:
        return k
    j = torch.cdist((z - e1[k]).double(), sd["quantize.embedding_second"].double()).argmin(-1)  # E2 raw
    return torch.stack([k, j], dim=1)


def reference_decode(sd, idx):
    e1 = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    zq = e1[idx[:, 0]] + sd["quantize.embedding_second"][idx[:, 1]] if idx.dim() == 4 else e1[idx]
    h = _conv(sd, "post_quant_conv", zq.permute(0, 3, 1, 2))
    h = _conv(sd, "decoder.conv_in", h, padding=1)
    h = _res(sd, "decoder.mid.2", _attn(sd, "decoder.mid.1", _res(sd, "decoder.mid.0", h)))
    for k in _blocks(sd, "decoder.conv_blocks"):
        h = _level(sd, f"decoder.conv_blocks.{k}", h)
    return _conv(sd, "decoder.conv_out", _gn_swish(sd, "decoder.norm_out", h), padding=1)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("quantizer,fmt,n_keys", [("single", "llamagen", 1), ("semantic_detail", "iar2", 2)])
def test_import_is_exact_and_matches_the_reference(tmp_path, quantizer, fmt, n_keys):
    src = tiny_vq(quantizer)
    sd = write_original(tmp_path / "orig.pt", src)
    # the documented layout: our parameters + the usage ring buffer(s), IAR2's detail codebook without ".weight"
    assert len(sd) == len(src.state_dict()) + n_keys
    assert sd["quantize.codebook_used"].shape == (65536,)
    if fmt == "iar2":
        assert sd["quantize.embedding_second"].shape == (64, 8) and "quantize.codebook_used2" in sd
    cfg = import_checkpoint(tmp_path / "orig.pt", tmp_path / "ours.safetensors", norm_groups=G)
    unused = ("semantic_size", "detail_size") if quantizer == "single" else ("codebook_size",)
    assert cfg == dataclasses.replace(src.cfg, **{f: getattr(cfg, f) for f in unused})
    ours = load_vq(tmp_path / "ours.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = random_images(2)
    idx = ours.encode_indices(x)
    assert torch.equal(idx, src.encode_indices(x))
    torch.testing.assert_close(ours.decode_indices(idx), src.decode_indices(idx), rtol=0, atol=0)
    # an independent implementation of the original conventions agrees on codes and pixels
    with torch.no_grad():
        assert torch.equal(reference_encode(sd, x), idx)
        torch.testing.assert_close(reference_decode(sd, idx), ours.decode_indices(idx), rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "ours.json").read_text())
    assert meta["source"]["format"] == fmt and meta["source"]["steps"] == 1234


def test_use_ema_and_export_round_trip(tmp_path):
    model, ema = tiny_vq("semantic_detail", 0), tiny_vq("semantic_detail", 1)
    write_original(tmp_path / "orig.pt", model, ema=ema)
    sd_ema = to_original(ema.state_dict(), "semantic_detail")
    assert main(["vq", "import", str(tmp_path / "orig.pt"), str(tmp_path / "ema.safetensors"),
                 "--use-ema", "--norm-groups", str(G), "--format", "iar2"]) == 0
    loaded = load_vq(tmp_path / "ema.safetensors")
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.state_dict().items())
    # back to the original layout: the very same tensors under the very same keys
    assert main(["vq", "import", str(tmp_path / "ema.safetensors"), str(tmp_path / "back.pt"),
                 "--export-original"]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    assert set(back) == set(sd_ema) and all(torch.equal(back[k], sd_ema[k]) for k in back)


def test_bare_state_dict_and_format_detection(tmp_path):
    src = tiny_vq("single")
    torch.save(to_original(src.state_dict(), "single"), tmp_path / "bare.pt")
    cfg = import_checkpoint(tmp_path / "bare.pt", tmp_path / "ours.safetensors", norm_groups=G)
    assert cfg.quantizer == "single" and cfg.codebook_size == 64


def test_rejects_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        import_checkpoint(tmp_path / "nope.pt", tmp_path / "x.safetensors")
    src = tiny_vq("single")
    sd = to_original(src.state_dict(), "single")
    sd.pop("decoder.conv_out.bias")
    torch.save({"model": sd}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        import_checkpoint(tmp_path / "broken.pt", tmp_path / "x.safetensors", norm_groups=G)
    with pytest.raises(KeyError, match="ema"):
        import_checkpoint(tmp_path / "broken.pt", tmp_path / "x.safetensors", use_ema=True, norm_groups=G)
    with pytest.raises(ValueError, match="original layout"):
        to_original(tiny_vq("unassociated_dual").state_dict(), "unassociated_dual")
    assert not (tmp_path / "x.safetensors").exists()


class _Payload:  # any class other than argparse.Namespace must be refused (weights_only loading)
    pass


def test_never_unpickles_arbitrary_objects(tmp_path):
    sd = to_original(tiny_vq("single").state_dict(), "single")
    torch.save({"model": sd, "evil": _Payload()}, tmp_path / "evil.pt")
    from iar2.checkpoint import CheckpointError
    from iar2.cli import main

    with pytest.raises(CheckpointError, match="_Payload") as e:
        import_checkpoint(tmp_path / "evil.pt", tmp_path / "x.safetensors", norm_groups=G)
    assert "weights_only=False" not in str(e.value) and "weights_only set to False" not in str(e.value)
    # the command line says it in one line, without a traceback
    assert main(["vq", "import", str(tmp_path / "evil.pt"), str(tmp_path / "y.safetensors")]) == 4


def test_default_llamagen_and_iar2_layout_counts():
    # the documented totals: LlamaGen VQ-16 344 entries / 71,883,403 params; IAR2 dual 346 / 71,787,147
    for quantizer, entries, params in (("single", 344, 71_883_403), ("semantic_detail", 346, 71_787_147)):
        with torch.device("meta"):
            model = VQModel(VQModelConfig(quantizer=quantizer))
            sd = to_original(model.state_dict(), quantizer)
        assert len(sd) == entries and count_parameters(model) == params
        assert sum(v.numel() for k, v in sd.items() if "codebook_used" not in k) == params
