"""VQModel: LlamaGen VQ-16 shapes/counts, the documented forward order, index round trips, load_vq."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_VQ, random_images, tiny_vq
from iar2.checkpoint import save_weights
from iar2.config import ConfigError, from_dict, to_dict
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.vq_model import VQModel, count_parameters, load_vq

# ----------------------------------------------------------------------------- LlamaGen VQ-16 shapes

def test_default_config_is_llamagen_vq16():
    with torch.device("meta"):
        single = VQModel(VQModelConfig())
        dual = VQModel(VQModelConfig(quantizer="semantic_detail"))
    sd = single.state_dict()
    # LlamaGen: 344 entries = our 343 parameters + its `quantize.codebook_used` usage buffer (no parameter)
    assert len(sd) == 343 and count_parameters(single) == 71_883_403
    # IAR2: 346 entries = our 344 + two usage buffers; 71,787,147 parameters
    assert len(dual.state_dict()) == 344 and count_parameters(dual) == 71_787_147
    shapes = {  # spot checks from the documented key table
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.norm.weight": (512,),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "quantize.codebook.weight": (16384, 8),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("conv_blocks.4.downsample" in k or "conv_blocks.4.upsample" in k for k in sd)
    assert not any(k.startswith("encoder.conv_blocks.3.attn") or k.startswith("decoder.conv_blocks.1.attn")
                   for k in sd)
    assert sum(k.startswith("decoder.conv_blocks.2.res.") and k.endswith("conv1.weight") for k in sd) == 3


def test_config_rules():
    with pytest.raises(ConfigError, match="embed_dim"):
        from_dict(VQModelConfig, {**to_dict(VQModelConfig(**TINY_VQ)), "quantizer": "unassociated_dual",
                                  "embed_dim": 7})
    with pytest.raises(ConfigError, match="norm_groups"):
        from_dict(VQModelConfig, {"ch": 16, "norm_groups": 32})
    cfg = from_dict(VQModelConfig, to_dict(VQModelConfig(**TINY_VQ)))
    assert cfg == VQModelConfig(**TINY_VQ) and cfg.downsample == 4


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("quantizer,shape", [("single", (2, 4, 4)), ("semantic_detail", (2, 2, 4, 4)),
                                             ("unassociated_dual", (2, 2, 4, 4))])
def test_forward_and_index_round_trip(quantizer, shape):
    model = tiny_vq(quantizer)
    x = random_images(2)
    recon, q = model(x)
    assert recon.shape == x.shape and q.z_q.shape == (2, 8, 4, 4)
    assert model.grid(16) == 4
    idx = model.encode_indices(x)
    assert idx.shape == shape and torch.equal(idx, q.indices)
    # decoding the indices reproduces the forward pass exactly
    torch.testing.assert_close(model.decode_indices(idx), recon, rtol=0, atol=0)


def test_semantic_mode_reconstructs_from_the_semantic_code_only():
    model = tiny_vq("semantic_detail")
    x = random_images(2)
    recon_s, q_s = model(x, mode="semantic")
    idx = model.encode_indices(x)
    torch.testing.assert_close(model.decode_indices(idx, mode="semantic"), recon_s, rtol=0, atol=0)
    torch.testing.assert_close(model.decode_indices(idx[:, 0], mode="semantic"), recon_s, rtol=0, atol=0)
    # the detail code changes the reconstruction, so mode "full" differs
    assert not torch.allclose(model(x)[0], recon_s)
    with pytest.raises(ValueError):
        model.decode_indices(idx[:, 0])  # full mode needs (B, 2, h, w)


def test_codebook_vectors_are_the_lookup_vectors():
    single, dual, unassoc = tiny_vq("single"), tiny_vq("semantic_detail"), tiny_vq("unassociated_dual")
    torch.testing.assert_close(single.codebook_vectors(), F.normalize(single.quantize.codebook.weight, dim=-1))
    torch.testing.assert_close(dual.codebook_vectors("semantic"),
                               F.normalize(dual.quantize.semantic_codebook.weight, dim=-1))
    torch.testing.assert_close(dual.codebook_vectors("detail"), dual.quantize.detail_codebook.weight)
    assert unassoc.codebook_vectors("detail").shape == (64, 4)
    with pytest.raises(ValueError, match="level"):
        dual.codebook_vectors("single")
    with pytest.raises(ValueError, match="multiple"):
        single.grid(18)


def test_gradients_reach_encoder_decoder_and_codebooks():
    model = tiny_vq("semantic_detail").train()
    recon, q = model(random_images(2))
    (recon.pow(2).mean() + q.loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight",
                 "post_quant_conv.weight", "quantize.semantic_codebook.weight", "quantize.detail_codebook.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_dual_tokens_quantise_the_latent_more_finely_than_the_semantic_code():
    # single-vs-dual sanity at the model level: with a zero detail code available, adding the detail code never
    # moves the quantised latent further from the encoder's latent, and it usually moves it closer
    model = tiny_vq("semantic_detail")
    with torch.no_grad():
        model.quantize.detail_codebook.weight[0] = 0.0
        h = model.quant_conv(model.encoder(random_images(2)))
    z = F.normalize(h, dim=1)
    err_full = (model.quantize(h).z_q - z).pow(2).sum(1)
    err_sem = (model.quantize(h, mode="semantic").z_q - z).pow(2).sum(1)
    assert torch.all(err_full <= err_sem + 1e-6) and err_full.mean() < err_sem.mean()


# ----------------------------------------------------------------------------- load_vq

def test_load_vq_round_trip(tmp_path):
    model = tiny_vq("semantic_detail")
    path = tmp_path / "vq.safetensors"
    save_weights(path, model.state_dict(), {"model_config": to_dict(model.cfg)})
    for p in (path, path.with_suffix(".json")):
        loaded = load_vq(p)
        assert not loaded.training and loaded.cfg == model.cfg
        x = random_images(2)
        assert torch.equal(loaded.encode_indices(x), model.encode_indices(x))
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_vq(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- levels and metadata

@pytest.mark.parametrize("quantizer, names, sizes", [("single", ["single"], [64]),
                                                      ("semantic_detail", ["semantic", "detail"], [16, 64]),
                                                      ("unassociated_dual", ["semantic", "detail"], [16, 64])])
def test_levels_and_vocab_sizes_follow_the_index_layout(quantizer, names, sizes):
    model = tiny_vq(quantizer)
    assert model.level_names() == names and model.vocab_sizes() == sizes
    idx = model.encode_indices(random_images(2))
    levels = idx[:, None] if idx.dim() == 3 else idx  # (B, levels, h, w)
    assert levels.shape[1] == len(names)
    assert all(int(levels[:, i].max()) < v for i, v in enumerate(sizes))
    for name in names:  # the names are the levels codebook_vectors accepts
        assert model.codebook_vectors(name).shape[0] == sizes[names.index(name)]


def test_metadata_of_a_weights_file_and_a_checkpoint_folder(tmp_path):
    from helpers import save_tiny_vq
    from iar2.tokenizer.vq_model import default_image_size, vq_meta

    path = save_tiny_vq(tmp_path / "vq.safetensors", image_size=32)
    assert vq_meta(path)["image_size"] == 32 and default_image_size(path) == 32
    assert default_image_size(path.with_suffix(".json")) == 32
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "meta.json").write_text('{"config": {"data": {"image_size": 24}}}')
    assert default_image_size(folder) == 24
    assert vq_meta(tmp_path / "none.safetensors") == {} and default_image_size(tmp_path / "none.safetensors") is None
