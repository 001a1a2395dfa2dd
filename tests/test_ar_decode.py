"""Models that decode themselves: predict_step equals the teacher-forced forward, Backbone.step returns the
attention to the class token, and the sampler drives any model through the public step API alone."""
import math
from contextlib import contextmanager

import pytest
import torch

from iar2.ar.generate import SamplingConfig, generate
from iar2.ar.gpt import Backbone, BackboneConfig, apply_rope, init_weights
from iar2.ar.pag_cfg import GuidanceConfig
from test_ar_model import PARADIGMS, tiny, tokens_for

VARIANTS = [(p, {}) for p in PARADIGMS] + [("fused_hierarchical", dict(local_context="none")),
                                           ("fused_hierarchical", dict(context_source="token")),
                                           ("fused_hierarchical", dict(local_context="concat"))]


def forward_logits(model, out, level, cell):
    if model.cfg.paradigm == "single":
        return out["logits"][:, cell]
    return out["semantic" if level == 0 else "detail"][:, cell]


@pytest.mark.parametrize("paradigm,kw", VARIANTS)
@pytest.mark.parametrize("kv_cache", [True, False])
def test_predict_step_gives_the_teacher_forced_forward_logits_at_every_position(paradigm, kw, kv_cache):
    model = tiny(paradigm, **kw)
    labels = torch.tensor([1, 3])
    toks = tokens_for(model)
    with torch.no_grad():
        full = model(toks, labels)
        pairs = toks if paradigm != "single" else toks[:, None]
        with model.decoding(labels, kv_cache, class_attn_layer=0) as state:
            for level, cell in model.decode_order():
                logits, attn = model.predict_step(state, level)
                ref = forward_logits(model, full, level, cell)
                assert torch.allclose(logits.float(), ref, atol=1e-5), (level, cell)
                assert attn.shape == (2, model.cfg.n_head)
                model.append_token(state, level, pairs[:, level, cell])
    # the caches are gone after the decode
    assert all(layer.attention.kv_cache is None for layer in model.backbone.layers)


def reference_class_attention(bb: Backbone, h_in: torch.Tensor, layer: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of `layer` over a full causal forward, computed here from its weights: (B, H, S)."""
    seen = {}

    def keep_input(module, args, out):
        seen["x"] = args[0]

    hook = bb.layers[layer].attention.register_forward_hook(keep_input)
    rope = bb.rope[: h_in.shape[1]]
    h = h_in
    for blk in bb.layers:
        h, _ = blk(h, rope)
    hook.remove()
    x = seen["x"]
    B, S, _ = x.shape
    att = bb.layers[layer].attention
    q, k, _ = att.wqkv(x).view(B, S, 3, att.n_head, att.head_dim).unbind(2)
    q, k = apply_rope(q, rope).transpose(1, 2), apply_rope(k, rope).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)[..., 0]


@pytest.mark.parametrize("layer", [0, -1])
def test_backbone_step_returns_the_attention_to_the_class_token(layer):
    cfg = BackboneConfig(dim=32, n_layer=3, n_head=4, grid=3, num_classes=5, class_dropout=0.1, token_dropout=0,
                         resid_dropout=0, ffn_dropout=0)
    torch.manual_seed(0)
    bb = Backbone(cfg)
    init_weights(bb)
    bb.eval()
    labels = torch.tensor([0, 2, 5])
    x = torch.cat([bb.label_embed(labels)[:, None], torch.randn(3, 9, 32)], 1)
    ref = reference_class_attention(bb, x, layer % cfg.n_layer)
    with torch.no_grad():
        h, whole = bb.step(x, 0, class_attn_layer=layer)  # no caches: the whole sequence at once
        assert torch.allclose(whole, ref, atol=1e-6)
        assert torch.allclose(h, bb(labels, x[:, 1:]), atol=1e-6)
        assert bb.step(x, 0)[1] is None  # nothing asked, nothing computed
        bb.setup_caches(3)
        steps = [bb.step(x[:, t:t + 1], t, class_attn_layer=layer)[1] for t in range(x.shape[1])]
        bb.clear_caches()
    assert torch.allclose(torch.cat(steps, 2), ref, atol=1e-6)
    assert torch.allclose(ref[:, :, 0], torch.ones(3, 4))  # the class token sees only itself


class Bigram:
    """A model with nothing but the public step API: the next token is (previous + class) mod V, certain when
    conditional, uniform when unconditional; two levels, detail = semantic + 1."""
    V, M = 7, 5

    def __init__(self):
        self.null_class = 99

    def eval(self):
        return self

    def decode_order(self):
        return [(lvl, i) for i in range(self.M) for lvl in (0, 1)]

    @contextmanager
    def decoding(self, labels, kv_cache=True, class_attn_layer=None):
        yield {"labels": labels, "prev": torch.zeros_like(labels), "attn": class_attn_layer is not None}

    def predict_step(self, state, level):
        nxt = (state["prev"] + (1 if level else state["labels"])) % self.V
        logits = torch.nn.functional.one_hot(nxt, self.V).float() * 50
        logits[state["labels"] == self.null_class] = 0.0
        attn = torch.full((len(nxt), 2), 0.5) if state["attn"] else None
        return logits, attn

    def append_token(self, state, level, tokens):
        state["prev"] = tokens


@pytest.mark.parametrize("mode", ["none", "static", "pag"])
def test_the_sampler_drives_a_model_through_the_step_api_alone(mode):
    labels = torch.tensor([1, 2, 3])
    sc = SamplingConfig(guidance=GuidanceConfig(mode=mode, scale=2.0, semantic=(1.5, 2.0), detail=(1.5, 2.0)),
                        seed=0)
    toks = generate(Bigram(), labels, torch.arange(3), sc)
    assert toks.shape == (3, 2, Bigram.M)
    prev = torch.zeros(3, dtype=torch.long)
    for i in range(Bigram.M):
        k = (prev + labels) % Bigram.V
        assert torch.equal(toks[:, 0, i], k)
        prev = (k + 1) % Bigram.V
        assert torch.equal(toks[:, 1, i], prev)


# ----------------------------------------------------------------------------- static caches, compiled step

def decode_logits(model, labels, pairs, **kw):
    """Every predict_step's logits of a teacher-forced decode through the step API, stacked in decode order."""
    out = []
    with model.decoding(labels, True, class_attn_layer=0, **kw) as state:
        for level, cell in model.decode_order():
            logits, attn = model.predict_step(state, level)
            out += [logits.float(), attn]
            model.append_token(state, level, pairs[:, level, cell])
    return out


@pytest.mark.parametrize("paradigm,kw", VARIANTS)
def test_static_caches_give_the_prefix_caches_logits_and_ignore_stale_entries(paradigm, kw):
    """The static form (full-length caches, the position as a tensor, keys past it masked) computes what the
    prefix-read caches compute, at every position; its caches outlive the decode and whatever an earlier decode
    left in them (here: large random values) changes nothing."""
    model = tiny(paradigm, **kw)
    labels = torch.tensor([1, 3])
    toks = tokens_for(model)
    pairs = toks if paradigm != "single" else toks[:, None]
    with torch.no_grad():
        ref = decode_logits(model, labels, pairs)
        first = decode_logits(model, labels, pairs, static=True)
        caches = [layer.attention.kv_cache for layer in model.backbone.layers]
        assert all(c is not None for c in caches)  # kept for the next decode of as many rows
        for c in caches:
            c.k.normal_(0, 100.0)
            c.v.normal_(0, 100.0)
        second = decode_logits(model, labels, pairs, static=True)
        assert [layer.attention.kv_cache for layer in model.backbone.layers] == caches  # the same buffers
    for a, b, c in zip(ref, first, second):
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(a, c, atol=1e-5)


def test_static_decoding_needs_the_kv_caches():
    model = tiny("single")
    with pytest.raises(ValueError, match="kv_cache"):
        with model.decoding(torch.tensor([1]), kv_cache=False, static=True):
            pass


@pytest.mark.parametrize("paradigm", ["single", "fused_hierarchical"])
def test_the_compiled_step_is_one_graph_for_the_whole_decode_and_samples_the_same_tokens(paradigm, monkeypatch):
    """compile: true traces the backbone step once (fullgraph: no graph break; static shapes: no recompile at a
    new position) and samples the eager tokens. The trace runs through AOTAutograd (functionalised in-place
    cache writes, as inductor and CUDA graphs see them) with the aot_eager backend, so no C++ compiler is needed."""
    torch._dynamo.reset()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "mode": None, "backend": "aot_eager"}))
    from torch._dynamo.utils import counters
    counters.clear()
    model = tiny(paradigm)
    labels = torch.tensor([1, 3, 0])
    for mode in ("static", "pag"):
        g = GuidanceConfig(mode=mode, scale=2.0, semantic=(1.5, 2.5), detail=(1.5, 2.5))
        eager = generate(model, labels, torch.arange(3), SamplingConfig(guidance=g, seed=4))
        compiled = generate(model, labels, torch.arange(3), SamplingConfig(guidance=g, seed=4, compile=True))
        assert torch.equal(eager, compiled)
    # one graph per class-attention setting (static CFG reads none, PAG one layer): not one per position
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
