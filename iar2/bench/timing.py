"""Timing that survives a shared machine: interleaved repeats, min and median, explicit threads.

On a loaded machine one timing of one case is mostly noise, and timing case A then case B puts a ratio
between two different moments of the load. Here every round runs every case once (rotating which goes
first), so each case sees the same load history; the minimum estimates the unloaded cost, the median
the typical one. Ratios are formed per statistic (min/min, median/median).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1, limit: dict[str, int] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each case over `repeats` rounds; `limit[name]` caps a slow case's rounds."""
    limit = limit or {}
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:  # rotate: no case always runs right after the same neighbour
            if len(out[n]) >= limit.get(n, repeats):
                continue
            sync(device)
            t0 = clock()
            cases[n]()
            sync(device)
            out[n].append(clock() - t0)
    return out


def stats(times: list[float], scale: float = 1.0) -> dict[str, float]:
    return {"min": min(times) * scale, "median": statistics.median(times) * scale, "n": len(times)}


def ratio(a: dict, b: dict) -> dict[str, float]:
    return {"min": a["min"] / b["min"], "median": a["median"] / b["median"]}


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def git_commit() -> str:
    """HEAD of the checkout the package runs from, '+dirty' when tracked files differ (figures need it)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def add_common_arguments(p) -> None:
    from iar2.cli import nonneg_int, positive_int  # argparse types with a range
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds; min and median are reported")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--device", default="auto")
