"""Converters for released GPT checkpoints, on files the test writes in LlamaGen's and IAR2's documented layouts."""
import argparse

import pytest
import torch

from iar2.ar.convert import import_checkpoint, export_original, to_original
from iar2.ar.gpt import rope_2d_table
from iar2.ar.model import ARModel, ARModelConfig
from iar2.ar.train import load_ar
from iar2.config import from_dict

# the non-layer keys of each layout (checkpoint-formats.md §3.1 and §5.1)
LLAMAGEN_KEYS = {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight"}
LAYER_KEYS = {"attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
              "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"}
IAR2_KEYS = {"cls_embedding.embedding_table.weight", "norm.weight", "tok_embeddings1.weight", "tok_embeddings2.weight",
             "aggregation_layer.0.weight", "aggregation_layer.0.bias", "aggregation_layer.2.weight",
             "aggregation_layer.2.bias", "output1.0.weight", "output1.0.bias", "output1.2.weight", "output2.0.weight",
             "output2.0.bias", "output2.2.weight", "mlp1.0.weight", "mlp1.0.bias", "mlp1.2.weight", "mlp2.0.weight",
             "mlp2.0.bias", "mlp2.2.weight"}


class Evil:  # an arbitrary object: loading must refuse to unpickle it
    pass


def model(paradigm, **kw):
    raw = dict(dim=48, n_layer=2, n_head=4, paradigm=paradigm, vocab_size=32, semantic_size=8, detail_size=16,
               head_layers=2, grid=4, num_classes=10, class_dropout=0.1)
    raw.update(kw)
    torch.manual_seed(0)
    m = ARModel(from_dict(ARModelConfig, raw)).eval()
    for p in m.parameters():  # random everything (outputs are zero-initialised)
        torch.nn.init.normal_(p, std=0.1)
    return m


def write_original(path, sd, wrap=True):
    extra = {"freqs_cis": torch.zeros(17, 6, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(2, 4, 24, 12)}
    obj = {"model": {**sd, **extra}, "args": argparse.Namespace(gpt_model="GPT-B", image_size=256), "steps": 7} \
        if wrap else sd
    torch.save(obj, path)


def logits(m, tokens, labels):
    with torch.no_grad():
        return m(tokens, labels)


def test_llamagen_layout_round_trip(tmp_path):
    ours = model("single")
    orig = to_original(ours.state_dict(), "llamagen")
    layer_keys = {k.split(".", 2)[2] for k in orig if k.startswith("layers.")}
    assert set(orig) - {k for k in orig if k.startswith("layers.")} == LLAMAGEN_KEYS and layer_keys == LAYER_KEYS
    assert len(orig) == 4 + 7 * 2
    write_original(tmp_path / "c2i_T_256.pt", orig)
    imported = import_checkpoint(tmp_path / "c2i_T_256.pt", tmp_path / "gpt.safetensors", grid=4, n_head=4)
    tokens, labels = torch.randint(0, 32, (2, 16)), torch.tensor([1, 9])
    assert torch.equal(logits(ours, tokens, labels)["logits"], logits(imported, tokens, labels)["logits"])
    loaded = load_ar(tmp_path / "gpt.safetensors")
    assert torch.equal(logits(loaded, tokens, labels)["logits"], logits(ours, tokens, labels)["logits"])
    # and back to the original layout
    export_original(tmp_path / "gpt.safetensors", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)


def test_iar2_layout_round_trip_and_fsdp_bare_state_dict(tmp_path):
    ours = model("fused_hierarchical", rope_compat="iar2_official")
    orig = to_original(ours.state_dict(), "iar2")
    top = {k for k in orig if not k.startswith(("layers.", "factorized_blocks."))}
    assert top == IAR2_KEYS
    assert len(orig) == 7 * 2 + 7 * 2 + 20  # 7 per backbone layer, 7 per head block, 20 others (55 with 5 blocks)
    write_original(tmp_path / "consolidated.pth", orig, wrap=False)  # FSDP files are bare state_dicts
    imported = import_checkpoint(tmp_path / "consolidated.pth", tmp_path / "iar2.safetensors", grid=4, n_head=4)
    assert imported.cfg.rope_compat == "iar2_official" and imported.cfg.head_layers == 2
    k, j = torch.randint(0, 8, (2, 16)), torch.randint(0, 16, (2, 16))
    tokens, labels = torch.stack([k, j], 1), torch.tensor([0, 3])
    a, b = logits(ours, tokens, labels), logits(imported, tokens, labels)
    assert torch.equal(a["semantic"], b["semantic"]) and torch.equal(a["detail"], b["detail"])


def test_iar2_rope_quirk_repeats_every_cell():
    # released IAR2: row t >= 1 is LlamaGen's row 1 + floor((t - 1) / 2); row 0 stays zero
    grid, hd = 6, 16
    llama = rope_2d_table(grid, hd)
    m = model("fused_hierarchical", grid=grid, rope_compat="iar2_official", dim=64, n_head=4)
    table = m.backbone.rope
    assert table.shape[0] == 1 + grid * grid and torch.equal(table[0], torch.zeros_like(table[0]))
    for t in range(1, table.shape[0]):
        assert torch.equal(table[t], llama[1 + (t - 1) // 2])
    paper = model("fused_hierarchical", grid=grid, dim=64, n_head=4)
    assert torch.equal(paper.backbone.rope, llama)


def test_missing_file_and_unpickling_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        import_checkpoint(tmp_path / "nope.pt", tmp_path / "x.safetensors", grid=4)

    torch.save({"model": {"w": torch.zeros(1)}, "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        import_checkpoint(tmp_path / "evil.pt", tmp_path / "x.safetensors", grid=4)
