"""`iar2 bench sample`: decode ms/step against the weights-read bound, and the KV-cache speed-up.

Cases (families x {cached, uncached}), the bound and the step's GEMMs at their real shapes (bound.py) run in
interleaved rounds (iar2/bench/timing.py), with the thread count and dtype given, so every ratio comes from one
run on one machine state. Models have random weights (speed does not depend on them) at the paper's sizes; CFG
doubles the rows (batch B -> 2B).
"""
from __future__ import annotations

import argparse
import logging

import torch

from iar2.bench.bound import weight_bytes, weights_read_step
from iar2.bench.timing import (add_common_arguments, git_commit, interleaved, machine, ratio, set_threads, stats,
                               write_json)

log = logging.getLogger(__name__)

FAMILIES = {"llamagen": dict(paradigm="single", vocab_size=16384),  # LlamaGen / IAR: one 16384 codebook
            "iar2": dict(paradigm="fused_hierarchical", head_layers=5),  # the paper's IAR2 head
            "alternating": dict(paradigm="alternating")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import nonneg_int, positive_int  # argparse types with a range
    p.add_argument("--families", default="iar2,llamagen", help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--size", default="B", choices=["B", "L", "XL", "XXL", "custom"])
    p.add_argument("--dim", type=positive_int, default=256, help="--size custom only")
    p.add_argument("--n-layer", type=positive_int, default=4, help="--size custom only")
    p.add_argument("--n-head", type=positive_int, default=4, help="--size custom only")
    p.add_argument("--head-layers", type=nonneg_int, default=0, help="IAR2 head blocks (0: the paper's 5)")
    p.add_argument("--grid", type=positive_int, default=16, help="token grid side (16: 256 tokens)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per batch; CFG doubles the rows")
    p.add_argument("--cfg", default="static", choices=["none", "static", "progressive", "pag"])
    p.add_argument("--kv-repeats", type=nonneg_int, default=1,
                   help="rounds that also time the uncached decode (it is ~10x slower); 0: skip the KV speed-up")
    add_common_arguments(p)


def build(family: str, args, device: torch.device, dtype: torch.dtype):
    from iar2.ar.model import ARModel, ARModelConfig

    kw = dict(FAMILIES[family])
    if args.head_layers and "head_layers" in kw:
        kw["head_layers"] = args.head_layers
    size = {} if args.size == "custom" else {"size": args.size}
    cfg = ARModelConfig(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, grid=args.grid, num_classes=1000,
                        **size, **kw)
    cfg.validate()
    torch.manual_seed(0)
    return ARModel(cfg).to(device=device, dtype=dtype).eval()


def measure(args) -> dict:
    from iar2.ar.generate import SamplingConfig, generate
    from iar2.ar.pag_cfg import GuidanceConfig
    from iar2.distributed import resolve_device

    dev = resolve_device(args.device)
    threads = set_threads(args.threads)
    dtype = DTYPES[args.dtype]
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    B, M = args.batch_size, args.grid ** 2
    rows = 2 * B if args.cfg != "none" else B
    labels, idx = torch.arange(B, device=dev) % 1000, torch.arange(B)
    cases, limit, models = {}, {}, {}
    for fam in fams:
        model = models[fam] = build(fam, args, dev, dtype)

        def run(model=model, kv=True):
            sc = SamplingConfig(guidance=GuidanceConfig(mode=args.cfg, scale=2.0), kv_cache=kv, seed=0)
            generate(model, labels, idx, sc)

        cases[f"{fam}/decode"] = run
        cases[f"{fam}/bound"] = weights_read_step(model, rows, dev, dtype)
        cases[f"{fam}/gemm"] = weights_read_step(model, rows, dev, dtype, shapes="actual")
        if args.kv_repeats:
            cases[f"{fam}/uncached"] = lambda run=run: run(kv=False)
            limit[f"{fam}/uncached"] = args.kv_repeats
    # the uncached decode is warmed by its cached twin (same kernels); warming it separately would cost 10x
    warm = {n: fn for n, fn in cases.items() if not n.endswith("/uncached")}
    for fn in warm.values():
        fn()
    times = interleaved(cases, args.repeats, dev, warmup=0, limit=limit)
    res = {}
    for fam in fams:
        step = stats(times[f"{fam}/decode"], 1e3 / M)
        bound = stats(times[f"{fam}/bound"], 1e3)
        gemm = stats(times[f"{fam}/gemm"], 1e3)
        r = {"ms_per_step": step, "bound_ms": bound, "ratio_to_bound": ratio(step, bound),
             "gemm_ms": gemm, "ratio_to_gemm": ratio(step, gemm),
             "weight_mb_per_step": weight_bytes(models[fam]) / 2**20,
             "params_m": sum(p.numel() for p in models[fam].parameters()) / 1e6}
        if args.kv_repeats:
            unc = stats(times[f"{fam}/uncached"], 1e3 / M)
            r["uncached_ms_per_step"] = unc
            r["kv_speedup"] = ratio(unc, step)
        res[fam] = r
    return {"bench": "sample", "commit": git_commit(), "machine": machine(dev), "threads": threads,
            "settings": {"size": args.size, "grid": args.grid, "batch": B, "rows": rows, "cfg": args.cfg,
                         "dtype": args.dtype, "repeats": args.repeats, "kv_repeats": args.kv_repeats},
            "results": res}


def report(out: dict) -> str:
    s = out["settings"]
    lines = [f"decode, {s['size']} {s['grid']}x{s['grid']}, batch {s['batch']} ({s['rows']} rows), {s['dtype']}, "
             f"{out['threads']} threads, {s['repeats']} interleaved rounds, commit {out['commit']}",
             f"{'model':10s} {'ms/step min':>11s} {'median':>7s} {'bound min':>9s} {'median':>7s} "
             f"{'ratio min':>9s} {'median':>7s} {'GEMMs min':>9s} {'median':>7s} {'ratio min':>9s} {'median':>7s} "
             f"{'KV x min':>8s} {'median':>7s}"]
    for fam, r in out["results"].items():
        kv = r.get("kv_speedup", {"min": float("nan"), "median": float("nan")})
        # KV x min: the fastest uncached over the fastest cached (min / min), as the other ratios
        lines.append(f"{fam:10s} {r['ms_per_step']['min']:11.1f} {r['ms_per_step']['median']:7.1f} "
                     f"{r['bound_ms']['min']:9.1f} {r['bound_ms']['median']:7.1f} "
                     f"{r['ratio_to_bound']['min']:9.2f} {r['ratio_to_bound']['median']:7.2f} "
                     f"{r['gemm_ms']['min']:9.1f} {r['gemm_ms']['median']:7.1f} "
                     f"{r['ratio_to_gemm']['min']:9.2f} {r['ratio_to_gemm']['median']:7.2f} "
                     f"{kv['min']:8.1f} {kv['median']:7.1f}")
    return "\n".join(lines)


def run_bench(args) -> int:
    out = measure(args)
    print(report(out))
    write_json(args.json_out, out)
    return 0
