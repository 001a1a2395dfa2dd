"""The paper's directional claims (params/paper/claims.yaml), checked against our numbers.

A claim's `rule` is data over named row sets: "table1".."table13" (a table's rows: key columns plus values) and
the figures' points ("fig3", "fig4", "fig7a", ...). A reference selects rows and one column:

    {from: table5, col: fid, where: {paradigm: Fused Independent Prediction}, agg: min}

`where` values match by value (1 == 1.0 == "1"); a list means any of them; "$max" / "$min" keeps the rows where
that column is largest / smallest. Rule kinds:

    less:    [ref_a, ref_b]                     a < b
    order:   [ref_1, ref_2, ...]                strictly increasing
    trend:   {from, col, x, where, group_by, direction, strict, min_fraction}
             direction: increasing | decreasing | valley | interior_min | nonmonotonic; strict: false means a
             Spearman rank correlation of at least 0.8 (in the direction) instead of strict monotonicity
    extreme: {from, col, where, find: min|max, expect: {column: value}}
    ordered: {from, col, where, group_by, by, order: [...], direction, min_fraction, cover: {column: [values]}}
             within each group, the values of `by` listed in `order` are monotone (groups with < 2 present skip)
    all:     [rule, ...]
    na:      "why this claim cannot be checked by a run of this pipeline"

Outcome: reproduced, contradicted, inconclusive, missing (not enough of our results yet) or n/a. Our rows carry
the bootstrap replicates of their metrics (`_boot`: column -> replicates, `_n`: column -> sample count; written by
the metrics jobs, iar2/bootstrap.py). A comparison a < b is decided by the 95 % percentile interval of the paired
replicate differences a - b: below 0 reproduced, above 0 contradicted, containing 0 inconclusive. A shape (trend,
argmin, order along a column) is decided by the fraction of replicates in which it holds (>= 97.5 % reproduced,
<= 2.5 % contradicted, else inconclusive). Values without replicates (reconstruction metrics, the paper's own
numbers) are compared as points and say so. Each rule is also run on the paper's own numbers, which checks the
encoding (a rule the paper's data fails is visible in the report).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from iar2.bootstrap import CONTRADICTED, INCONCLUSIVE, REPRODUCED, percentile_interval, support_verdict, verdict
from iar2.report.sources import canon, is_number
from iar2.seeds import combine as seed_combine

log = logging.getLogger(__name__)

MISSING, NA = "missing", "n/a"
STATUSES = (REPRODUCED, CONTRADICTED, INCONCLUSIVE, MISSING, NA)
SIZE_ORDER = {"B": 0, "L": 1, "XL": 2, "XXL": 3}
RULE_KINDS = ("less", "order", "trend", "extreme", "ordered", "all", "na")


class Missing(Exception):
    """Not enough results to decide."""


@dataclass
class Outcome:
    status: str
    detail: str


@dataclass
class Claim:
    id: str
    text: str
    source: str
    check: str
    rule: Any


@dataclass
class Dataset:
    """Named row sets. paper=True: an absent value is one the paper does not print (the row is skipped);
    paper=False: it is one of ours not produced yet (the check is missing). `seeds`: the rows' values and replicates
    are those of their first `seeds` training seeds (see `evaluate`); `read`: the seed counts of the rows selected."""

    rows: dict[str, list[dict]]
    paper: bool = False
    seeds: int | None = None
    read: list[int] = field(default_factory=list, repr=False)


def load_claims(path: Path) -> list[Claim]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    claims = []
    for c in data.get("claims") or []:
        claim = Claim(id=str(c["id"]), text=c["text"], source=c.get("source", ""), check=c.get("check", ""),
                      rule=c["rule"])
        validate_rule(claim.rule, claim.id)
        claims.append(claim)
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate claim ids")
    return claims


def validate_rule(rule: Any, cid: str) -> None:
    if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in RULE_KINDS:
        raise ValueError(f"claim {cid}: a rule is one mapping of {RULE_KINDS}, got {rule!r}")
    kind, arg = next(iter(rule.items()))
    if kind == "all":
        for r in arg:
            validate_rule(r, cid)
    elif kind in ("less", "order"):
        if not isinstance(arg, list) or len(arg) < 2 or not all(isinstance(r, dict) and "from" in r for r in arg):
            raise ValueError(f"claim {cid}: {kind} takes a list of at least two references")
    elif kind in ("trend", "extreme", "ordered"):
        need = {"trend": ("from", "col", "x", "direction"), "extreme": ("from", "col", "find", "expect"),
                "ordered": ("from", "col", "by", "order")}[kind]
        missing = [k for k in need if k not in arg]
        if missing:
            raise ValueError(f"claim {cid}: {kind} needs {missing}")


# ----------------------------------------------------------------------------- selection

def _matches(row: dict, where: dict) -> bool:
    for col, want in (where or {}).items():
        if isinstance(want, str) and want in ("$max", "$min"):
            continue
        wants = want if isinstance(want, list) else [want]
        if canon(row.get(col)) not in {canon(w) for w in wants}:
            return False
    return True


def select(data: Dataset, source: str, where: dict | None, col: str) -> list[dict]:
    """Rows of `source` matching `where`. Ours: a selected row without `col` raises Missing.
    Paper: such rows are dropped (the paper does not print the value)."""
    if not data.rows.get(source):
        raise Missing(f"no {source} results{'' if data.paper else ' at this scale yet'}")
    rows = [r for r in data.rows[source] if _matches(r, where or {})]
    present = [r for r in rows if is_number(r.get(col))]
    if not data.paper and len(present) < len(rows):
        raise Missing(f"{source}.{col}: {len(present)} of {len(rows)} selected values present")
    rows = present
    if not data.paper:
        data.read.extend(_seeds_of([r], col) for r in rows)
        if data.seeds is not None:
            rows = [_first_seeds(r, col, data.seeds) for r in rows]
    for c, want in (where or {}).items():
        if want in ("$max", "$min") and rows:
            vals = [r.get(c) for r in rows if r.get(c) is not None]
            pick = (max if want == "$max" else min)(vals, key=_sort_key)
            rows = [r for r in rows if canon(r.get(c)) == canon(pick)]
    if not rows:
        raise Missing(f"no {source} rows with {col} for {_where_text(where)}")
    return rows


def _sort_key(v: Any):
    if is_number(v):
        return (0, float(v))
    if str(v) in SIZE_ORDER:
        return (0, SIZE_ORDER[str(v)])
    try:
        return (0, float(str(v)))
    except ValueError:
        return (1, str(v))


def _where_text(where: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (where or {}).items()) or "all rows"


def ref_label(ref: dict) -> str:
    return f"{ref['from']}.{ref['col']}[{_where_text(ref.get('where'))}]" + (f".{ref['agg']}" if ref.get("agg") else "")


@dataclass
class Value:
    """A selected value of ours or the paper's: the point value, and its bootstrap replicates when every selected
    row has them (the per-replicate min / max / mean for an `agg`), with the smallest sample count behind them."""

    point: float
    reps: np.ndarray | None = None
    n: int | None = None
    seeds: int = 1  # training seeds behind the value (the fewest over the selected rows; iar2/seeds.py)


def row_reps(row: dict, col: str) -> np.ndarray | None:
    r = (row.get("_boot") or {}).get(col)
    return np.asarray(r, np.float64) if r is not None and len(r) >= 2 else None


def _stack(rows: list[dict], col: str) -> np.ndarray | None:
    """(rows, B) replicates of `col`, cut to the shortest; None unless every row has them."""
    reps = [row_reps(r, col) for r in rows]
    if not reps or any(x is None for x in reps):
        return None
    b = min(len(x) for x in reps)
    return np.stack([x[:b] for x in reps])


def _n_of(rows: list[dict], col: str) -> int | None:
    ns = [(r.get("_n") or {}).get(col) for r in rows]
    return min(ns) if ns and all(isinstance(n, int) for n in ns) else None


def _first_seeds(row: dict, col: str, k: int) -> dict:
    """`row` with `col` over its first k training seeds: their mean and two-level replicates (iar2/seeds.py)."""
    sv, sb = (row.get("_sv") or {}).get(col), (row.get("_sb") or {}).get(col)
    if not sv or len(sv) <= k:
        return row
    mean, reps = seed_combine(sv[:k], sb[:k] if sb else None)
    out = {**row, col: mean}
    for key, v in (("_boot", reps), ("_seeds", k)):
        out[key] = {**(row.get(key) or {}), col: v}
    return out


def _seeds_of(rows: list[dict], col: str) -> int:
    return min(int((r.get("_seeds") or {}).get(col) or 1) for r in rows) if rows else 1


def values_of(data: Dataset, ref: dict) -> Value:
    rows = select(data, ref["from"], ref.get("where"), ref["col"])
    col = ref["col"]
    vals = [float(r[col]) for r in rows]
    reps = _stack(rows, col)
    agg = ref.get("agg")
    if agg in ("min", "max", "mean"):
        f = {"min": np.min, "max": np.max, "mean": np.mean}[agg]
        return Value(float(f(vals)), None if reps is None else f(reps, axis=0), _n_of(rows, col), _seeds_of(rows, col))
    if len(set(vals)) > 1:  # duplicate rows of one key (Table 1 prints one row twice) must agree
        raise Missing(f"{ref_label(ref)} selects {len(vals)} different values; give an agg")
    return Value(vals[0], None if reps is None else reps[0], _n_of(rows, col), _seeds_of(rows, col))


def value_of(data: Dataset, ref: dict) -> float:
    return values_of(data, ref).point


def _g(v: float) -> str:
    return f"{v:.4g}"


# ----------------------------------------------------------------------------- rules

def evaluate(rule: dict, data: Dataset) -> Outcome:
    """One rule's outcome. Its rows are compared over the training seeds they all have: a set trained on 6 seeds
    against one trained on 1 (or two guidances of one run, one seeded) compares seed 0 with seed 0, since a mean over
    seeds beside a single seed's value would differ by the seed-0 draw, not by the method. Each part of an `all`
    rule decides this for itself."""
    kind, arg = next(iter(rule.items()))
    try:
        if data.paper or kind == "all":
            return RULES[kind](arg, data)
        probe = replace(data, seeds=None, read=[])
        out = RULES[kind](arg, probe)
        if len(set(probe.read)) <= 1:
            return out
        return RULES[kind](arg, replace(data, seeds=min(probe.read), read=[]))
    except Missing as e:
        return Outcome(MISSING, str(e))


def _less(arg: list, data: Dataset) -> Outcome:
    return _order(arg, data)


def _order(arg: list, data: Dataset) -> Outcome:
    vals = [values_of(data, r) for r in arg]
    statuses, parts = [], []
    for (ra, a), (rb, b) in zip(zip(arg, vals), zip(arg[1:], vals[1:])):
        if a.reps is not None and b.reps is not None:
            m = min(len(a.reps), len(b.reps))
            lo, hi = percentile_interval(a.reps[:m] - b.reps[:m])
            st = verdict((lo, hi), "negative")
            parts.append(f"{_short(ra)} - {_short(rb)} = {_g(a.point)} - {_g(b.point)} = {_g(a.point - b.point)}, "
                         f"95% CI [{_g(lo)}, {_g(hi)}] ({m} replicates, n = {_n_text(a.n, a.seeds)} / "
                         f"{_n_text(b.n, b.seeds)})")
        else:
            st = REPRODUCED if a.point < b.point else CONTRADICTED
            parts.append(f"{_short(ra)} {_g(a.point)} {'<' if a.point < b.point else '>='} {_short(rb)} "
                         f"{_g(b.point)}" + ("" if data.paper else " (points, no interval)"))
        statuses.append(st)
    status = combine(statuses)
    return Outcome(status, ("claimed a < b; " if status != REPRODUCED else "") + "; ".join(parts))


def _n_text(n: int | None, seeds: int = 1) -> str:
    """A sample count, and the training seeds when more than one (n samples per seed)."""
    return ("?" if n is None else str(n)) + (f" x {seeds} seeds" if seeds > 1 else "")


def combine(statuses: list[str]) -> str:
    """A conjunction of parts: contradicted if any part is, else missing, else inconclusive, else reproduced."""
    for s in (CONTRADICTED, MISSING, INCONCLUSIVE):
        if s in statuses:
            return s
    return NA if statuses and set(statuses) == {NA} else REPRODUCED


def _by_fraction(statuses: list[str], frac: float) -> str:
    """Groups of a trend: reproduced when at least `frac` of them are, contradicted when that is out of reach
    even if every inconclusive group were reproduced, else inconclusive."""
    n = len(statuses)
    if statuses.count(REPRODUCED) / n >= frac:
        return REPRODUCED
    if (n - statuses.count(CONTRADICTED)) / n < frac:
        return CONTRADICTED
    return INCONCLUSIVE


def _decide_shape(ys: list[float], reps: np.ndarray | None, holds) -> tuple[str, str]:
    """(status, note) of a shape predicate `holds(values)`: by the replicates when there are, else the points."""
    if reps is None:
        return (REPRODUCED if holds(ys) else CONTRADICTED), ""
    h = [holds(list(reps[:, b])) for b in range(reps.shape[1])]
    return support_verdict(h), f" (holds in {sum(h)}/{len(h)} replicates)"


def _point_text(x, y: float, reps_row: np.ndarray | None) -> str:
    if reps_row is None:
        return f"{x}->{_g(y)}"
    lo, hi = percentile_interval(reps_row)
    return f"{x}->{_g(y)} [{_g(lo)}, {_g(hi)}]"


def _short(ref: dict) -> str:
    return f"{ref['col']}[{_where_text(ref.get('where'))}]" + (f" ({ref['agg']})" if ref.get("agg") else "")


def _groups(rows: list[dict], group_by: list[str] | None) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(canon(r.get(c)) for c in group_by or []), []).append(r)
    return out


def _group_text(group_by: list[str] | None, key: tuple) -> str:
    return ", ".join(f"{c}={k}" for c, k in zip(group_by or [], key)) or "all"


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else 0.0


def _shape_holds(ys: list[float], direction: str, strict: bool) -> bool:
    steps = list(zip(ys, ys[1:]))
    if direction in ("increasing", "decreasing"):
        if not strict:
            rho = _spearman(list(range(len(ys))), ys)
            return rho >= 0.8 if direction == "increasing" else rho <= -0.8
        return all(b > a for a, b in steps) if direction == "increasing" else all(b < a for a, b in steps)
    i = ys.index(min(ys))
    if direction == "interior_min":
        return 0 < i < len(ys) - 1
    if direction == "valley":
        return (0 < i < len(ys) - 1 and all(b < a for a, b in steps[:i]) and all(b > a for a, b in steps[i:]))
    if direction == "nonmonotonic":
        return not (all(b > a for a, b in steps) or all(b < a for a, b in steps))
    raise ValueError(f"unknown trend direction {direction!r}")


def _dedupe(rows: list[dict], cols: list[str]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        k = tuple(canon(r.get(c)) for c in cols)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _trend(arg: dict, data: Dataset) -> Outcome:
    rows = select(data, arg["from"], arg.get("where"), arg["col"])
    direction, strict = arg["direction"], arg.get("strict", True)
    need = 2 if direction in ("increasing", "decreasing") else 3
    statuses, notes = [], []
    for key, grp in _groups(rows, arg.get("group_by")).items():
        grp = sorted(_dedupe(grp, [arg["x"]]), key=lambda r: _sort_key(r.get(arg["x"])))
        if len(grp) < need:
            continue
        ys = [float(r[arg["col"]]) for r in grp]
        reps = _stack(grp, arg["col"])
        st, note = _decide_shape(ys, reps, lambda v: _shape_holds(v, direction, strict))
        statuses.append(st)
        if st != REPRODUCED or reps is not None:
            notes.append(f"{_group_text(arg.get('group_by'), key)}: [{st}]{note} " + ", ".join(
                _point_text(r[arg["x"]], y, None if reps is None else reps[i]) for i, (r, y) in enumerate(zip(grp, ys))))
    if not statuses:
        raise Missing(f"fewer than {need} points of {arg['from']}.{arg['col']} in any group")
    frac = arg.get("min_fraction", 1.0)
    what = f"{arg['col']} {direction} in {arg['x']}" + ("" if strict else " (rank correlation >= 0.8)")
    detail = f"{what}: reproduced in {statuses.count(REPRODUCED)}/{len(statuses)} group(s)" + \
        (f" (need {frac:.0%})" if frac < 1 else "")
    if notes:
        detail += "; " + "; ".join(notes[:4])
    return Outcome(_by_fraction(statuses, frac), detail)


def _extreme(arg: dict, data: Dataset) -> Outcome:
    rows = select(data, arg["from"], arg.get("where"), arg["col"])
    expect = arg["expect"]
    rows = _dedupe(rows, sorted({k for r in rows for k in r if not k.startswith("_")} - {arg["col"]}))
    if len(rows) < 2:
        raise Missing(f"{arg['from']}.{arg['col']}: fewer than two rows to compare")
    pick = min if arg["find"] == "min" else max
    ys = [float(r[arg["col"]]) for r in rows]
    st, note = _decide_shape(ys, _stack(rows, arg["col"]),
                             lambda v: _matches(rows[v.index(pick(v))], expect))
    best = rows[ys.index(pick(ys))]
    where = ", ".join(f"{k}={best.get(k)}" for k in expect)
    text = f"{arg['find']} {arg['col']} over {len(rows)} rows is {_g(float(best[arg['col']]))} at {where}"
    return Outcome(st, text + note + ("" if st == REPRODUCED else f" (expected {_where_text(expect)})"))


def _ordered(arg: dict, data: Dataset) -> Outcome:
    rows = select(data, arg["from"], arg.get("where"), arg["col"])
    order = [canon(o) for o in arg["order"]]
    direction = arg.get("direction", "increasing")
    statuses, notes, seen = [], [], {c: set() for c in arg.get("cover") or {}}
    for key, grp in _groups(rows, arg.get("group_by")).items():
        by = {canon(r.get(arg["by"])): r for r in grp}
        present = [o for o in order if o in by]
        if len(present) < 2:
            continue
        ys = [float(by[o][arg["col"]]) for o in present]
        reps = _stack([by[o] for o in present], arg["col"])
        for c in seen:
            seen[c].add(canon(grp[0].get(c)))
        st, note = _decide_shape(ys, reps, lambda v: _shape_holds(v, direction, True))
        statuses.append(st)
        if st != REPRODUCED or reps is not None:
            notes.append(f"{_group_text(arg.get('group_by'), key)}: [{st}]{note} " + ", ".join(
                _point_text(o, y, None if reps is None else reps[i]) for i, (o, y) in enumerate(zip(present, ys))))
    if not statuses:
        raise Missing(f"no group with two of {arg['order']} in {arg['from']}.{arg['col']}")
    for c, want in (arg.get("cover") or {}).items():
        lacking = {canon(w) for w in want} - seen[c]
        if lacking:
            raise Missing(f"no comparable group yet for {c} = {sorted(lacking)}")
    frac = arg.get("min_fraction", 1.0)
    detail = (f"{arg['col']} {direction} along {arg['by']} {' -> '.join(map(str, arg['order']))}: reproduced in "
              f"{statuses.count(REPRODUCED)}/{len(statuses)} group(s)" + (f" (need {frac:.0%})" if frac < 1 else ""))
    if notes:
        detail += "; " + "; ".join(notes[:4])
    return Outcome(_by_fraction(statuses, frac), detail)


def _all(arg: list, data: Dataset) -> Outcome:
    outs = [evaluate(r, data) for r in arg]
    return Outcome(combine([o.status for o in outs]), " | ".join(f"[{o.status}] {o.detail}" for o in outs))


def _na(arg: str, data: Dataset) -> Outcome:
    return Outcome(NA, str(arg))


RULES = {"less": _less, "order": _order, "trend": _trend, "extreme": _extreme, "ordered": _ordered, "all": _all,
         "na": _na}


# ----------------------------------------------------------------------------- checklist

@dataclass
class ClaimResult:
    claim: Claim
    ours: Outcome
    paper: Outcome


def check_claims(claims: list[Claim], ours: Dataset, paper: Dataset) -> list[ClaimResult]:
    out = [ClaimResult(c, evaluate(c.rule, ours), evaluate(c.rule, paper)) for c in claims]
    t = tally(out)
    log.info("claims: %s", ", ".join(f"{n} {s}" for s, n in t.items()))
    return out


def tally(results: list[ClaimResult]) -> dict[str, int]:
    t = {s: 0 for s in STATUSES}
    for r in results:
        t[r.ours.status] += 1
    return t


def tally_text(t: dict[str, int]) -> str:
    return (f"{t[REPRODUCED]} reproduced, {t[CONTRADICTED]} contradicted, {t[INCONCLUSIVE]} inconclusive, "
            f"{t[MISSING]} missing, {t[NA]} not checkable")
