"""Class-conditional AR image models: every prediction paradigm on one backbone, chosen by config.

paradigm            tokens                  sequence             prediction
single              one codebook            m (+ class)          one softmax (LlamaGen); + cluster CE (IAR)
alternating         (k, j) pairs            2m: k1 j1 k2 j2 ...  semantic at even, detail at odd outputs
grouped             (k, j) pairs            2m: k1..km j1..jm    semantic for the first m, then detail
fused_independent   (k, j) pairs, fused     m                    two parallel MLP heads on h
fused_hierarchical  (k, j) pairs, fused     m                    local-context AR head: k, then j | k (IAR2)

Token fusion (Eq. 12): h_i = MLP([Emb_s(k_i); Emb_d(j_i)]). Losses: Eq. 14 for pairs
(s * CE_semantic + CE_detail), IAR's token CE + lambda * cluster CE for a rearranged single codebook.

Decoding: the model decodes itself. `decoding()` opens a DecodeState (with KV caches), `predict_step` gives the
logits of the next token in `decode_order()`, `append_token` takes the pick; the sampler (iar2/ar/generate.py)
only loops, guides and picks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from iar2.ar.gpt import SIZES, Backbone, BackboneConfig, RMSNorm, compute_dtype, init_weights
from iar2.ar.local_context_head import SemanticDetailHead, _mlp
from iar2.config import ConfigError

Paradigm = Literal["single", "alternating", "grouped", "fused_independent", "fused_hierarchical"]


@dataclass
class ARModelConfig:
    size: Literal["custom", "B", "L", "XL", "XXL"] = "custom"  # a LlamaGen size overrides dim/n_layer/n_head
    dim: int = field(default=768, metadata={"min": 8})
    n_layer: int = field(default=12, metadata={"min": 1})
    n_head: int = field(default=12, metadata={"min": 1})
    paradigm: Paradigm = "fused_hierarchical"
    vocab_size: int = field(default=16384, metadata={"min": 2})  # single codebook
    semantic_size: int = field(default=256, metadata={"min": 2})
    detail_size: int = field(default=4096, metadata={"min": 2})
    cluster_size: int = field(default=0, metadata={"min": 0})  # IAR: > 0 adds the cluster-oriented CE
    cluster_weight: float = field(default=1.0, metadata={"min": 0.0})  # lambda
    semantic_weight: float = field(default=1.0, metadata={"min": 0.0})  # s of Eq. 14
    head_layers: int = field(default=5, metadata={"min": 1})
    local_context: Literal["compressed", "concat", "none"] = "compressed"
    context_source: Literal["official", "token"] = "official"
    grid: int = field(default=16, metadata={"min": 1})
    num_classes: int = field(default=1000, metadata={"min": 1})
    class_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    token_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    resid_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    ffn_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    # "iar2_official" reproduces the released IAR2 checkpoints' rotary quirk (see README); "none" is the paper's model
    rope_compat: Literal["none", "iar2_official"] = "none"

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.size != "custom":
            for k, v in SIZES[self.size].items():
                setattr(self, k, v)
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ConfigError(f"{p}n_head: {self.n_head} must divide dim {self.dim} into heads of a multiple of 4 "
                              "channels (2D rotary embedding)")
        if self.cluster_size and (self.paradigm != "single" or self.vocab_size % self.cluster_size):
            raise ConfigError(f"{p}cluster_size: {self.cluster_size} needs paradigm 'single' and must divide "
                              f"vocab_size {self.vocab_size}")

    @property
    def dual(self) -> bool:
        return self.paradigm != "single"

    def backbone(self) -> BackboneConfig:
        layout = {"alternating": "interleaved", "grouped": "grouped"}.get(self.paradigm, "raster")
        return BackboneConfig(dim=self.dim, n_layer=self.n_layer, n_head=self.n_head, num_classes=self.num_classes,
                              class_dropout=self.class_dropout, token_dropout=self.token_dropout,
                              resid_dropout=self.resid_dropout, ffn_dropout=self.ffn_dropout,
                              grid=self.grid, layout=layout, rope_compat=self.rope_compat)


@dataclass
class DecodeState:
    """What one generation carries from step to step (made by ARModel.decoding). Its rows are whatever the
    caller decodes: for classifier-free guidance, conditional and unconditional rows alike."""
    labels: torch.Tensor  # (R,) class of each row
    kv_cache: bool
    class_attn_layer: int | None  # backbone layer whose attention to the class token predict_step returns
    next_input: torch.Tensor  # (R, D) embedding fed at the next backbone step: the class token, then tokens
    pos: int = 0  # next backbone position
    inputs: list[torch.Tensor] = field(default_factory=list)  # without KV caches: every embedding fed so far
    h: torch.Tensor | None = None  # (R, D) backbone output of this step (a fused step's two levels share it)
    class_attn: torch.Tensor | None = None  # (R, H) this step's attention to the class token, per head
    semantic: torch.Tensor | None = None  # fused: the semantic token picked this step
    states: torch.Tensor | None = None  # local context: backbone outputs so far, (R, cells + 1, D)
    ctx: torch.Tensor | None = None  # local context of this step's cell (read by both levels)
    ctx_zero: torch.Tensor | None = None  # the local context's out-of-grid feature, computed once
    step_fn: Callable | None = None  # static caches: the backbone step to call (compiled or not) with tensor positions


class ARModel(nn.Module):
    def __init__(self, cfg: ARModelConfig):
        super().__init__()
        self.cfg = cfg
        bc = cfg.backbone()
        self.backbone = Backbone(bc)
        self.norm = RMSNorm(cfg.dim, bc.norm_eps)
        D = cfg.dim
        if cfg.paradigm == "single":
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, D)
            self.output = nn.Linear(D, cfg.vocab_size, bias=False)
        else:
            self.tok_embeddings1 = nn.Embedding(cfg.semantic_size, D)  # semantic
            self.tok_embeddings2 = nn.Embedding(cfg.detail_size, D)  # detail
            if cfg.paradigm in ("alternating", "grouped"):
                self.output1 = nn.Linear(D, cfg.semantic_size, bias=False)
                self.output2 = nn.Linear(D, cfg.detail_size, bias=False)
            else:
                self.fusion = _mlp(2 * D, 4 * D, D, bias_out=True)  # Eq. 12
                if cfg.paradigm == "fused_independent":
                    self.output1 = _mlp(D, 2 * D, cfg.semantic_size)
                    self.output2 = _mlp(D, 2 * D, cfg.detail_size)
                else:
                    self.head = SemanticDetailHead(bc, cfg.head_layers, cfg.semantic_size, cfg.detail_size,
                                                   cfg.local_context, cfg.context_source)
        init_weights(self)
        self._zero_init_outputs()

    def _zero_init_outputs(self):
        # LlamaGen/IAR2: the last projection to logits starts at zero (uniform first predictions)
        for name in ("output", "output1", "output2"):
            m = getattr(self, name, None)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
            elif isinstance(m, nn.Sequential):
                nn.init.zeros_(m[2].weight)
        if hasattr(self, "head"):
            self.head.zero_init_outputs()

    # ------------------------------------------------------------------ embeddings
    def embed_pairs(self, k: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Fused patch embeddings h_i = MLP([Emb_s(k_i); Emb_d(j_i)]) (Eq. 12)."""
        return self.fusion(torch.cat([self.tok_embeddings1(k), self.tok_embeddings2(j)], dim=-1))

    def context_states(self, H: torch.Tensor) -> torch.Tensor:
        """Per-cell states the local window reads (see LocalContext.source)."""
        if self.cfg.context_source == "official":
            return H
        return torch.cat([H[:, 1:], H[:, -1:]], dim=1)  # row q: the output that has seen token q

    # ------------------------------------------------------------------ training forward
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        """Teacher-forced logits. tokens: (B, m) for single, (B, 2, m) [semantic, detail] otherwise.

        Returns a dict of logits aligned with the targets: "logits" (B, m, V) or "semantic" (B, m, Vs)
        and "detail" (B, m, Vd).
        """
        cfg = self.cfg
        if cfg.paradigm == "single":
            H = self.backbone(labels, self.tok_embeddings(tokens[:, :-1]), generator)
            return {"logits": self.output(self.norm(H)).float()}
        k, j = tokens[:, 0], tokens[:, 1]
        m = k.shape[1]
        if cfg.paradigm == "alternating":
            e = torch.stack([self.tok_embeddings1(k), self.tok_embeddings2(j)], dim=2).flatten(1, 2)  # k1 j1 k2 j2
            H = self.norm(self.backbone(labels, e[:, :-1], generator))
            return {"semantic": self.output1(H[:, 0::2]).float(), "detail": self.output2(H[:, 1::2]).float()}
        if cfg.paradigm == "grouped":
            e = torch.cat([self.tok_embeddings1(k), self.tok_embeddings2(j)], dim=1)  # k1..km j1..jm
            H = self.norm(self.backbone(labels, e[:, :-1], generator))
            return {"semantic": self.output1(H[:, :m]).float(), "detail": self.output2(H[:, m:]).float()}
        H = self.backbone(labels, self.embed_pairs(k, j)[:, :-1], generator)  # (B, m, D)
        if cfg.paradigm == "fused_independent":
            Hn = self.norm(H)
            return {"semantic": self.output1(Hn).float(), "detail": self.output2(Hn).float()}
        ctx = self.head.context(self.context_states(H)) if self.head.use_context else None
        sem, det = self.head(H, ctx, self.tok_embeddings1(k), self.norm)
        return {"semantic": sem, "detail": det}

    # ------------------------------------------------------------------ decoding, one token at a time
    @property
    def null_class(self) -> int | None:
        """The unconditional class that classifier-free guidance needs (None: trained without class dropout)."""
        return self.cfg.num_classes if self.cfg.class_dropout > 0 else None

    def decode_order(self) -> list[tuple[int, int]]:
        """(level, cell) of every token in the order they are sampled (level 0: semantic or the single token)."""
        M, p = self.cfg.grid ** 2, self.cfg.paradigm
        if p == "single":
            return [(0, i) for i in range(M)]
        if p == "grouped":
            return [(lvl, i) for lvl in (0, 1) for i in range(M)]
        return [(lvl, i) for i in range(M) for lvl in (0, 1)]  # alternating and fused: k_i then j_i

    @contextmanager
    def decoding(self, labels: torch.Tensor, kv_cache: bool = True, class_attn_layer: int | None = None,
                 static: bool = False, compile: bool = False) -> Iterator[DecodeState]:
        """A decode of rows of class `labels` (R,): KV caches for its length, dropped on exit.

        static: the backbone's caches have one shape for the whole decode (full length, masked) and are kept
        for the next decode of as many rows, so every backbone step is the same graph. compile (implies static):
        that step runs under torch.compile, with CUDA graphs on a GPU (the gpt-fast approach); the head and
        the picking stay eager."""
        hier = self.cfg.paradigm == "fused_hierarchical"
        dtype = compute_dtype(self)
        static = static or compile
        state = DecodeState(labels, kv_cache, class_attn_layer, next_input=self.backbone.label_embed(labels))
        if hier and self.head.use_context:  # a constant of the weights: once per decode, not per cell
            state.ctx_zero = self.head.context.zero_feature(labels.new_zeros(1, self.cfg.dim, dtype=dtype))
        if static and not kv_cache:
            raise ValueError("static or compiled decoding needs the KV caches (kv_cache: true)")
        try:
            if kv_cache:
                self.backbone.setup_caches(len(labels), reuse=static)
                if hier:
                    self.head.setup_cache(len(labels), dtype, labels.device)
            if static:
                state.step_fn = self.compiled_step() if compile else self.backbone.step
            yield state
        finally:
            if not static:
                self.backbone.clear_caches()
            if hier:
                self.head.clear_cache()

    def compiled_step(self) -> Callable:
        """The backbone's static-cache step under torch.compile, made once per model (compiling takes seconds
        to minutes). On CUDA mode "reduce-overhead" replays the step as a CUDA graph (the launch overhead of
        hundreds of small kernels per token is what bounds a small-batch decode there)."""
        fn = self.__dict__.get("_compiled_step")
        if fn is None:
            device = next(self.parameters()).device
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            fn = torch.compile(self.backbone.step, mode=mode, fullgraph=True, dynamic=False)
            self.__dict__["_compiled_step"] = fn  # not a submodule or a state_dict entry
        return fn

    def predict_step(self, state: DecodeState, level: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (R, V) of the next token in decode_order, which is at `level`, and the backbone's attention
        to the class token at this step ((R, H); None unless decoding() asked for a layer)."""
        p = self.cfg.paradigm
        if level == 0 or p in ("alternating", "grouped"):  # a fused step's detail level reuses its backbone output
            self._backbone_step(state)
        h = state.h
        if p == "single":
            logits = self.output(self.norm(h))
        elif p in ("alternating", "grouped", "fused_independent"):
            logits = (self.output1 if level == 0 else self.output2)(self.norm(h))
        elif level == 0:
            if self.head.use_context:
                cell = state.pos - 1
                if state.states is None:
                    state.states = h.new_zeros(h.shape[0], self.cfg.grid ** 2 + 1, h.shape[1])
                state.states[:, cell] = h
                states = state.states if self.cfg.context_source == "official" else state.states[:, 1:]
                state.ctx = self.head.context(states, cell=cell, zero=state.ctx_zero)[:, 0]
            logits = self.head.predict_semantic(h, state.ctx, self.norm)
        else:
            logits = self.head.predict_detail(h, state.ctx, self.tok_embeddings1(state.semantic), self.norm)
        return logits, state.class_attn

    def append_token(self, state: DecodeState, level: int, tokens: torch.Tensor) -> None:
        """Give the model the tokens (R,) just picked at `level`; they are fed at the next backbone step."""
        p = self.cfg.paradigm
        if p == "single":
            state.next_input = self.tok_embeddings(tokens)
        elif p in ("alternating", "grouped"):
            state.next_input = (self.tok_embeddings1 if level == 0 else self.tok_embeddings2)(tokens)
        elif level == 0:
            state.semantic = tokens
        else:
            state.next_input = self.embed_pairs(state.semantic, tokens)

    def _backbone_step(self, state: DecodeState) -> None:
        if state.step_fn is not None:  # static caches: the position as a tensor, so every step is one graph
            pos = torch.tensor([state.pos], device=state.labels.device)
            h, attn = state.step_fn(state.next_input[:, None], pos, state.class_attn_layer)
            h, attn = h.clone(), None if attn is None else attn.clone()  # a CUDA graph reuses its output buffers
        elif state.kv_cache:
            h, attn = self.backbone.step(state.next_input[:, None], state.pos, state.class_attn_layer)
        else:  # the whole sequence again (the reference the cached path must equal)
            state.inputs.append(state.next_input)
            h, attn = self.backbone.step(torch.stack(state.inputs, 1), 0, state.class_attn_layer)
        state.pos += 1
        state.h = h[:, -1]
        state.class_attn = None if attn is None else attn[:, :, -1]

    # ------------------------------------------------------------------ losses
    def loss(self, out: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Eq. 14 for pairs; token CE (+ lambda * cluster CE, IAR) for a single codebook."""
        cfg = self.cfg
        if cfg.paradigm == "single":
            logits = out["logits"]
            tok = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
            parts = {"token_ce": tok.detach()}
            total = tok
            if cfg.cluster_size:
                cl = cluster_cross_entropy(logits, tokens, cfg.cluster_size)
                parts["cluster_ce"] = cl.detach()
                total = tok + cfg.cluster_weight * cl
            return total, parts
        sem = F.cross_entropy(out["semantic"].flatten(0, 1), tokens[:, 0].flatten())
        det = F.cross_entropy(out["detail"].flatten(0, 1), tokens[:, 1].flatten())
        return cfg.semantic_weight * sem + det, {"semantic_ce": sem.detach(), "detail_ce": det.detach()}


def cluster_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """IAR's cluster-oriented CE: cluster logit = logsumexp of its tokens' logits; target = token // m."""
    V = logits.shape[-1]
    cl = logits.reshape(*logits.shape[:-1], V // cluster_size, cluster_size).logsumexp(-1)
    return F.cross_entropy(cl.flatten(0, -2), (targets // cluster_size).flatten())


def count_parameters(cfg: ARModelConfig) -> int:
    """Parameter count without allocating (meta device), so the 1.5B model can be counted anywhere."""
    with torch.device("meta"):
        model = ARModel(cfg)
    return sum(p.numel() for p in model.parameters())
