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

Outcome: reproduced, not reproduced, missing (not enough of our results yet) or n/a. Each rule is also run on the
paper's own numbers, which checks the encoding (a rule the paper's data fails is visible in the report).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iar2.report.sources import canon, is_number

log = logging.getLogger(__name__)

REPRODUCED, NOT_REPRODUCED, MISSING, NA = "reproduced", "not reproduced", "missing", "n/a"
STATUSES = (REPRODUCED, NOT_REPRODUCED, MISSING, NA)
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
    paper=False: it is one of ours not produced yet (the check is missing)."""

    rows: dict[str, list[dict]]
    paper: bool = False


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


def value_of(data: Dataset, ref: dict) -> float:
    rows = select(data, ref["from"], ref.get("where"), ref["col"])
    vals = [float(r[ref["col"]]) for r in rows]
    agg = ref.get("agg")
    if agg == "min":
        return min(vals)
    if agg == "max":
        return max(vals)
    if agg == "mean":
        return sum(vals) / len(vals)
    if len(set(vals)) > 1:  # duplicate rows of one key (Table 1 prints one row twice) must agree
        raise Missing(f"{ref_label(ref)} selects {len(vals)} different values; give an agg")
    return vals[0]


def _g(v: float) -> str:
    return f"{v:.4g}"


# ----------------------------------------------------------------------------- rules

def evaluate(rule: dict, data: Dataset) -> Outcome:
    kind, arg = next(iter(rule.items()))
    try:
        return RULES[kind](arg, data)
    except Missing as e:
        return Outcome(MISSING, str(e))


def _less(arg: list, data: Dataset) -> Outcome:
    return _order(arg, data)


def _order(arg: list, data: Dataset) -> Outcome:
    vals = [value_of(data, r) for r in arg]
    ok = all(a < b for a, b in zip(vals, vals[1:]))
    text = " < ".join(f"{_short(r)} {_g(v)}" for r, v in zip(arg, vals))
    return Outcome(REPRODUCED if ok else NOT_REPRODUCED, text if ok else f"expected {text}")


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
    checked, held, fails = 0, 0, []
    for key, grp in _groups(rows, arg.get("group_by")).items():
        grp = sorted(_dedupe(grp, [arg["x"]]), key=lambda r: _sort_key(r.get(arg["x"])))
        if len(grp) < need:
            continue
        ys = [float(r[arg["col"]]) for r in grp]
        checked += 1
        if _shape_holds(ys, direction, strict):
            held += 1
        else:
            fails.append(f"{_group_text(arg.get('group_by'), key)}: "
                         + ", ".join(f"{r[arg['x']]}->{_g(y)}" for r, y in zip(grp, ys)))
    if checked == 0:
        raise Missing(f"fewer than {need} points of {arg['from']}.{arg['col']} in any group")
    frac = arg.get("min_fraction", 1.0)
    ok = held / checked >= frac
    what = f"{arg['col']} {direction} in {arg['x']}" + ("" if strict else " (rank correlation >= 0.8)")
    detail = f"{what}: holds in {held}/{checked} group(s)" + (f" (need {frac:.0%})" if frac < 1 else "")
    if fails:
        detail += "; fails at " + "; ".join(fails[:3])
    return Outcome(REPRODUCED if ok else NOT_REPRODUCED, detail)


def _extreme(arg: dict, data: Dataset) -> Outcome:
    rows = select(data, arg["from"], arg.get("where"), arg["col"])
    expect = arg["expect"]
    rows = _dedupe(rows, sorted({k for r in rows for k in r if not k.startswith("_")} - {arg["col"]}))
    if len(rows) < 2:
        raise Missing(f"{arg['from']}.{arg['col']}: fewer than two rows to compare")
    best = (min if arg["find"] == "min" else max)(rows, key=lambda r: float(r[arg["col"]]))
    ok = _matches(best, expect)
    where = ", ".join(f"{k}={best.get(k)}" for k in expect)
    text = f"{arg['find']} {arg['col']} over {len(rows)} rows is {_g(float(best[arg['col']]))} at {where}"
    return Outcome(REPRODUCED if ok else NOT_REPRODUCED, text + ("" if ok else f" (expected {_where_text(expect)})"))


def _ordered(arg: dict, data: Dataset) -> Outcome:
    rows = select(data, arg["from"], arg.get("where"), arg["col"])
    order = [canon(o) for o in arg["order"]]
    direction = arg.get("direction", "increasing")
    checked, held, fails, seen = 0, 0, [], {c: set() for c in arg.get("cover") or {}}
    for key, grp in _groups(rows, arg.get("group_by")).items():
        by = {canon(r.get(arg["by"])): float(r[arg["col"]]) for r in grp}
        present = [o for o in order if o in by]
        if len(present) < 2:
            continue
        ys = [by[o] for o in present]
        checked += 1
        for c in seen:
            seen[c].add(canon(grp[0].get(c)))
        if _shape_holds(ys, direction, True):
            held += 1
        else:
            fails.append(f"{_group_text(arg.get('group_by'), key)}: "
                         + ", ".join(f"{o} {_g(y)}" for o, y in zip(present, ys)))
    if checked == 0:
        raise Missing(f"no group with two of {arg['order']} in {arg['from']}.{arg['col']}")
    for c, want in (arg.get("cover") or {}).items():
        lacking = {canon(w) for w in want} - seen[c]
        if lacking:
            raise Missing(f"no comparable group yet for {c} = {sorted(lacking)}")
    frac = arg.get("min_fraction", 1.0)
    ok = held / checked >= frac
    detail = (f"{arg['col']} {direction} along {arg['by']} {' -> '.join(map(str, arg['order']))}: holds in "
              f"{held}/{checked} group(s)" + (f" (need {frac:.0%})" if frac < 1 else ""))
    if fails:
        detail += "; fails at " + "; ".join(fails[:3])
    return Outcome(REPRODUCED if ok else NOT_REPRODUCED, detail)


def _all(arg: list, data: Dataset) -> Outcome:
    outs = [evaluate(r, data) for r in arg]
    statuses = {o.status for o in outs}
    if NOT_REPRODUCED in statuses:
        status = NOT_REPRODUCED
    elif MISSING in statuses:
        status = MISSING
    elif statuses == {NA}:
        status = NA
    else:
        status = REPRODUCED
    return Outcome(status, " | ".join(f"[{o.status}] {o.detail}" for o in outs))


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
