"""Training seeds as an axis of the plan: the sample sets behind the central claims, made from K training seeds.

At small scales another training seed moves a model's FID by more than the bootstrap over samples sees (README,
"Training seeds": SD 1-9 FID against half-widths 1-3), so a verdict decided on one seed is a verdict on one set of
weights and can flip on another machine. Each group `{count: K, sets: [patterns]}` of a scale's `seeds:` makes
every sample set whose folder matches a pattern (`ar/iar2-B-24/e300/*`) also from K - 1 more AR runs that differ
from its own only in `train.seed` (its seed + 1, + 2, ...): run `<run>-seed<k>`, set
`<run>-seed<k>/e<epoch>/<guidance>`. A seeded
copy trains and exports exactly as its run (the same epochs, so the same schedule), so its config, and whether it
reruns, does not depend on which of the run's sets are seeded. `seeds` is a list of groups, so each comparison can
have the seeds its measured spread needs; a set in two groups gets the larger count.

The set's number is then the mean over its K seeds, and its bootstrap replicates resample seeds, then samples
(a two-level bootstrap). Replicate b draws K seeds with replacement from an index stream that depends only on
(b, K), so every set with K seeds draws the same seeds in replicate b (paired, like the sample resampling of
iar2/bootstrap.py), and takes each drawn seed's own replicate b (its resampled samples):

    rep_b = mean_k v_k  +  c_K (mean_j v_{s_j} - mean_k v_k)  +  mean_j (rep_{s_j, b} - v_{s_j})

The middle term is the seed-level deviation. A percentile bootstrap of a mean over K values is too narrow when K is
small: its spread is sqrt((K - 1) / K) of the standard error, and it uses normal quantiles where Student's t
with K - 1 degrees of freedom applies. c_K = t_{K-1, 0.975} / (1.96 sqrt((K - 1) / K)) widens it to the t interval
(c_4 = 1.87, c_8 = 1.29), so the seed part of a 95 % interval is a t interval over seeds; the sample part is
unchanged.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import TYPE_CHECKING

import numpy as np

from iar2 import layout
from iar2.bootstrap import resample_indices
from iar2.config import ConfigError, dicts_in

if TYPE_CHECKING:
    from iar2.registry.plan import Plan

SEED_STREAM = 7919  # the seed draws' stream (iar2.bootstrap.resample_indices), apart from the samples' streams


def seeded_run_id(rid: str, k: int) -> str:
    return f"{rid}-seed{k}"


def add_seeds(plan: Plan) -> None:
    """Add the seeded copies of the scale's `seeds` groups to `plan` (after its runs are deduplicated), and list
    their metric files beside each table and figure source of the set (`"seeds": [file of seed 1, ...]`)."""
    count: dict[str, int] = {}  # sample id -> its seeds (the largest of the groups that match it)
    for i, group in enumerate(plan.s.seeds):
        for pattern in group.sets:
            hits = [s for s in plan.samples.values()
                    if not s.is_grid and fnmatch.fnmatchcase(layout.sample_dir(s.id), pattern)]
            if not hits:
                some = ", ".join(sorted(layout.sample_dir(s) for s in plan.samples)[:3])
                raise ConfigError(f"seeds[{i}].sets: {pattern!r} matches no sample set of this scale (their folders "
                                  f"read like {some}, ...)")
            for s in hits:
                count[s.id] = max(count.get(s.id, 1), group.count)
    copies: dict[str, list[str]] = {}  # metric file of a matched set -> those of its seeded copies
    for rid in sorted({plan.samples[sid].run for sid, k in count.items() if k > 1}):
        run = plan.runs[rid]
        sets = [plan.samples[sid] for sid in sorted(count) if plan.samples[sid].run == rid]
        for k in range(1, max(count[s.id] for s in sets)):
            cid = seeded_run_id(rid, k)
            if cid in plan.runs:
                raise ConfigError(f"seeds: run id {cid!r} is already a run of the registry; rename its tag")
            c = copy.deepcopy(run)  # the same epochs and exports: its config differs in train.seed alone
            c.id, c.seed_offset = cid, k
            plan.runs[cid] = c
            for s in sets:
                if k < count[s.id]:
                    sid = layout.sample_id(cid, s.epoch, s.guidance)
                    plan.samples[sid] = type(s)(sid, cid, s.epoch, s.guidance, set(s.tables))
                    copies.setdefault(layout.gen_metrics(s.id), []).append(layout.gen_metrics(sid))

    for d in dicts_in([plan.tables, plan.figures]):
        if isinstance(d.get("file"), str) and d["file"] in copies:
            d["seeds"] = copies[d["file"]]


def t_factor(k: int, level: float = 0.95) -> float:
    """c_K of the module doc: how much wider the t interval over K seeds is than the percentile bootstrap's."""
    from scipy.stats import norm, t

    if k < 2:
        return 1.0
    q = (1 + level) / 2
    return float(t.ppf(q, k - 1) / (norm.ppf(q) * np.sqrt((k - 1) / k)))


def combine(values: list[float], replicates: list | None) -> tuple[float, list[float] | None]:
    """(mean over seeds, two-level bootstrap replicates) of one metric of K seeds: `values` their point values,
    `replicates` their (K, B) bootstrap replicates or None (then no replicates)."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if replicates is None:
        return mean, None
    b = min(len(r) for r in replicates)
    reps = np.asarray([np.asarray(r, np.float64)[:b] for r in replicates])  # (K, B)
    k = len(v)
    if k == 1:
        return mean, reps[0].tolist()
    s = np.stack([resample_indices(SEED_STREAM, i, k) for i in range(b)])  # (B, K): replicate i's seeds
    drawn = reps[s, np.arange(b)[:, None]]  # each drawn seed's own replicate i
    out = mean + t_factor(k) * (v[s].mean(1) - mean) + (drawn - v[s]).mean(1)
    return mean, out.tolist()
