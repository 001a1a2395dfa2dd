"""`iar2 diagnose ar`: the AR half of the issue-16 diagnosis (see iar2/diagnose.py).

Teacher-forced (eval mode, centre-crop tokens): per level, the cross-entropy and top-1 accuracy with the true class
and with the null class, and KL(p_cond || p_uncond), overall, at the first token and per grid row. A class-conditional
model whose KL is ~0 at a level (or past the first rows) ignores the class there, so guidance cannot move it. The data's entropies put the CEs in scale: the unigram entropy
H(level) (a model that learned only the marginal reaches it), H(level | class), and for pairs H(detail | semantic).

Sampled (iar2.ar.generate, decoded by iar2.sample.decode_to_uint8): for each configuration (T = 1 without guidance,
static CFG at the given scales) the reference network's class accuracy and mean p(label | image), the fraction of
flat images, token repetition (equal raster neighbours, distinct tokens per image, the most frequent token's share),
the fraction of tokens / pairs never seen in training, I(token; class) against the data's, and FID / precision /
recall (iar2.generation_metrics). A single-codebook model on a dual tokenizer's joint tokens (write_joint_tokens)
is decoded by splitting each token back into its pair.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iar2.ar.generate import SamplingConfig, generate
from iar2.ar.pag_cfg import GuidanceConfig
from iar2.cli import nonneg_float, nonneg_int, positive_float, positive_int
from iar2.diagnose import FLAT_STD, conditional_entropy, entropy_of, flat_fraction, save_tiles
from iar2.distributed import pick_device
from iar2.generation_metrics import evaluate_samples
from iar2.io import atomic_save_npy, atomic_write_json, read_json
from iar2.reject_sampling import Scorer
from iar2.sample import decode_to_uint8
from iar2.tokenize import TokenDataset
from iar2.tokenizer.vq_model import load_vq

log = logging.getLogger(__name__)


def level_names(model) -> list[str]:
    return ["single"] if model.cfg.paradigm == "single" else ["semantic", "detail"]


def _level_logits(out: dict) -> list[torch.Tensor]:
    return [out["logits"]] if "logits" in out else [out["semantic"], out["detail"]]


def load_codes(tokens_dir, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N, levels, m) int64 of augmentation 0 = the centre crop, labels (N,)) of an `iar2 tokenize` folder."""
    ds = TokenDataset(tokens_dir, aug=0)
    n = len(ds) if max_images is None else min(len(ds), max_images)
    pick = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(np.int64))  # spread over the classes
    return np.asarray(ds.codes[pick, 0], dtype=np.int64), np.asarray(ds.labels[pick], dtype=np.int64)


@torch.no_grad()
def teacher_forced(model, codes: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> dict[str, dict]:
    """Per level: CE and top-1 accuracy with the true class (ce, acc) and the null class (ce_uncond), the mean
    KL(p_cond || p_uncond) per token (nats) and the rate at which both pick the same top-1 token."""
    model.eval()
    dev = next(model.parameters()).device
    names = level_names(model)
    sums = {n: dict.fromkeys(("ce", "acc", "ce_uncond", "kl_cond_uncond", "top1_agree"), 0.0) for n in names}
    # KL per position: the first tokens see nothing but the class, so they show how much of it the model uses
    kl_pos = {n: 0.0 for n in names}
    total = 0
    for b in range(0, len(codes), batch_size):
        tok = torch.as_tensor(codes[b:b + batch_size], device=dev)
        tok = tok[:, 0] if model.cfg.paradigm == "single" else tok
        lab = torch.as_tensor(labels[b:b + batch_size], device=dev)
        cond = _level_logits(model(tok, lab))
        uncond = _level_logits(model(tok, torch.full_like(lab, model.cfg.num_classes)))
        targets = [tok] if model.cfg.paradigm == "single" else [tok[:, 0], tok[:, 1]]
        for n, lc, lu, t in zip(names, cond, uncond, targets):
            lpc, lpu = lc.float().log_softmax(-1), lu.float().log_softmax(-1)
            s = sums[n]
            s["ce"] += float(F.nll_loss(lpc.flatten(0, 1), t.flatten(), reduction="sum"))
            s["ce_uncond"] += float(F.nll_loss(lpu.flatten(0, 1), t.flatten(), reduction="sum"))
            s["acc"] += float((lpc.argmax(-1) == t).sum())
            kl = (lpc.exp() * (lpc - lpu)).sum(-1)  # (B, m)
            s["kl_cond_uncond"] += float(kl.sum())
            kl_pos[n] = kl_pos[n] + kl.sum(0)
            s["top1_agree"] += float((lpc.argmax(-1) == lpu.argmax(-1)).sum())
        total += t.numel()
    res = {n: {k: v / total for k, v in s.items()} for n, s in sums.items()}
    rows = kl_pos[names[0]].numel() // model.cfg.grid
    for n in names:  # mean KL at the first position and per grid row
        per = (kl_pos[n] * len(kl_pos[n]) / total).view(-1, rows)
        res[n]["kl_first_token"] = float(per.flatten()[0])
        res[n]["kl_by_row"] = [round(float(v), 5) for v in per.mean(1)]
    return res


def data_entropies(codes: np.ndarray, labels: np.ndarray, vocabs: list[int], num_classes: int) -> dict[str, dict]:
    """Per level: H(level), H(level | class) and, for the detail level of pairs, H(detail | semantic), in nats."""
    out = {}
    names = ["single"] if len(vocabs) == 1 else ["semantic", "detail"]
    cls = np.broadcast_to(labels[:, None], codes[:, 0].shape)
    for lvl, (n, v) in enumerate(zip(names, vocabs)):
        h, hc = entropy_of(codes[:, lvl], v), conditional_entropy(codes[:, lvl], cls, v, num_classes)
        # I(token; class): how much the class says about a token, to compare with the samples' own
        out[n] = {"entropy": h, "entropy_given_class": hc, "class_information": h - hc}
    if len(vocabs) == 2:
        out["detail"]["entropy_given_semantic"] = conditional_entropy(codes[:, 1], codes[:, 0], vocabs[1], vocabs[0])
    return out


def repetition_stats(tokens: np.ndarray, grid: int) -> dict[str, float]:
    """Token maps (N, m) in raster order: the rate at which a token equals its right / lower neighbour, the mean
    fraction of distinct tokens per image and the mean share of each image's most frequent token."""
    t = np.asarray(tokens).reshape(len(tokens), grid, grid)
    distinct = [len(np.unique(r)) / r.size for r in t]
    top = [np.bincount(r.ravel()).max() / r.size for r in t]
    return {"equal_right": float((t[:, :, 1:] == t[:, :, :-1]).mean()),
            "equal_below": float((t[:, 1:] == t[:, :-1]).mean()),
            "distinct_fraction": float(np.mean(distinct)), "top_token_share": float(np.mean(top))}


def unseen_rates(tokens: np.ndarray, train_codes: np.ndarray, vocabs: list[int]) -> dict[str, float]:
    """Fraction of sampled tokens (per level) and of (semantic, detail) pairs that the training codes never use."""
    out = {}
    names = ["single"] if len(vocabs) == 1 else ["semantic", "detail"]
    for lvl, (n, v) in enumerate(zip(names, vocabs)):
        seen = np.bincount(train_codes[:, lvl].ravel(), minlength=v) > 0
        out[n] = float((~seen[tokens[:, lvl]]).mean())
    if len(vocabs) == 2:
        pairs = (train_codes[:, 0] * vocabs[1] + train_codes[:, 1]).ravel()
        seen = np.bincount(pairs, minlength=vocabs[0] * vocabs[1]) > 0
        out["pair"] = float((~seen[tokens[:, 0] * vocabs[1] + tokens[:, 1]]).mean())
    return out


def flat_sample_tokens(tokens: np.ndarray, std: np.ndarray, names: list[str], limit: int = 8) -> list[dict]:
    """For the flattest samples below FLAT_STD: each level's most frequent token and its share of the map."""
    rows = []
    for i in np.argsort(std)[:limit]:
        if std[i] >= FLAT_STD:
            break
        r = {"sample": int(i), "pixel_std": float(std[i])}
        for lvl, n in enumerate(names):
            bc = np.bincount(tokens[i, lvl])
            r[n] = {"top_token": int(bc.argmax()), "share": float(bc.max() / tokens.shape[-1])}
        rows.append(r)
    return rows


def sample_config(mode: str, scale: float, temperature: float, seed: int):
    return SamplingConfig(temperature=(temperature, temperature), seed=seed,
                          guidance=GuidanceConfig(mode=mode, scale=scale))


def write_joint_tokens(src, dst) -> dict:
    """Rewrite a dual token folder with one joint vocabulary t = k * V_d + j, so a single-codebook AR (LlamaGen) can
    train on the dual tokenizer's tokens: the side-by-side that splits the tokenizer's share of a gap from the AR's."""
    src, dst = Path(src), Path(dst)
    meta = read_json(src / "meta.json")
    vs, vd = meta["vocab_sizes"]
    codes = np.load(src / meta["codes_file"], mmap_mode="r")
    joint = codes[:, :, 0].astype(np.int64) * vd + codes[:, :, 1]
    joint = joint[:, :, None].astype(np.uint16 if vs * vd <= 65536 else np.int32)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(dst / meta["codes_file"], joint)
    atomic_save_npy(dst / meta["labels_file"], np.load(src / meta["labels_file"]))
    meta = {**meta, "levels": ["single"], "vocab_sizes": [vs * vd], "shape": list(joint.shape),
            "dtype": joint.dtype.name, "joint_of": str(src), "joint_detail_size": vd}
    atomic_write_json(dst / "meta.json", meta)  # last: marks the folder complete
    return meta


def split_joint(tokens: torch.Tensor, detail_size: int) -> torch.Tensor:
    """Joint tokens (B, m) -> dual (B, 2, m) [k, j] (inverse of write_joint_tokens)."""
    return torch.stack([tokens // detail_size, tokens % detail_size], dim=1)


@torch.no_grad()
def sample_set(model, vq, labels: np.ndarray, sc, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, levels, m), uint8 images (N, H, W, 3)) for `labels`; sample i uses stream i."""
    dev = next(model.parameters()).device
    toks, ims = [], []
    for b in range(0, len(labels), batch_size):
        lab = torch.as_tensor(labels[b:b + batch_size], device=dev)
        t = generate(model, lab, torch.arange(b, b + len(lab)), sc)
        # a single-codebook model on a dual tokenizer's joint tokens (write_joint_tokens): split before decoding
        joint = t.dim() == 2 and getattr(vq, "is_dual", False)
        dec = split_joint(t, vq.cfg.detail_size) if joint else t
        ims.append(decode_to_uint8(vq, dec, model.cfg.grid, None).numpy())
        toks.append((t[:, None] if t.dim() == 2 else t).cpu().numpy())
    return np.concatenate(toks), np.concatenate(ims)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ar", required=True, help="AR weights (model.safetensors or model_eNNN.safetensors)")
    p.add_argument("--vq", required=True, help="the tokenizer of its tokens")
    p.add_argument("--tokens", required=True, help="training tokens (`iar2 tokenize` folder)")
    p.add_argument("--heldout", default=None, help="held-out tokens (`iar2 tokenize --split val` folder)")
    p.add_argument("--max-eval", type=positive_int, default=1000, help="images for the teacher-forced measurements")
    p.add_argument("--domain-net", default=None, help="reference network: class accuracy and FID of samples")
    p.add_argument("--data", default=None, help="ImageFolder root (FID reference: its train split)")
    p.add_argument("--report", default=None, help="`iar2 data check` report")
    p.add_argument("--cache-dir", default=None, help="reference-feature cache (as `iar2 metrics`)")
    p.add_argument("--per-class", type=positive_int, default=20, help="samples per class and configuration")
    p.add_argument("--scales", type=nonneg_float, nargs="*", default=[2.0], help="static CFG scales besides no guidance")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--png", default=None, help="PNG: per configuration, rows of classes (first 5), 8 samples each")


def flat_by_class(std: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    return [float((std[labels == k] < FLAT_STD).mean()) if (labels == k).any() else None for k in range(num_classes)]


def _sample_metrics(images, labels, tokens, train_codes, vocabs, names, grid, args, scorer) -> dict:
    frac, std = flat_fraction(images)
    res = {"flat_fraction": frac, "pixel_std_median": float(np.median(std)),
           "flat_fraction_by_class": flat_by_class(std, labels, int(labels.max()) + 1),
           "repetition": {n: repetition_stats(tokens[:, lvl], grid) for lvl, n in enumerate(names)},
           "unseen": unseen_rates(tokens, train_codes, vocabs),
           "token_entropy": data_entropies(tokens, labels, vocabs, int(labels.max()) + 1),
           "flattest": flat_sample_tokens(tokens, std, names)}
    if scorer is not None:  # the reference network as a classifier: does the sample show its class?
        logits = torch.cat([scorer.net(torch.from_numpy(images[b:b + 200]).permute(0, 3, 1, 2).float()
                                       .to(scorer.device) / 127.5 - 1.0).float().cpu()
                            for b in range(0, len(images), 200)])
        lab = torch.from_numpy(labels)
        res["class_prob_mean"] = float(logits.softmax(-1).gather(1, lab[:, None]).mean())
        res["class_accuracy"] = float((logits.argmax(-1) == lab).float().mean())
    if args.data and args.domain_net:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "samples.npz"
            np.savez(path, arr_0=images, arr_1=labels)
            m = evaluate_samples(path, args.data, "train", "domain", args.domain_net, max_reference=1000,
                                 report=args.report, device=args.device, cache_dir=args.cache_dir)
        res.update({k: m[k] for k in ("fid", "precision", "recall", "isc_mean")})
    return res


def run(args: argparse.Namespace) -> dict:
    from iar2.ar.train import load_ar  # the trainer module: only when `iar2 diagnose ar` runs

    dev = pick_device(args.device)
    model = load_ar(args.ar, dev)
    vq = load_vq(args.vq, dev)
    names = level_names(model)
    c = model.cfg
    vocabs = [c.vocab_size] if c.paradigm == "single" else [c.semantic_size, c.detail_size]
    train_codes, train_labels = load_codes(args.tokens)
    out: dict = {"ar": str(args.ar), "vq": str(args.vq), "paradigm": c.paradigm, "levels": names,
                 "data_entropy": data_entropies(train_codes, train_labels, vocabs, c.num_classes),
                 "data_repetition": {n: repetition_stats(train_codes[:, lvl], c.grid) for lvl, n in enumerate(names)}}
    sub_c, sub_l = load_codes(args.tokens, args.max_eval)
    # the reference for flatness: the training images' own tokens decoded by the same tokenizer
    with torch.no_grad():
        t = torch.as_tensor(sub_c[:, 0] if c.paradigm == "single" else sub_c, device=dev)
        t = split_joint(t, vq.cfg.detail_size) if t.dim() == 2 and vq.is_dual else t
        dec = decode_to_uint8(vq, t, c.grid, None).numpy()
    frac, std = flat_fraction(dec)
    out["data_decoded"] = {"flat_fraction": frac, "pixel_std_median": float(np.median(std)),
                           "flat_fraction_by_class": flat_by_class(std, sub_l, c.num_classes)}
    out["teacher_forced"] = {"train": teacher_forced(model, sub_c, sub_l)}
    if args.heldout:
        out["teacher_forced"]["heldout"] = teacher_forced(model, *load_codes(args.heldout, args.max_eval))
    scorer = None
    if args.domain_net:
        scorer = Scorer("domain", args.domain_net, device=dev)
    labels = np.repeat(np.arange(c.num_classes), args.per_class)
    configs = [("none", 1.0)] + [("static", s) for s in args.scales]
    out["samples"], shown = {}, []
    for mode, scale in configs:
        key = f"T{args.temperature:g}-" + ("none" if mode == "none" else f"static-{scale:g}")
        tokens, images = sample_set(model, vq, labels, sample_config(mode, scale, args.temperature, args.seed))
        out["samples"][key] = _sample_metrics(images, labels, tokens, train_codes, vocabs, names, c.grid, args, scorer)
        log.info("%s: %s", key, {k: v for k, v in out["samples"][key].items() if isinstance(v, float)})
        keep = np.concatenate([np.flatnonzero(labels == k)[:8] for k in range(min(5, c.num_classes))])
        shown.append(images[keep])
    if args.png:
        save_tiles(np.concatenate(shown), args.png, ncols=8)
    return out
