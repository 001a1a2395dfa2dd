"""Claim verdicts from bootstrap replicates: reproduced / contradicted / inconclusive, never by a bare sign."""
from __future__ import annotations

import numpy as np
import pytest

from iar2.report.claims import Dataset, combine, evaluate, tally, tally_text


def _reps(centre: float, spread: float, b: int = 200, seed: int = 0) -> list[float]:
    return list(centre + spread * np.random.default_rng(seed).standard_normal(b))


def _row(method: str, fid: float, spread: float, seed: int, **cols) -> dict:
    return {"method": method, "fid": fid, "_boot": {"fid": _reps(fid, spread, seed=seed)}, "_n": {"fid": 200},
            **cols}


LESS = {"less": [{"from": "t", "col": "fid", "where": {"method": "a"}},
                 {"from": "t", "col": "fid", "where": {"method": "b"}}]}


@pytest.mark.parametrize("fid_a,fid_b,spread,want", [
    (10.0, 12.0, 0.3, "reproduced"),     # the whole interval of a - b lies below 0
    (12.0, 10.0, 0.3, "contradicted"),   # above 0
    (32.85, 32.87, 0.3, "inconclusive"),  # C11's 32.85 < 32.87: a sign, not a finding
])
def test_less_is_decided_by_the_interval_of_the_difference(fid_a, fid_b, spread, want):
    data = Dataset({"t": [_row("a", fid_a, spread, 1), _row("b", fid_b, spread, 2)]})
    out = evaluate(LESS, data)
    assert out.status == want
    assert "95% CI" in out.detail and "200 replicates" in out.detail and "n = 200 / 200" in out.detail


def test_without_replicates_points_decide_and_say_so():
    data = Dataset({"t": [{"method": "a", "fid": 32.85}, {"method": "b", "fid": 32.87}]})
    out = evaluate(LESS, data)
    assert out.status == "reproduced" and "no interval" in out.detail
    paper = Dataset({"t": [{"method": "a", "fid": 33.0}, {"method": "b", "fid": 32.0}]}, paper=True)
    assert evaluate(LESS, paper).status == "contradicted"


def test_paired_replicates_decide_what_unpaired_spreads_would_not():
    # b = a + 0.2 in every replicate (a shared reference resample moves both): the pair is decided although each
    # value's own interval is wide
    a = _reps(30.0, 3.0, seed=5)
    data = Dataset({"t": [{"method": "a", "fid": 30.0, "_boot": {"fid": a}},
                          {"method": "b", "fid": 30.2, "_boot": {"fid": [x + 0.2 for x in a]}}]})
    assert evaluate(LESS, data).status == "reproduced"


def test_agg_min_is_taken_per_replicate():
    # PAG vs the best static scale: the best static is the per-replicate minimum over the static rows
    rows = [_row("pag", 10.0, 0.2, 1, mode="pag"),
            _row("s1", 10.5, 0.2, 2, mode="static"), _row("s2", 14.0, 0.2, 3, mode="static")]
    rule = {"less": [{"from": "t", "col": "fid", "where": {"mode": "pag"}},
                     {"from": "t", "col": "fid", "where": {"mode": "static"}, "agg": "min"}]}
    out = evaluate(rule, Dataset({"t": rows}))
    assert out.status == "reproduced" and "10.5" in out.detail
    rows[1] = _row("s1", 9.9, 0.2, 2, mode="static")
    assert evaluate(rule, Dataset({"t": rows})).status in ("inconclusive", "contradicted")


def _trend_rows(ys, spread):
    return [{"x": x, "fid": y, "_boot": {"fid": _reps(y, spread, seed=10 + x)}, "_n": {"fid": 100}}
            for x, y in zip((1, 2, 3, 4), ys)]


@pytest.mark.parametrize("ys,spread,want", [
    ((40.0, 30.0, 20.0, 10.0), 0.5, "reproduced"),
    ((10.0, 20.0, 30.0, 40.0), 0.5, "contradicted"),
    ((20.0, 19.9, 19.8, 19.7), 0.5, "inconclusive"),
])
def test_trend_carries_the_per_point_intervals(ys, spread, want):
    rule = {"trend": {"from": "f", "col": "fid", "x": "x", "direction": "decreasing"}}
    out = evaluate(rule, Dataset({"f": _trend_rows(ys, spread)}))
    assert out.status == want
    assert "replicates" in out.detail and "[" in out.detail  # each point's interval is shown


def test_extreme_by_the_share_of_replicates():
    rule = {"extreme": {"from": "f", "col": "fid", "find": "min", "expect": {"x": 2}}}
    clear = _trend_rows((30.0, 10.0, 20.0, 40.0), 0.5)
    assert evaluate(rule, Dataset({"f": clear})).status == "reproduced"
    close = _trend_rows((10.05, 10.0, 20.0, 40.0), 0.5)
    assert evaluate(rule, Dataset({"f": close})).status == "inconclusive"
    wrong = _trend_rows((5.0, 10.0, 20.0, 40.0), 0.5)
    assert evaluate(rule, Dataset({"f": wrong})).status == "contradicted"


def test_combine_and_tally():
    assert combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert combine(["inconclusive", "contradicted"]) == "contradicted"
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["missing", "inconclusive"]) == "missing"
    t = {"reproduced": 3, "contradicted": 1, "inconclusive": 2, "missing": 4, "n/a": 1}
    assert tally_text(t) == "3 reproduced, 1 contradicted, 2 inconclusive, 4 missing, 1 not checkable"
    assert tally([]) == {"reproduced": 0, "contradicted": 0, "inconclusive": 0, "missing": 0, "n/a": 0}


def test_metric_cells_carry_their_replicates(tmp_path):
    import json

    from iar2.report.sources import Results

    (tmp_path / "m.json").write_text(json.dumps({"fid": 5.0, "isc_mean": 3.0, "bootstrap": {
        "replicates": 3, "num_generated": 40, "fid": [5.1, 4.9, 5.0], "isc_mean": [3.0, 3.1, 2.9]}}))
    (tmp_path / "r.json").write_text(json.dumps({"rfid": 2.0}))
    r = Results.open(tmp_path)
    c = r.cell({"file": "m.json", "field": "fid"})
    assert c.value == 5.0 and c.replicates == [5.1, 4.9, 5.0] and c.samples == 40
    assert r.cell({"file": "r.json", "field": "rfid"}).replicates is None
    got = r.intervals_of({"fid": {"file": "m.json", "field": "fid"}, "is": {"file": "m.json", "field": "isc_mean"},
                          "rfid": {"file": "r.json", "field": "rfid"}})
    assert got == {"_boot": {"fid": [5.1, 4.9, 5.0], "is": [3.0, 3.1, 2.9]}, "_n": {"fid": 40, "is": 40},
                   "_seeds": {"fid": 1, "is": 1}}
