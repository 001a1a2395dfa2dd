"""Check that a job's ranks find each other before spending GPU hours on training.

Run it the way the training rules run iar2, e.g. inside a 2-node SLURM job with 8 GPUs per node:

    python -m iar2.launch --gpus 8 --nodes 2 -- python workflow/scripts/dist_check.py --out dist_check

Every rank joins the process group through iar2.distributed (the trainers' own code path), all-reduces its rank
and writes <out>/rank<R>.json (host, device, world size, the reduced sum, the SLURM job/step it runs in).
Rank 0 then checks the sum against 0 + 1 + ... + (world - 1) and exits non-zero on a mismatch.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="dist_check", help="folder for one JSON report per rank")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: this rank's GPU when CUDA is available, else the CPU (gloo)")
    args = p.parse_args(argv)

    import torch

    from iar2.distributed import all_reduce_, barrier, cleanup, init_distributed
    from iar2.io import atomic_write_json

    info = init_distributed(args.device)
    total = all_reduce_(torch.tensor([float(info.rank)], device=info.device), info, "sum").item()
    report = {
        "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
        "host": socket.gethostname(), "device": str(info.device), "rank_sum": total,
        "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}",
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"),
    }
    atomic_write_json(Path(args.out) / f"rank{info.rank}.json", report)
    print(f"dist_check: rank {info.rank}/{info.world_size} on {report['host']} ({report['device']}), "
          f"rank sum {total:g}", flush=True)
    barrier(info)
    cleanup()
    expected = info.world_size * (info.world_size - 1) / 2
    if total != expected:
        print(f"dist_check: rank sum {total:g} != {expected:g}: the ranks did not all meet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
