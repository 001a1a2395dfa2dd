"""`iar2 vq import`: convert a released LlamaGen / IAR / IAR2 VQ tokenizer into this project's format (and back).

Supported inputs (torch.save files; loaded with weights_only=True, never unpickling code):
  llamagen  LlamaGen VQ-16 `vq_ds16_c2i.pt` and IAR's reordered VQ (same layout, permuted codebook rows):
            a dict {"model": state_dict, "ema"?: state_dict, "args": argparse.Namespace, ...} or a bare state_dict;
            codebook `quantize.embedding.weight` [N, 8] stored raw, normalised at lookup.
  iar2      IAR2's dual VQ `0485000.pt`: `quantize.embedding.weight` [256, 8] (semantic, normalised at lookup) and
            `quantize.embedding_second` [4096, 8] (detail, raw at lookup).
The encoder / decoder / quant_conv / post_quant_conv keys are identical to ours; only the codebook names differ and
the usage ring buffers `quantize.codebook_used*` are dropped. Our quantisers use the same lookup conventions
(semantic/single rows l2-normalised, detail rows raw), so an imported tokenizer decodes exactly as the original.
The model shape (ch, ch_mult, num_res_blocks, z_channels, embed_dim, codebook sizes) is read from the tensor
shapes; GroupNorm's group count is not recorded in a state_dict (LlamaGen always uses 32: --norm-groups).

`--export-original` goes the other way: our x.safetensors + x.json -> a .pt file in the original layout
({"model": state_dict}, usage buffers zero-filled), which the official code loads strictly.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
from pathlib import Path

import torch

from iar2.checkpoint import safe_torch_load, save_weights
from iar2.cli import positive_int
from iar2.config import from_dict, to_dict
from iar2.io import atomic_path
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.vq_model import VQModel, count_parameters, load_vq

log = logging.getLogger(__name__)

USAGE_BUFFER = 65536  # length of the official `codebook_used` ring buffers
_DROP = re.compile(r"^quantize\.codebook_used\d*$")
# original key -> our key, per format (all other keys are identical)
CODEBOOK_KEYS = {
    "llamagen": {"quantize.embedding.weight": "quantize.codebook.weight"},
    "iar2": {"quantize.embedding.weight": "quantize.semantic_codebook.weight",
             "quantize.embedding_second": "quantize.detail_codebook.weight"},
}
QUANTIZER_OF = {"llamagen": "single", "iar2": "semantic_detail"}


def read_original(path: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensor state_dict inside an original checkpoint file, plus {"args": training args or {}, "steps"}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (download the released tokenizer, e.g. LlamaGen's "
                                "vq_ds16_c2i.pt or IAR2's 0485000.pt, and pass its path)")
    # The training scripts store their argparse.Namespace under "args": allow exactly that class, nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = safe_torch_load(path)
    info = {"args": {}, "steps": None}
    if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace):
        info["args"] = vars(obj["args"])
    if isinstance(obj, dict) and isinstance(obj.get("steps"), int):
        info["steps"] = obj["steps"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        if use_ema:
            if not isinstance(obj.get("ema"), dict):
                raise KeyError(f"{path}: --use-ema given but the checkpoint has no 'ema' entry "
                               f"(top-level keys: {', '.join(sorted(map(str, obj)))})")
            sd = obj["ema"]
        else:
            sd = obj["model"]
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        if use_ema:
            raise KeyError(f"{path}: --use-ema given but the file is a bare state_dict")
        sd = obj
    else:
        raise ValueError(f"{path}: not a VQ checkpoint (expected a dict with 'model' or a bare state_dict)")
    # DDP / torch.compile wrappers, should a re-saved file carry them
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}
    return sd, info


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    if "quantize.embedding_second" in sd:
        return "iar2"
    if "quantize.embedding.weight" in sd:
        return "llamagen"
    raise ValueError("cannot tell the checkpoint format: no quantize.embedding.weight / quantize.embedding_second "
                     "key; pass --format")


def infer_config(sd: dict[str, torch.Tensor], fmt: str, norm_groups: int = 32, args: dict | None = None
                 ) -> VQModelConfig:
    """The VQModelConfig whose model has exactly the shapes of `sd` (an original-layout state_dict)."""
    args = args or {}
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    res = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    ch_mult = [sd[f"encoder.conv_blocks.{lvl}.res.0.conv1.weight"].shape[0] // ch for lvl in levels]
    raw = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": len(res),
           "z_channels": sd["encoder.conv_out.weight"].shape[0], "embed_dim": sd["quant_conv.weight"].shape[0],
           "norm_groups": norm_groups, "quantizer": QUANTIZER_OF[fmt]}
    if "codebook_l2_norm" in args:
        raw["l2_norm"] = bool(args["codebook_l2_norm"])
    if "commit_loss_beta" in args:
        raw["beta"] = float(args["commit_loss_beta"])
    if fmt == "llamagen":
        raw["codebook_size"] = sd["quantize.embedding.weight"].shape[0]
    else:
        raw["semantic_size"] = sd["quantize.embedding.weight"].shape[0]
        raw["detail_size"] = sd["quantize.embedding_second"].shape[0]
    return from_dict(VQModelConfig, raw, "model_config")


def from_original(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rename an original-layout state_dict into ours (usage buffers dropped)."""
    names = CODEBOOK_KEYS[fmt]
    return {names.get(k, k): v for k, v in sd.items() if not _DROP.match(k)}


def to_original(sd: dict[str, torch.Tensor], quantizer: str) -> dict[str, torch.Tensor]:
    """Our state_dict in the original layout, with zero-filled usage buffers so the official code loads it strictly."""
    fmt = {v: k for k, v in QUANTIZER_OF.items()}.get(quantizer)
    if fmt is None:
        raise ValueError(f"quantizer {quantizer!r} has no original layout (only 'single' -> LlamaGen and "
                         "'semantic_detail' -> IAR2)")
    back = {v: k for k, v in CODEBOOK_KEYS[fmt].items()}
    out = {back.get(k, k): v for k, v in sd.items()}
    out["quantize.codebook_used"] = torch.zeros(USAGE_BUFFER)
    if fmt == "iar2":
        out["quantize.codebook_used2"] = torch.zeros(USAGE_BUFFER)
    return out


def import_checkpoint(src: str | Path, out: str | Path, fmt: str = "auto", use_ema: bool = False,
                      norm_groups: int = 32) -> VQModelConfig:
    """Convert `src` (original layout) into `out` (.safetensors + .json); returns the model config."""
    sd, info = read_original(src, use_ema)
    if fmt == "auto":
        fmt = detect_format(sd)
    log.info("importing %s as %s (%d entries%s)", src, fmt, len(sd), ", EMA weights" if use_ema else "")
    cfg = infer_config(sd, fmt, norm_groups, info["args"])
    ours = from_original(sd, fmt)
    model = VQModel(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    wrong = sorted(k for k in set(expected) & set(ours) if expected[k].shape != ours[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{src} does not match a {fmt} VQ model: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, wrong shape {wrong[:8]}")
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    meta = {"model_config": to_dict(cfg),
            "source": {"path": str(src), "format": fmt, "use_ema": use_ema, "sha256": _sha256(src),
                       "steps": info["steps"], "entries": len(sd)}}
    save_weights(out, model.state_dict(), meta)
    log.info("wrote %s (%s, %.2fM params) and its .json", out, cfg.quantizer, count_parameters(model) / 1e6)
    return cfg


def export_original(src: str | Path, out: str | Path) -> None:
    """Our weights file -> a .pt file {"model": state_dict} in the LlamaGen / IAR2 layout."""
    model = load_vq(src)
    sd = to_original({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.cfg.quantizer)
    with atomic_path(out) as tmp:
        torch.save({"model": sd}, tmp)
    log.info("wrote %s (%d entries, %s layout)", out, len(sd),
             "LlamaGen" if model.cfg.quantizer == "single" else "IAR2")


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("src", help="original checkpoint (.pt), or with --export-original our .safetensors file")
    p.add_argument("out", help="output .safetensors (a .json with the model config is written beside it), "
                              "or with --export-original the .pt file to write")
    p.add_argument("--format", choices=["auto", "llamagen", "iar2"], default="auto",
                   help="checkpoint layout (auto: iar2 if quantize.embedding_second exists, else llamagen; "
                        "IAR's reordered VQ is llamagen)")
    p.add_argument("--use-ema", action="store_true", help="take the 'ema' weights instead of 'model'")
    p.add_argument("--norm-groups", type=positive_int, default=32,
                   help="GroupNorm groups of the source model (LlamaGen: 32)")
    p.add_argument("--export-original", action="store_true",
                   help="convert our weights back into the original layout instead")


def run(args: argparse.Namespace) -> int:
    if args.export_original:
        export_original(args.src, args.out)
    else:
        import_checkpoint(args.src, args.out, args.format, args.use_ema, args.norm_groups)
    return 0
