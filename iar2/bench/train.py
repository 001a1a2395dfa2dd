"""`iar2 bench train`: AR training tokens/s per paradigm, interleaved repeats, MFU on GPUs of known peak.

A step is forward + loss + backward + AdamW on random tokens; --dtype bf16 runs it under autocast (the
trainer's setting at the GPU scales). MFU uses 6 x parameters x tokens FLOPs per step (attention left out,
so it is a slight under-estimate at these sequence lengths).
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from iar2.bench.timing import (add_common_arguments, git_commit, interleaved, machine, ratio, set_threads, stats,
                               write_json)

FAMILIES = {"llamagen": dict(paradigm="single", vocab_size=16384),
            "iar2": dict(paradigm="fused_hierarchical", head_layers=5),
            "alternating": dict(paradigm="alternating")}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from iar2.cli import nonneg_int, positive_int  # argparse types with a range
    p.add_argument("--families", default="llamagen,iar2,alternating", help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--size", default="custom", choices=["B", "L", "XL", "XXL", "custom"])
    p.add_argument("--dim", type=positive_int, default=256, help="--size custom only")
    p.add_argument("--n-layer", type=positive_int, default=4, help="--size custom only")
    p.add_argument("--n-head", type=positive_int, default=4, help="--size custom only")
    p.add_argument("--head-layers", type=nonneg_int, default=2, help="IAR2 head blocks (paper: 5)")
    p.add_argument("--grid", type=positive_int, default=16)
    p.add_argument("--batch-size", type=positive_int, default=8)
    add_common_arguments(p)


def _case(family: str, args, dev: torch.device):
    from iar2.ar.model import ARModel, ARModelConfig

    kw = dict(FAMILIES[family])
    if "head_layers" in kw:
        kw["head_layers"] = args.head_layers
    size = {} if args.size == "custom" else {"size": args.size}
    cfg = ARModelConfig(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, grid=args.grid, num_classes=1000,
                        **size, **kw)
    cfg.validate()
    torch.manual_seed(0)
    model = ARModel(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
    g = torch.Generator(device="cpu").manual_seed(0)
    B, m = args.batch_size, args.grid ** 2
    labels = torch.randint(0, 1000, (B,), generator=g).to(dev)
    tokens = (torch.randint(0, cfg.vocab_size, (B, m), generator=g) if cfg.paradigm == "single" else
              torch.stack([torch.randint(0, cfg.semantic_size, (B, m), generator=g),
                           torch.randint(0, cfg.detail_size, (B, m), generator=g)], 1)).to(dev)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    def step():
        with ac:
            loss, _ = model.loss(model(tokens, labels), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def measure(args) -> dict:
    from iar2.ar.train import peak_flops
    from iar2.distributed import resolve_device

    dev = resolve_device(args.device)
    threads = set_threads(args.threads)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    cases, params = {}, {}
    for fam in fams:
        cases[fam], params[fam] = _case(fam, args, dev)
    times = interleaved(cases, args.repeats, dev, warmup=2)
    tokens = args.batch_size * args.grid ** 2
    peak = peak_flops(dev)
    res = {}
    for fam in fams:
        st = stats(times[fam], 1e3)
        r = {"ms_per_step": st, "tokens_per_s": {"max": tokens / (st["min"] / 1e3),
                                                 "median": tokens / (st["median"] / 1e3)},
             "params_m": params[fam] / 1e6}
        if peak:
            r["mfu"] = {k: 6 * params[fam] * v / peak for k, v in r["tokens_per_s"].items()}
        res[fam] = r
    first = fams[0]
    for fam in fams:
        res[fam]["time_vs_" + first] = ratio(res[fam]["ms_per_step"], res[first]["ms_per_step"])
    if dev.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return {"bench": "train", "commit": git_commit(), "machine": machine(dev), "threads": threads,
            "settings": {"size": args.size, "grid": args.grid, "batch": args.batch_size, "dtype": args.dtype,
                         "repeats": args.repeats}, "results": res}


def report(out: dict) -> str:
    s = out["settings"]
    lines = [f"training, {s['size']} {s['grid']}x{s['grid']}, batch {s['batch']}, {s['dtype']}, {out['threads']} "
             f"threads, {s['repeats']} interleaved rounds, commit {out['commit']}",
             f"{'model':12s} {'params M':>8s} {'ms/step min':>11s} {'median':>7s} {'tok/s max':>10s} {'MFU':>6s}"]
    for fam, r in out["results"].items():
        if not isinstance(r, dict):
            continue
        mfu = f"{r['mfu']['max']:6.1%}" if "mfu" in r else "     -"
        lines.append(f"{fam:12s} {r['params_m']:8.2f} {r['ms_per_step']['min']:11.1f} {r['ms_per_step']['median']:7.1f} "
                     f"{r['tokens_per_s']['max']:10.0f} {mfu}")
    return "\n".join(lines)


def run_bench(args) -> int:
    out = measure(args)
    print(report(out))
    write_json(args.json_out, out)
    return 0
