"""`iar2 diagnose`: conditional entropies, teacher-forced statistics of constructed models,
the conditional/unconditional gap of a model without class information, repetition and flatness measures, the
tokenizer and AR reports end to end on tiny models, and the training-budget summary."""
import json
import math

import numpy as np
import pytest
import torch

from iar2.checkpoint import save_weights
from iar2.config import to_dict
from iar2.diagnose import budget_report, conditional_entropy, constant_maps, flat_fraction, tokenizer_report
from iar2.diagnose_ar import (data_entropies, repetition_stats, sample_config, sample_set, teacher_forced,
                              unseen_rates)
from helpers import tiny_vq
from test_ar_model import tiny

# ----------------------------------------------------------------------------- histograms and entropies


def test_conditional_entropy_limits():
    y = np.repeat(np.arange(4), 8)
    assert conditional_entropy(y, y, 4, 4) == pytest.approx(0.0)  # X determined by Y
    x = np.tile(np.arange(8), 4)  # every x with every y equally often: independent and uniform
    assert conditional_entropy(x, y, 8, 4) == pytest.approx(math.log(8))


def test_data_entropies_see_a_detail_code_determined_by_the_semantic_code():
    k = np.tile(np.arange(4), (6, 1, 4))[:, 0]  # (6, 16): semantic codes 0..3 repeated
    codes = np.stack([k, (k * 3) % 10], axis=1)  # detail = f(semantic)
    e = data_entropies(codes, np.arange(6) % 2, [4, 10], 2)
    assert e["detail"]["entropy_given_semantic"] == pytest.approx(0.0)
    assert e["semantic"]["class_information"] == pytest.approx(0.0)  # every class has the same tokens
    own = data_entropies(np.repeat(np.arange(4), 16).reshape(4, 1, 16), np.arange(4), [4], 4)
    assert own["single"]["class_information"] == pytest.approx(math.log(4))  # the class fixes the token
    assert e["semantic"]["entropy"] == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------- maps and images


def test_repetition_of_constant_and_distinct_maps():
    const = np.zeros((2, 16), np.int64)
    r = repetition_stats(const, 4)
    assert r["equal_right"] == 1.0 and r["equal_below"] == 1.0 and r["top_token_share"] == 1.0
    assert r["distinct_fraction"] == pytest.approx(1 / 16)
    r = repetition_stats(np.arange(16)[None], 4)
    assert r["equal_right"] == 0.0 and r["distinct_fraction"] == 1.0 and r["top_token_share"] == pytest.approx(1 / 16)


def test_unseen_tokens_and_pairs():
    train = np.array([[[0, 1, 1, 0], [2, 2, 3, 3]]])  # semantic {0, 1}, detail {2, 3}; pairs (0,2) (1,2) (1,3) (0,3)
    sampled = np.array([[[0, 4, 1, 1], [2, 3, 0, 3]]])  # semantic 4 unseen; detail 0 unseen; pair (4,3) and (1,0)
    u = unseen_rates(sampled, train, [5, 4])
    assert u["semantic"] == 0.25 and u["detail"] == 0.25 and u["pair"] == 0.5


def test_flat_fraction_separates_constant_from_textured_images():
    flat = np.full((1, 8, 8, 3), 120, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)
    frac, std = flat_fraction(np.concatenate([flat, noise]))
    assert frac == 0.5 and std[0] == 0.0 and std[1] > 50


# ----------------------------------------------------------------------------- teacher-forced statistics


def _codes(paradigm, n=6, seed=0):
    g = np.random.default_rng(seed)
    if paradigm == "single":
        return g.integers(0, 24, (n, 1, 16)), g.integers(0, 5, n)
    return np.stack([g.integers(0, 6, (n, 16)), g.integers(0, 10, (n, 16))], axis=1), g.integers(0, 5, n)


@pytest.mark.parametrize("paradigm", ["single", "fused_hierarchical"])
def test_a_model_without_class_information_has_no_cond_uncond_gap(paradigm):
    codes, labels = _codes(paradigm)
    model = tiny(paradigm)
    with_class = teacher_forced(model, codes, labels)
    assert all(v["kl_cond_uncond"] > 1e-4 for v in with_class.values())  # random weights: the class matters
    with torch.no_grad():
        model.backbone.cls_embedding.embedding_table.weight.zero_()  # every class = the null class
    blind = teacher_forced(model, codes, labels)
    for v in blind.values():
        assert v["kl_cond_uncond"] == pytest.approx(0.0, abs=1e-6) and max(v["kl_by_row"]) == pytest.approx(0, abs=1e-5)
        assert v["ce"] == pytest.approx(v["ce_uncond"]) and v["top1_agree"] == 1.0
    # ... and then guidance cannot change a single sample
    lab = np.arange(5)
    t0, _ = _sample_tokens(model, lab, "none", 1.0)
    t3, _ = _sample_tokens(model, lab, "static", 3.0)
    assert np.array_equal(t0, t3)


def _sample_tokens(model, labels, mode, scale):
    class _NoDecode:  # sample_set decodes; the tokens are what this test compares
        def decode_indices(self, idx):
            return torch.zeros(idx.shape[0], 3, 2, 2)

    return sample_set(model, _NoDecode(), labels, sample_config(mode, scale, 1.0, 0))


@pytest.mark.parametrize("paradigm", ["single", "fused_hierarchical"])
def test_teacher_forced_accuracy_and_ce_of_a_uniform_model(paradigm):
    # zero output layers: uniform predictions, argmax = token 0, so top-1 accuracy = the share of zeros in the
    # targets and CE = ln V, exactly
    model = tiny(paradigm)
    with torch.no_grad():
        for name in ("output", "head.output1.2", "head.output2.2"):  # the last layers have no bias
            if _has(model, name):
                model.get_submodule(name).weight.zero_()
    codes, labels = _codes(paradigm)
    codes[:, :, :4] = 0  # a quarter of the tokens are 0 (random ones add their own zeros)
    res = teacher_forced(model, codes, labels)
    vocabs = {"single": 24, "semantic": 6, "detail": 10}
    for lvl, (name, v) in enumerate(res.items()):
        assert v["acc"] == pytest.approx((codes[:, lvl] == 0).mean())
        assert v["ce"] == pytest.approx(math.log(vocabs[name]), rel=1e-5)


def _has(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- tokenizer report


@pytest.fixture(scope="module")
def refnet(tmp_path_factory):
    """An untrained reference network: the report needs its features, not good ones."""
    from iar2.refnet import RefNet, RefNetConfig

    out = tmp_path_factory.mktemp("diag_refnet") / "refnet.safetensors"
    cfg = RefNetConfig(num_classes=10, input_size=32, widths=(8, 16, 32), norm_groups=4)
    torch.manual_seed(0)
    save_weights(out, RefNet(cfg).state_dict(), {"model_config": to_dict(cfg)})
    return out


def test_constant_maps_report_a_flat_decoder_as_flat():
    vq = tiny_vq("semantic_detail")
    with torch.no_grad():  # a decoder that ignores its input: every decode is one colour
        vq.decoder.conv_out.weight.zero_()
        vq.decoder.conv_out.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    codes = np.stack([np.zeros((2, 16), np.int64), np.full((2, 16), 7)], axis=1)  # semantic 0 always with detail 7
    rows, images = constant_maps(vq, codes, [16, 64], 4, "cpu")
    assert len(rows) == 2 * 16 and images.shape == (32, 16, 16, 3)
    assert all(r["pixel_std"] == 0.0 for r in rows)
    assert rows[0]["mean_rgb"] == [191.0, 64.0, 128.0]
    assert rows[1] == {**rows[1], "semantic": 0, "detail": 7, "what": "most frequent detail", "semantic_share": 1.0}


def test_tokenizer_report_on_a_dual_tokenizer(tiny_data, refnet, tmp_path):
    vq = tiny_vq("semantic_detail")
    path = tmp_path / "vq.safetensors"
    save_weights(path, vq.state_dict(), {"model_config": to_dict(vq.cfg), "image_size": 16})
    res, images = tokenizer_report(path, tiny_data, "val", refnet, max_images=10, device="cpu")
    assert set(res["levels"]) == {"semantic", "detail"} and res["num_images"] == 10
    for lvl in res["levels"].values():
        assert 1.0 <= lvl["perplexity"] <= lvl["codes_used"] <= lvl["size"]
    assert res["full_decode"]["rfid"] >= 0 and "semantic_decode" in res
    # the semantic-only decode drops the detail code: it differs from the full decode of the same indices
    assert res["full_decode"]["psnr"] != res["semantic_decode"]["psnr"]
    assert len(images) == 32


# ----------------------------------------------------------------------------- budget and CLI


def test_budget_counts_data_passes_and_the_late_loss_drop(tmp_path):
    tok = tmp_path / "tokens"
    tok.mkdir()
    (tok / "meta.json").write_text(json.dumps({"num_images": 100}))
    run = tmp_path / "results" / "ar" / "x"
    run.mkdir(parents=True)
    save_weights(run / "model.safetensors", {"w": torch.zeros(1)},
                 {"step": 50, "elapsed_s": 10.0, "params": 7, "model_config": {"paradigm": "single"},
                  "run_config": {"train": {"batch_size": 16, "tokens": str(tok)}}})
    (run / "metrics.csv").write_text("step,loss,token_ce\n10,5.0,5.0\n30,4.0,4.0\n50,3.0,3.0\n")
    res = budget_report(tmp_path / "results", ["x"], [])
    r = res["ar"]["x"]
    assert r["data_passes"] == pytest.approx(8.0) and r["seconds_per_step"] == pytest.approx(0.2)
    assert r["loss"]["loss"]["last_half_drop"] == pytest.approx(0.25)


def test_cli_help_and_budget_command(tmp_path, capsys):
    from iar2.cli import main

    with pytest.raises(SystemExit) as e:
        main(["diagnose", "ar", "--help"])
    assert e.value.code == 0 and "--heldout" in capsys.readouterr().out
    (tmp_path / "results").mkdir()
    assert main(["diagnose", "budget", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text()) == {"ar": {}, "tokenizers": {}}


# ----------------------------------------------------------------------------- joint tokens (side-by-side)


def test_joint_tokens_round_trip_through_token_dataset(tmp_path):
    from iar2.diagnose_ar import split_joint, write_joint_tokens
    from iar2.io import atomic_save_npy, atomic_write_json
    from iar2.tokenize import TokenDataset

    src = tmp_path / "dual"
    src.mkdir()
    g = np.random.default_rng(0)
    codes = np.stack([g.integers(0, 16, (5, 2, 16)), g.integers(0, 64, (5, 2, 16))], axis=2).astype(np.uint16)
    atomic_save_npy(src / "codes.npy", codes)
    atomic_save_npy(src / "labels.npy", np.arange(5, dtype=np.int32))
    atomic_write_json(src / "meta.json", {"codes_file": "codes.npy", "labels_file": "labels.npy", "grid": [4, 4],
                                          "vocab_sizes": [16, 64], "levels": ["semantic", "detail"],
                                          "shape": list(codes.shape), "num_classes": 5})
    meta = write_joint_tokens(src, tmp_path / "joint")
    assert meta["vocab_sizes"] == [1024] and meta["levels"] == ["single"]
    ds = TokenDataset(tmp_path / "joint", aug=1)
    t, y = ds[3]
    assert t.shape == (1, 16) and y == 3
    assert torch.equal(split_joint(t, 64)[0], torch.as_tensor(codes[3, 1].astype(np.int64)))


def test_a_single_codebook_model_on_joint_tokens_samples_decodable_pairs():
    from iar2.ar.model import ARModel, ARModelConfig
    from iar2.config import from_dict

    vq = tiny_vq("semantic_detail")  # 16 x 64 codes: joint vocabulary 1024
    torch.manual_seed(0)
    model = ARModel(from_dict(ARModelConfig, dict(dim=16, n_layer=1, n_head=2, paradigm="single", vocab_size=1024,
                                                  grid=4, num_classes=3))).eval()
    tokens, images = sample_set(model, vq, np.arange(3), sample_config("none", 1.0, 1.0, 0))
    assert tokens.shape == (3, 1, 16) and tokens.max() < 1024 and images.shape == (3, 16, 16, 3)


def test_flat_fraction_by_class():
    from iar2.diagnose_ar import flat_by_class

    assert flat_by_class(np.array([1.0, 50.0, 2.0, 3.0]), np.array([0, 0, 1, 1]), 3) == [0.5, 1.0, None]
