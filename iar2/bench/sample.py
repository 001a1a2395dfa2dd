"""`iar2 bench sample`: decode ms/step against the weights-read bound, and the KV-cache speed-up.

Cases (families x {cached, uncached}), the bound and the step's GEMMs at their real shapes (bound.py) run in
interleaved rounds (iar2/bench/timing.py), with the thread count and dtype given, so every ratio comes from one
run on one machine state. Models have random weights (speed does not depend on them) at the paper's sizes; CFG
doubles the rows (batch B -> 2B).
"""
from __future__ import annotations

import argparse
import logging
import statistics

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
    p.add_argument("--compile", action="store_true",
                   help="also time the decode with the backbone step compiled on static caches (sampling.compile; "
                        "CUDA graphs on a GPU); compiling happens in the warm-up")
    p.add_argument("--kv-positions", type=nonneg_int, default=0,
                   help="estimate the KV speed-up from the backbone step, cached and uncached, timed at this many "
                        "evenly spaced positions (for sizes whose uncached decode takes minutes); 0: off")
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


def backbone_positions(model, rows: int, positions: list[int], device, dtype) -> dict[str, object]:
    """Callables for one backbone step at each sequence position n: cached (one new query reads n + 1 keys) and
    uncached (the full forward of positions 0..n that a decode without caches runs at that step)."""
    bb = model.backbone
    x = torch.randn(rows, bb.cfg.seq_len, bb.cfg.dim, device=device, dtype=dtype)
    bb.setup_caches(rows, dtype=dtype, device=device)
    caches = [layer.attention.kv_cache for layer in bb.layers]

    def attach(on: bool):
        for layer, c in zip(bb.layers, caches):
            layer.attention.kv_cache = c if on else None

    @torch.no_grad()
    def cached(n):
        attach(True)
        bb.step(x[:, n:n + 1], n)

    @torch.no_grad()
    def full(n):
        attach(False)
        bb.step(x[:, :n + 1], 0)

    out = {}
    for n in positions:
        out[f"cached@{n}"] = lambda n=n: cached(n)
        out[f"full@{n}"] = lambda n=n: full(n)
    return out


def kv_estimate(times: dict[str, list[float]], fam: str, positions: list[int], steps: int,
                decode: list[float]) -> dict:
    """The uncached decode's time, estimated: the cached decode plus, at every backbone step, what the full
    forward costs over the cached step (linear interpolation between the timed positions); per statistic."""
    import numpy as np

    def total(case: str, f) -> float:  # one statistic of `case`, summed over every backbone step
        return float(np.interp(np.arange(steps), positions, [f(times[f"{fam}/{case}@{n}"]) for n in positions]).sum())

    stat_fns = {"min": min, "median": statistics.median}
    return {"decode": {s: (f(decode) + total("full", f) - total("cached", f)) / f(decode) for s, f in stat_fns.items()},
            "backbone": {s: total("full", f) / total("cached", f) for s, f in stat_fns.items()},
            "positions": positions}


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
    cases, limit, models, positions = {}, {}, {}, {}
    for fam in fams:
        model = models[fam] = build(fam, args, dev, dtype)

        def run(model=model, kv=True, compile=False):
            sc = SamplingConfig(guidance=GuidanceConfig(mode=args.cfg, scale=2.0), kv_cache=kv, seed=0,
                                compile=compile)
            generate(model, labels, idx, sc)

        cases[f"{fam}/decode"] = run
        if args.compile:  # the warm-up below compiles it
            cases[f"{fam}/compiled"] = lambda run=run: run(compile=True)
        cases[f"{fam}/bound"] = weights_read_step(model, rows, dev, dtype)
        cases[f"{fam}/gemm"] = weights_read_step(model, rows, dev, dtype, shapes="actual")
        if args.kv_repeats:
            cases[f"{fam}/uncached"] = lambda run=run: run(kv=False)
            limit[f"{fam}/uncached"] = args.kv_repeats
        steps = model.cfg.backbone().seq_len - 1  # backbone steps of one decode (the last token is not fed)
        positions[fam] = sorted({round(i * (steps - 1) / max(args.kv_positions - 1, 1))
                                 for i in range(args.kv_positions)})
        for name, fn in backbone_positions(model, rows, positions[fam], dev, dtype).items():
            cases[f"{fam}/{name}"] = fn
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
        if args.compile:
            comp = stats(times[f"{fam}/compiled"], 1e3 / M)
            r.update(compiled_ms_per_step=comp, compiled_ratio_to_bound=ratio(comp, bound),
                     compile_speedup=ratio(step, comp))
        if positions[fam]:
            steps = models[fam].cfg.backbone().seq_len - 1
            r["kv_speedup_estimate"] = kv_estimate(times, fam, positions[fam], steps, times[f"{fam}/decode"])
        res[fam] = r
    return {"bench": "sample", "commit": git_commit(), "machine": machine(dev), "threads": threads,
            "settings": {"size": args.size, "grid": args.grid, "batch": B, "rows": rows, "cfg": args.cfg,
                         "dtype": args.dtype, "repeats": args.repeats, "kv_repeats": args.kv_repeats,
                         "kv_positions": args.kv_positions, "compile": args.compile},
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
    for fam, r in out["results"].items():
        if "compiled_ms_per_step" in r:
            c, cr = r["compiled_ms_per_step"], r["compiled_ratio_to_bound"]
            lines.append(f"{fam}: compiled static-cache step {c['min']:.1f} / {c['median']:.1f} ms (min / median), "
                         f"{cr['min']:.2f} / {cr['median']:.2f} x the bound, "
                         f"{r['compile_speedup']['min']:.2f} / {r['compile_speedup']['median']:.2f} x faster than eager")
        if "kv_speedup_estimate" in r:
            e = r["kv_speedup_estimate"]
            lines.append(f"{fam}: KV-cache speed-up estimated from {len(e['positions'])} positions: decode "
                         f"{e['decode']['min']:.1f} (min) / {e['decode']['median']:.1f} (median), backbone "
                         f"{e['backbone']['min']:.1f} / {e['backbone']['median']:.1f}")
    return "\n".join(lines)


def run_bench(args) -> int:
    out = measure(args)
    print(report(out))
    write_json(args.json_out, out)
    return 0
