"""Project the wall time of a scale (or of a cut of its sweeps) from the job times of a finished run.

A finished `snakemake reproduce_all` keeps each job's start and end in .snakemake/metadata. This script plans
the candidate (`snakemake -n --forceall`, with any --config / --configfile you pass on), looks up every planned
job's measured duration by its first output, and divides the sum by the measured run's parallel efficiency
(job-seconds per wall second). Jobs the measured run did not have (a new rule, a changed path) are priced at their
rule's median and counted apart. The kept jobs' results do not change with a cut of the sweeps (their configs do
not), so their measured times apply.

    python workflow/scripts/project_runtime.py --run-dir /path/to/finished/checkout \\
        --config 'restrict={size: [B, L, XL]}'

Run it from the checkout whose params you want to plan (the paths must match the measured run's: same scale).
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def measured_jobs(run_dir: Path) -> tuple[dict[str, tuple[str, float]], dict[str, list[float]], float, float]:
    """{output path: (rule, seconds)}, {rule: each of its jobs' seconds}, total job-seconds and wall seconds of
    the run in `run_dir`."""
    meta = run_dir / ".snakemake" / "metadata"
    if not meta.is_dir():
        raise SystemExit(f"{meta}: no Snakemake metadata; --run-dir must be a checkout where reproduce_all ran")
    by_output, jobs = {}, {}
    for f in meta.iterdir():
        try:
            path = base64.b64decode(f.name).decode()
            d = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue  # not a record of one output (Snakemake keeps other files here too)
        if d.get("incomplete") or d.get("starttime") is None or d.get("endtime") is None:
            continue
        secs = float(d["endtime"]) - float(d["starttime"])
        by_output[path] = (d["rule"], secs)
        # a job with several outputs has a record per output (same job hash)
        key = (d["rule"], d.get("job_hash") or d["starttime"])
        s, e = jobs.get(key, (float("inf"), float("-inf")))
        jobs[key] = (min(s, float(d["starttime"])), max(e, float(d["endtime"])))
    if not jobs:
        raise SystemExit(f"{meta}: no finished job recorded")
    per_rule = defaultdict(list)
    for (rule, _), (s, e) in jobs.items():
        per_rule[rule].append(e - s)
    job_s = sum(e - s for s, e in jobs.values())
    wall = max(e for _, e in jobs.values()) - min(s for s, _ in jobs.values())
    return by_output, dict(per_rule), job_s, wall


def planned_jobs(target: str, snakemake_args: list[str]) -> list[tuple[str, str]]:
    """(rule, first output) of every job `snakemake -n --forceall target` plans here."""
    cmd = ["snakemake", "-n", "--forceall", target, *snakemake_args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    jobs, rule = [], None
    for line in out.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^\s*output: (.*)$", line)
        if m and rule:
            jobs.append((rule, m.group(1).split(", ")[0].strip()))
            rule = None
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, type=Path, help="checkout where the measured reproduce_all ran")
    p.add_argument("--target", default="reproduce_all")
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="passed to snakemake --config")
    p.add_argument("--configfile", help="passed to snakemake --configfile")
    p.add_argument("--json", type=Path, help="also write the projection here")
    args = p.parse_args(argv)

    measured, by_rule, job_s, wall = measured_jobs(args.run_dir)
    efficiency = job_s / wall
    sm = ["--config", *args.config] if args.config else []
    sm += ["--configfile", args.configfile] if args.configfile else []
    plan = planned_jobs(args.target, sm)
    per_rule, missing, total = defaultdict(float), [], 0.0
    seen = set()
    for rule, out in plan:
        if out in seen:
            continue
        seen.add(out)
        if out in measured:
            secs = measured[out][1]
        else:  # not in the measured run: its rule's median
            secs = statistics.median(by_rule[rule]) if by_rule.get(rule) else 0.0
            missing.append(out)
        per_rule[rule] += secs
        total += secs
    projected = total / efficiency
    res = {"measured": {"job_seconds": round(job_s), "wall_seconds": round(wall), "efficiency": round(efficiency, 3)},
           "planned_jobs": len(seen), "estimated_jobs": len(missing), "job_seconds": round(total),
           "projected_wall_seconds": round(projected),
           "by_rule": {r: round(s) for r, s in sorted(per_rule.items(), key=lambda kv: -kv[1])}}
    print(f"measured run: {job_s:.0f} job-s in {wall / 60:.1f} min ({efficiency:.2f} job-s per second)")
    print(f"planned: {len(seen)} jobs, {total:.0f} job-s ({len(missing)} priced at their rule's median)"
          f" -> projected {projected / 60:.1f} min")
    for r, s in res["by_rule"].items():
        print(f"  {r:22s} {s:7d} job-s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
