"""`iar2 bench kmeans`: balanced k-means (iar2.rearrange) on random unit codebooks, wall and CPU time."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from iar2.cli import nonneg_int, positive_int
from iar2.rearrange import rearrange_codebook


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codes", type=positive_int, nargs="+", default=[16384], help="codebook sizes N")
    p.add_argument("--dim", type=positive_int, default=8)
    p.add_argument("--clusters", type=positive_int, default=128)
    p.add_argument("--max-iter", type=positive_int, default=100)
    p.add_argument("--seed", type=nonneg_int, default=0)


def run_bench(args) -> int:
    for n in args.codes:
        g = torch.Generator().manual_seed(args.seed)
        codes = F.normalize(torch.randn(n, args.dim, generator=g), dim=1)
        cpu = time.process_time()
        r = rearrange_codebook(codes, args.clusters, seed=args.seed, max_iter=args.max_iter)
        cpu = time.process_time() - cpu
        print(f"balanced k-means N={n} D={args.dim} clusters={args.clusters}: {r.seconds:.2f} s wall "
              f"({cpu:.2f} s CPU), "
              f"{r.iterations} iterations ({r.seconds / max(r.iterations, 1):.3f} s/it), converged={r.converged}, "
              f"inertia {r.inertia:.2f} vs random balanced {r.inertia_random:.2f}")
    return 0
