"""`iar2 ar import`: load released LlamaGen / IAR c2i GPTs and IAR2 GPTs into our models (and export back).

Inputs are torch.save files read with weights_only=True (the training `args` Namespace is the only class
allowed): a dict with "model" (or "ema", "module", "state_dict") or a bare state_dict (FSDP consolidated.pth).
Keys are mapped by name (checkpoint-formats.md §3, §5); rotary tables, causal masks and KV caches that
exported state_dicts may carry are dropped; the load is strict. The files do not record the token grid:
pass --grid (16 for *_256 files, 24 for *_384 and for every IAR2 file).

IAR2 checkpoints are loaded with rope_compat "iar2_official" by default, which reproduces the released code's
rotary table (every cell duplicated, indexed by position): the weights were trained with it. The paper's
model (rope_compat "none") is what our own training uses.
"""
from __future__ import annotations

import argparse
import logging
import re

import torch

from iar2.ar.gpt import SIZES
from iar2.ar.model import ARModel, ARModelConfig
from iar2.checkpoint import load_meta, load_weights, save_weights
from iar2.cli import nonneg_int, positive_int
from iar2.config import from_dict, to_dict
from iar2.io import atomic_path
from iar2.tokenizer.convert import read_original

log = logging.getLogger(__name__)

_DROP = re.compile(r"(^|\.)(freqs_cis|causal_mask)$|\.kv_cache\.|attn_record")

# original prefix -> ours (first match wins); keys not listed keep their names
_MAP = {
    "llamagen": [("cls_embedding.", "backbone.cls_embedding."), ("layers.", "backbone.layers.")],
    "iar2": [("cls_embedding.", "backbone.cls_embedding."), ("layers.", "backbone.layers."),
             ("factorized_blocks.", "head.blocks."), ("aggregation_layer.", "fusion."),
             ("output1.", "head.output1."), ("output2.", "head.output2."),
             ("mlp1.", "head.context.mlp1."), ("mlp2.", "head.context.mlp2.")],
}


def _rename(key: str, table) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def detect_format(sd: dict) -> str:
    return "iar2" if "tok_embeddings1.weight" in sd else "llamagen"


def infer_config(sd: dict, fmt: str, grid: int, num_classes: int | None = None, rope_compat: str | None = None,
                 cluster_size: int = 0, n_head: int | None = None) -> ARModelConfig:
    dim = sd["norm.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    # heads are not visible in the shapes: the released sizes have 64-channel heads
    n_head = n_head or next((v["n_head"] for v in SIZES.values() if v["dim"] == dim), max(1, dim // 64))
    rows = sd["cls_embedding.embedding_table.weight"].shape[0]
    ncls = num_classes or (rows - 1 if rows in (1001, 11) else rows)
    raw = dict(dim=dim, n_layer=n_layer, n_head=n_head, grid=grid, num_classes=ncls,
               class_dropout=0.1 if rows == ncls + 1 else 0.0)
    if fmt == "llamagen":
        raw.update(paradigm="single", vocab_size=sd["tok_embeddings.weight"].shape[0], cluster_size=cluster_size)
    else:
        head = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("factorized_blocks."))
        raw.update(paradigm="fused_hierarchical", semantic_size=sd["tok_embeddings1.weight"].shape[0],
                   detail_size=sd["tok_embeddings2.weight"].shape[0], head_layers=head,
                   local_context="compressed", context_source="official",
                   rope_compat=rope_compat or "iar2_official")
    return from_dict(ARModelConfig, raw)


def from_original(sd: dict, fmt: str) -> dict:
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}
    return {_rename(k, _MAP[fmt]): v for k, v in sd.items() if not _DROP.search(k)}


def to_original(sd: dict, fmt: str) -> dict:
    inverse = [(new, old) for old, new in _MAP[fmt]]
    return {_rename(k, inverse): v for k, v in sd.items()}


def import_checkpoint(src, out, grid: int, fmt: str = "auto", use_ema: bool = False, num_classes: int | None = None,
                      rope_compat: str | None = None, cluster_size: int = 0, n_head: int | None = None) -> ARModel:
    raw, info = read_original(src, use_ema=use_ema)
    fmt = detect_format(raw) if fmt == "auto" else fmt
    cfg = infer_config(raw, fmt, grid, num_classes, rope_compat, cluster_size, n_head)
    model = ARModel(cfg)
    model.load_state_dict(from_original(raw, fmt), strict=True)
    save_weights(out, model.state_dict(), {"model_config": to_dict(cfg), "imported_from": str(src), "format": fmt,
                                           "source_args": {k: str(v) for k, v in info["args"].items()}})
    log.info("imported %s (%s, %s, %.1fM params) -> %s", src, fmt, cfg.paradigm,
             sum(p.numel() for p in model.parameters()) / 1e6, out)
    return model.eval()


def export_original(src, out) -> None:
    """Our exported AR weights -> a .pt in the original layout ({"model": state_dict})."""
    meta = load_meta(src)
    cfg = from_dict(ARModelConfig, meta["model_config"])
    fmt = "llamagen" if cfg.paradigm == "single" else "iar2"
    if fmt == "iar2" and (cfg.paradigm != "fused_hierarchical" or cfg.local_context != "compressed"):
        raise ValueError(f"{src}: only fused_hierarchical models with compressed local context have an IAR2 layout")
    sd = to_original(load_weights(src), fmt)
    with atomic_path(out) as tmp:
        torch.save({"model": sd}, tmp)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="original checkpoint (.pt/.pth), or with --export-original our .safetensors")
    p.add_argument("out", help="output .safetensors (+ .json), or with --export-original the .pt to write")
    p.add_argument("--grid", type=positive_int, default=None,
                   help="token grid side: 16 for LlamaGen *_256, 24 for *_384 and all IAR2 files (required)")
    p.add_argument("--format", choices=["auto", "llamagen", "iar2"], default="auto",
                   help="layout (auto: iar2 if tok_embeddings1 exists; IAR GPTs are llamagen)")
    p.add_argument("--use-ema", action="store_true", help="take the 'ema' weights")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classes (default: from the class table)")
    p.add_argument("--n-head", type=positive_int, default=None,
                   help="attention heads (default: LlamaGen's for the width)")
    p.add_argument("--cluster-size", type=nonneg_int, default=0, help="IAR GPT: cluster size for the cluster CE (128)")
    p.add_argument("--rope-compat", choices=["none", "iar2_official"], default=None,
                   help="IAR2 files: rotary table of the released code (default) or the paper's")
    p.add_argument("--export-original", action="store_true", help="convert our weights back to the original layout")


def run(args: argparse.Namespace) -> int:
    if args.export_original:
        export_original(args.src, args.out)
        return 0
    if args.grid is None:
        raise SystemExit("iar2 ar import: --grid is required (16 for *_256 checkpoints, 24 for *_384 and IAR2)")
    import_checkpoint(args.src, args.out, args.grid, args.format, args.use_ema, args.num_classes,
                      args.rope_compat, args.cluster_size, args.n_head)
    return 0
