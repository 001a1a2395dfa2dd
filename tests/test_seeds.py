"""Training seeds as a plan axis (iar2/seeds.py): which runs and sets the scale's `seeds:` adds, that a seeded copy
differs from its run only in the training seed, and the two-level bootstrap of a number over seeds."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from iar2 import layout
from iar2.bootstrap import percentile_interval
from iar2.config import ConfigError
from iar2.registry.plan import Plan
from iar2.report.claims import Dataset, evaluate
from iar2.report.sources import Results
from iar2.seeds import combine, t_factor

ROOT = Path(__file__).resolve().parents[1]
SETS = ["ar/iar2-B-24/e300/pag-1.75-3.0", "ar/iar2-B-24/e300/static-*", "ar/llamagen-B-24/e300/*"]


@pytest.fixture(scope="module")
def experiments() -> dict:
    return yaml.safe_load((ROOT / "params" / "experiments.yaml").read_text())


def ci(**extra) -> dict:
    return {**yaml.safe_load((ROOT / "params" / "ci.yaml").read_text()), **extra}


@pytest.fixture(scope="module")
def plans(experiments):
    return Plan(experiments, ci()), Plan(experiments, ci(seeds=[{"count": 3, "sets": SETS}]))


def _without(cfg: dict, *dotted: str) -> dict:
    cfg = copy.deepcopy(cfg)
    for d in dotted:
        *head, last = d.split(".")
        node = cfg
        for h in head:
            node = node[h]
        node.pop(last, None)
    return cfg


def test_seeded_copies_differ_from_their_run_only_in_the_training_seed(plans):
    base, seeded = plans
    added = sorted(set(seeded.runs) - set(base.runs))
    assert added == ["iar2-B-24-seed1", "iar2-B-24-seed2", "llamagen-B-24-seed1", "llamagen-B-24-seed2"]
    for rid in ("iar2-B-24", "llamagen-B-24"):
        orig = seeded.ar_config(rid)
        assert orig == base.ar_config(rid)  # the run itself is untouched
        for k in (1, 2):
            c = seeded.ar_config(f"{rid}-seed{k}")
            assert c["train"]["seed"] == orig["train"]["seed"] + k
            assert _without(c, "name", "train.seed") == _without(orig, "name", "train.seed")


def test_only_matching_sets_are_seeded_and_their_sources_list_the_copies(plans):
    base, seeded = plans
    new = sorted(set(seeded.samples) - set(base.samples))
    want = sorted(layout.sample_id(f"{r}-seed{k}", 300, g) for k in (1, 2) for r, g in
                  [("iar2-B-24", "pag-1.75-3.0"), ("iar2-B-24", "static-1.0"), ("iar2-B-24", "static-2.0"),
                   ("iar2-B-24", "static-2.25"), ("llamagen-B-24", "static-2.25")])
    assert new == want  # prog-1.75-3.0 and pag-1.75-2.5 do not match a pattern
    for s in new:
        orig = seeded.samples[s.replace("-seed1/", "/").replace("-seed2/", "/")]
        assert seeded.sample_config(seeded.samples[s].guidance, s) == seeded.sample_config(orig.guidance, orig.id)
    fig = seeded.figures["fig7a"]["series"][0]
    assert fig["pag"]["fid"]["seeds"] == [layout.gen_metrics(f"iar2-B-24-seed{k}/e300/pag-1.75-3.0") for k in (1, 2)]
    srcs = [row["values"]["fid"] for row in seeded.tables["table8"]["rows"]]
    assert any("seeds" in s for s in srcs) and any("seeds" not in s for s in srcs)  # e100 rows stay single-seed
    assert "seeds" not in json.dumps(base.tables) + json.dumps(base.figures)


def test_one_seed_or_a_pattern_that_matches_nothing(experiments, plans):
    base, _ = plans
    one = Plan(experiments, ci(seeds=[{"count": 1, "sets": SETS}]))
    assert set(one.runs) == set(base.runs) and set(one.samples) == set(base.samples)
    with pytest.raises(ConfigError, match=r"seeds\[1\].sets: 'ar/iar2-B-24/e999/\*' matches no sample set"):
        Plan(experiments, ci(seeds=[{"count": 2, "sets": SETS}, {"count": 2, "sets": ["ar/iar2-B-24/e999/*"]}]))


def test_a_set_in_two_groups_gets_the_larger_count(experiments):
    p = Plan(experiments, ci(seeds=[{"count": 3, "sets": SETS},
                                    {"count": 4, "sets": ["ar/iar2-B-24/e300/pag-1.75-3.0"]}]))
    assert "iar2-B-24-seed3" in p.runs and "llamagen-B-24-seed3" not in p.runs
    assert [s for s in p.samples if s.startswith("iar2-B-24-seed3/")] == ["iar2-B-24-seed3/e300/pag-1.75-3.0"]
    fig = p.figures["fig7a"]["series"][0]
    assert len(fig["pag"]["fid"]["seeds"]) == 3 and len(fig["static"][0]["fid"]["seeds"]) == 2


def test_t_factor_widens_small_seed_counts_to_a_t_interval():
    assert t_factor(1) == 1.0
    assert t_factor(4) == pytest.approx(3.1824 / (1.95996 * np.sqrt(3 / 4)), rel=1e-4)
    assert t_factor(4) > t_factor(8) > t_factor(100) > 1.0
    assert t_factor(100) == pytest.approx(1.0, abs=0.02)


def test_seed_part_of_the_replicates_has_the_t_intervals_width():
    # no sampling noise: every seed's replicates equal its value, so the spread is the seeds' alone
    v = [10.0, 14.0, 9.0, 17.0]
    b = 20000
    mean, reps = combine(v, [[x] * b for x in v])
    assert mean == pytest.approx(np.mean(v))
    want = t_factor(4) * np.sqrt(3 / 4) * np.std(v, ddof=1) / 2  # t / 1.96 x the standard error
    assert np.std(reps) == pytest.approx(want, rel=0.03)


def test_no_seed_spread_leaves_the_sampling_replicates():
    rng = np.random.default_rng(0)
    within = rng.normal(0.0, 1.0, 200)
    mean, reps = combine([5.0, 5.0, 5.0], [list(5.0 + within)] * 3)
    assert mean == 5.0 and np.allclose(reps, 5.0 + within)
    one_mean, one = combine([7.0], [list(within)])
    assert one_mean == 7.0 and one == list(within)
    assert combine([1.0, 3.0], None) == (2.0, None)


def test_seed_draws_are_paired_across_sets():
    # B's seeds are A's shifted by 2: replicate b draws the same seeds for both, so every difference is exactly 2
    rng = np.random.default_rng(1)
    v = [3.0, 8.0, 4.0, 12.0]
    within = [list(rng.normal(0, 1, 100)) for _ in v]
    _, a = combine([x + 2 for x in v], [[x + 2 + w for w in ws] for x, ws in zip(v, within)])
    _, b = combine(v, [[x + w for w in ws] for x, ws in zip(v, within)])
    assert np.allclose(np.subtract(a, b), 2.0)


def _metrics(root: Path, sid: str, fid: float, reps: list[float]) -> str:
    rel = layout.gen_metrics(sid)
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"fid": fid, "bootstrap": {"fid": reps, "num_generated": 200}}))
    return rel


def test_a_seeded_cell_is_the_mean_and_decides_over_seeds(tmp_path):
    """A comparison that one seed decides (IAR2's seed 0 far ahead) is inconclusive once the seeds' spread counts."""
    rng = np.random.default_rng(2)
    noise = list(rng.normal(0, 0.5, 200))
    iar2 = [4.0, 12.0, 6.0, 15.0]
    llama = [10.0, 9.0, 11.0, 10.5]

    def source(run, vals):
        files = [_metrics(tmp_path, f"{run}{'' if k == 0 else f'-seed{k}'}/e300/g", v, [v + e for e in noise])
                 for k, v in enumerate(vals)]
        return {"file": files[0], "field": "fid", "run": f"ar/{run}/e300/g", "seeds": files[1:]}

    res = Results(root=tmp_path)
    a, b = source("iar2-B-24", iar2), source("llamagen-B-24", llama)
    ca, cb = res.cell(a), res.cell(b)
    assert ca.ok and ca.value == pytest.approx(np.mean(iar2)) and ca.seeds == 4 and ca.samples == 200
    rows = {"t": [{"m": "IAR2", "fid": ca.value, **res.intervals_of({"fid": a})},
                  {"m": "LlamaGen", "fid": cb.value, **res.intervals_of({"fid": b})}]}
    less = {"less": [{"from": "t", "col": "fid", "where": {"m": "IAR2"}},
                     {"from": "t", "col": "fid", "where": {"m": "LlamaGen"}}]}
    out = evaluate(less, Dataset(rows))
    assert out.status == "inconclusive" and "n = 200 x 4 seeds / 200 x 4 seeds" in out.detail
    # seed 0 alone: 4.0 against 10.0, decided on sampling noise
    single = {"t": [{"m": "IAR2", "fid": 4.0, "_boot": {"fid": [4.0 + e for e in noise]}},
                    {"m": "LlamaGen", "fid": 10.0, "_boot": {"fid": [10.0 + e * 0.9 for e in noise]}}]}
    assert evaluate(less, Dataset(single)).status == "reproduced"
    lo, hi = percentile_interval(np.subtract(res.cell(a).replicates, res.cell(b).replicates))
    assert lo < 0 < hi


def test_a_seeded_cell_with_a_seed_missing_is_missing(tmp_path):
    files = [_metrics(tmp_path, "r/e1/g", 3.0, [3.0, 3.1]), _metrics(tmp_path, "r-seed1/e1/g", 5.0, [5.0, 5.2])]
    src = {"file": files[0], "field": "fid", "run": "ar/r/e1/g",
           "seeds": [files[1], layout.gen_metrics("r-seed2/e1/g")]}
    c = Results(root=tmp_path).cell(src)
    assert not c.ok and c.value is None  # not the mean of the two present: that would be another number
    (tmp_path / layout.gen_metrics("r-seed2/e1/g")).parent.mkdir(parents=True)
    _metrics(tmp_path, "r-seed2/e1/g", 4.0, [4.0, 4.3])
    c = Results(root=tmp_path).cell(src)
    assert c.ok and c.value == pytest.approx(4.0) and c.seeds == 3 and len(c.replicates) == 2


@pytest.mark.slow
def test_seeds_on_a_finished_run_train_only_the_copies_and_reach_the_report(ci_workspace_root, tmp_path):
    """On a finished ci run, `seeds: {count: 2}` on IAR2-B-24 and LlamaGen-B-24 at 300 epochs plans the two copies'
    training and their matched sets' sampling and metrics, nothing else; their report cells are means over two seeds
    and the claims say so. Dropping `seeds` again reruns only the index, summary and report, and the report is the
    one from before."""
    import shutil
    import subprocess
    from collections import Counter

    from test_workflow import job_counts

    ws = shutil.copytree(ci_workspace_root, tmp_path / "ws", symlinks=True)
    report = ws / "reports" / "ci" / "report.md"
    before = report.read_text()
    overlay = tmp_path / "seeds.yaml"
    overlay.write_text(yaml.safe_dump({"seeds": [{"count": 2, "sets": ["ar/iar2-B-24/e300/pag-1.75-3.0",
                                                                       "ar/llamagen-B-24/e300/*"]}]}))

    def smk(*args):
        return subprocess.run(["snakemake", "--cores", "2", "reproduce_all", "--config", "scale=ci", *args], cwd=ws,
                              capture_output=True, text=True, timeout=1500)

    plan = smk("--configfile", str(overlay), "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert job_counts(plan.stdout) == Counter({"ar_train": 2, "sample": 2, "gen_metrics": 2, "registry_index": 1,
                                               "summary": 1, "report": 1, "reproduce_all": 1}), plan.stdout[-2000:]
    run = smk("--configfile", str(overlay))
    assert run.returncode == 0, run.stderr[-3000:]
    cfg = lambda rid: yaml.safe_load((ws / "results" / "ci" / layout.ar_run_config(rid)).read_text())  # noqa: E731
    assert cfg("iar2-B-24-seed1")["train"]["seed"] == cfg("iar2-B-24")["train"]["seed"] + 1
    seeded = report.read_text()
    assert "(2 seeds)" in seeded and "(2 seeds)" not in before
    claims = (ws / "reports" / "ci" / "claims.md").read_text()
    assert "x 2 seeds" in claims.split("| C27 |")[1].split("\n")[0]
    again = smk("-n")
    assert again.returncode == 0, again.stderr[-3000:]
    assert job_counts(again.stdout) == Counter({"registry_index": 1, "summary": 1, "report": 1, "reproduce_all": 1})
    assert smk().returncode == 0
    strip = lambda md: [ln for ln in md.splitlines() if not ln.startswith("Results `")]  # noqa: E731
    assert strip(report.read_text()) == strip(before)


def test_a_claim_compares_its_rows_over_the_seeds_they_all_have():
    """Two guidances of one run, one trained on 3 seeds: the claim compares seed 0 with seed 0 (a mean over seeds
    beside one seed's value differs by that seed's draw, not by the guidance); two seeded sets, 3 and 2 seeds: 2."""
    rng = np.random.default_rng(3)
    noise = list(rng.normal(0, 0.2, 200))

    def row(g, vals):
        reps = [[v + e for e in noise] for v in vals]
        mean, boot = combine(vals, reps)
        out = {"g": g, "fid": mean, "_boot": {"fid": boot}, "_n": {"fid": 200}, "_seeds": {"fid": len(vals)}}
        if len(vals) > 1:
            out.update({"_sv": {"fid": vals}, "_sb": {"fid": reps}})
        return out

    less = {"less": [{"from": "t", "col": "fid", "where": {"g": "pag"}},
                     {"from": "t", "col": "fid", "where": {"g": "static"}}]}
    # seed 0 is a bad draw for both guidances (30 and 31): over 3 seeds PAG's mean (20) looks far better
    mixed = Dataset({"t": [row("pag", [30.0, 15.0, 15.0]), row("static", [31.0])]})
    out = evaluate(less, mixed)
    assert out.status == "reproduced" and "= 30 - 31 = -1" in out.detail and "x 3 seeds" not in out.detail
    both = Dataset({"t": [row("pag", [10.0, 12.0, 40.0]), row("static", [14.0, 15.0])]})
    out = evaluate(less, both)
    assert "= 11 - 14.5" in out.detail and out.detail.count("x 2 seeds") == 2
    same = Dataset({"t": [row("pag", [10.0, 12.0, 11.0]), row("static", [14.0, 15.0, 16.0])]})
    assert "n = 200 x 3 seeds / 200 x 3 seeds" in evaluate(less, same).detail


def test_without_replicates_a_seeded_row_is_still_compared_on_common_seeds(tmp_path):
    """A scale with `gen_metrics.bootstrap: 0` writes no replicates: the claim then compares points, and a seeded set
    beside a one-seed set of the same run still reads seed 0's value, not the mean over seeds."""
    files = []
    for k, v in enumerate([30.0, 15.0, 15.0]):
        p = tmp_path / layout.gen_metrics(f"r{'' if k == 0 else f'-seed{k}'}/e1/pag")
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"fid": v}))
        files.append(layout.gen_metrics(f"r{'' if k == 0 else f'-seed{k}'}/e1/pag"))
    single = tmp_path / layout.gen_metrics("r/e1/static")
    single.parent.mkdir(parents=True)
    single.write_text(json.dumps({"fid": 31.0}))
    res = Results(root=tmp_path)
    pag = {"file": files[0], "field": "fid", "seeds": files[1:]}
    static = {"file": layout.gen_metrics("r/e1/static"), "field": "fid"}
    rows = {"t": [{"g": "pag", "fid": res.cell(pag).value, **res.intervals_of({"fid": pag})},
                  {"g": "static", "fid": res.cell(static).value, **res.intervals_of({"fid": static})}]}
    assert rows["t"][0]["fid"] == pytest.approx(20.0) and rows["t"][0]["_seeds"] == {"fid": 3}
    less = {"less": [{"from": "t", "col": "fid", "where": {"g": "pag"}},
                     {"from": "t", "col": "fid", "where": {"g": "static"}}]}
    out = evaluate(less, Dataset(rows))
    assert out.status == "reproduced" and "fid[g=pag] 30 < fid[g=static] 31" in out.detail
