"""The experiment registry (params/experiments.yaml) resolved at each scale: every table and figure is there,
shared runs are one job, sweeps expand as the paper's tables, bad entries are rejected naming the key."""
from __future__ import annotations

import copy
import csv
import re
from pathlib import Path

import pytest
import yaml

from iar2.config import ConfigError
from iar2.registry import GuidanceId, Plan, RegistryIndex, load_plan, load_yaml
from iar2.registry.guidance import PATTERN

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "params" / "paper"


def scale(name: str) -> dict:
    return load_yaml(ROOT / "params" / f"{name}.yaml")


@pytest.fixture(scope="module")
def paper() -> Plan:
    return load_plan(ROOT, scale("paper"))


@pytest.fixture(scope="module")
def experiments() -> dict:
    return load_yaml(ROOT / "params" / "experiments.yaml")


def paper_rows(csv_name: str) -> list[dict]:
    with open(PAPER / csv_name, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_table_and_figure_is_registered(paper):
    assert sorted(paper.tables, key=lambda t: int(t[5:])) == [f"table{i}" for i in range(1, 14)]
    assert set(paper.figures) == {"fig3", "fig4", "fig7a", "fig7b", "fig7c", "fig8", "fig9"}


@pytest.mark.parametrize("tid", [f"table{i}" for i in range(1, 14)])
def test_rows_match_the_paper_tables_keys(paper, tid):
    """Every paper row we reproduce is found by its key columns (Table 2's other methods and Table 13's other
    tokenizers are the paper's only); the paper scale covers all of Tables 1, 3-12."""
    t = paper.tables[tid]
    rows = paper_rows(t["paper_csv"])
    paper_keys = {tuple(r[k] for k in t["key"]) for r in rows}

    def norm(v):
        return str(v).lower() if isinstance(v, bool) else (f"{v:g}" if isinstance(v, float) else str(v))

    ours = {tuple(norm(r["key"][k]) for k in t["key"]) for r in t["rows"]}
    paper_norm = {tuple(norm(float(x)) if _num(x) else x for x in k) for k in paper_keys}
    ours_norm = {tuple(norm(float(x)) if _num(x) else x for x in k) for k in ours}
    assert ours_norm <= paper_norm, ours_norm - paper_norm
    if tid not in ("table2", "table13"):
        assert ours_norm == paper_norm
    assert len(t["rows"]) == len(ours)  # no row twice


def _num(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def test_shared_runs_are_one_job(paper):
    # Table 10's s = 2 is IAR2-B's default: the same run as Tables 3/4/8/9's IAR2-B-24.
    t10 = {r["key"]["s"]: r["sample"] for r in paper.tables["table10"]["rows"]}
    assert t10[2].startswith("iar2-B-24/e100/")
    assert "iar2-B-24-s2" not in paper.runs
    # Table 8's 300-epoch full row is Table 3's IAR2-B 24x24 300-epoch cell, and Table 9's (1.75, 3.0) cell.
    t8 = [r for r in paper.tables["table8"]["rows"] if r["key"]["epochs"] == 300 and r["key"]["attention_guided"]]
    t3 = [r for r in paper.tables["table3"]["rows"] if r["key"] == {"tokens": "24x24", "model": "IAR2-B", "epochs": 300}]
    t9 = [r for r in paper.tables["table9"]["rows"] if r["key"] == {"cfg_start": 1.75, "cfg_end": 3.0}]
    assert t8[0]["sample"] == t3[0]["sample"] == t9[0]["sample"] == "iar2-B-24/e300/pag-1.75-3.0"
    # Table 4's association + local context row is Table 8's 100-epoch static row.
    t4 = [r for r in paper.tables["table4"]["rows"] if r["key"] == {"semantic_detail_association": True,
                                                                     "local_context": True, "pag_cfg": False}]
    t8s = [r for r in paper.tables["table8"]["rows"] if r["key"]["epochs"] == 100 and not r["key"]["progressive"]]
    assert t4[0]["sample"] == t8s[0]["sample"]
    # One run exports every epoch its consumers sample (Figure 7c, Tables 3, 4, 8, 9).
    assert paper.runs["iar2-B-24"].epochs == {50, 100, 150, 200, 250, 300}
    assert paper.runs["iar2-XL-16"].epochs == {50}  # "-" in Table 3's 300-epoch column
    # Every run id is unique per resolved config.
    keys = [repr(paper.ar_config(r, identity=True)) for r in paper.runs]
    assert len(keys) == len(set(keys))


def test_resolved_configs_follow_tables_11_and_12(paper):
    b16 = paper.ar_config("iar2-B-16")
    assert b16["model"]["size"] == "B" and b16["model"]["semantic_weight"] == 2.0
    assert b16["train"]["lr"] == 1e-4 and b16["train"]["lr_schedule"] == "constant" and b16["train"]["fsdp"]
    xxl24 = paper.ar_config("iar2-XXL-24")
    assert xxl24["model"]["semantic_weight"] == 1.5 and xxl24["train"]["batch_size"] == 512
    assert (xxl24["train"]["lr"], xxl24["train"]["lr_end"], xxl24["train"]["lr_schedule"]) == (3e-4, 1e-4, "cosine")
    assert paper.ar_config("iar2-L-24")["model"]["semantic_weight"] == 1.0
    assert paper.ar_config("iar2-B-24")["model"]["grid"] == 24 and b16["model"]["grid"] == 16
    assert paper.ar_config("iar-B-16")["model"]["cluster_size"] == 16384 // 128
    t12 = {(r["key"]["model"], r["key"]["tokens"]): r["guidance"] for r in paper.tables["table12"]["rows"]}
    assert t12[("IAR2-XXL", "24x24")] == "pag-1.4-3.15" and t12[("IAR2-L", "16x16")] == "pag-1.4-2.5"
    g = paper.sample_config("pag-1.4-3.15")["sampling"]["guidance"]
    assert g["mode"] == "pag" and list(g["semantic"]) == [1.4, 3.15] == list(g["detail"])
    assert paper.sample_config("pag-1.4-3.15-reject")["reject"]["classifier"] == "resnet50"


def test_codebooks_and_grids_map_per_scale():
    d = load_plan(ROOT, scale("default"))
    assert d.tokenizer_config("sd-256-4096", "stage2")["model"]["semantic_size"] == 16
    assert d.ar_config("iar2-B-24")["model"]["grid"] == 12  # 48 px / 4
    assert d.ar_config("llamagen-B-16")["model"]["vocab_size"] == 1024
    assert d.ar_config("iar2-B-24")["train"]["epoch_steps"] == d.s.ar.epoch_steps == 0.75


def test_ci_restricts_sweeps_but_keeps_every_table(experiments):
    ci = load_plan(ROOT, scale("ci"))
    assert set(ci.tables) == {f"table{i}" for i in range(1, 14)}
    assert all(t["rows"] for t in ci.tables.values())
    assert {r["key"]["s"] for r in ci.tables["table10"]["rows"]} == {1, 2}
    assert all(r.size == "B" or r.id.startswith(("iar2-XL-24", "iar2-XXL-24")) for r in ci.runs.values())


def test_guidance_ids():
    assert GuidanceId.parse("static-2.25").config() == {"mode": "static", "scale": 2.25}
    p = GuidanceId.parse("grid-pag-1.35-3.0")
    assert p.grid and not p.reject and p.config()["semantic"] == [1.35, 3.0]
    assert GuidanceId.parse("prog-1.75-3.0").config()["mode"] == "progressive"
    assert GuidanceId.parse("pag-1.4-3.15-reject") == GuidanceId("pag", (1.4, 3.15), reject=True)


@pytest.mark.parametrize("text", ["static-2.25", "static-1.0", "prog-1.75-3.0", "pag-1.4-3.15", "pag-1.4-3.15-reject",
                                  "grid-pag-1.35-3.0", "grid-static-2.0-reject"])
def test_guidance_id_round_trips(text):
    gid = GuidanceId.parse(text)
    assert str(gid) == text and GuidanceId.parse(str(gid)) == gid
    assert re.fullmatch(PATTERN, text)  # the rules' wildcard accepts every id


@pytest.mark.parametrize("bad, message", [
    ("static-1-2", "static takes one scale (static-<scale>)"),
    ("pag-1.5", "pag takes a start and an end (pag-<start>-<end>)"),
    ("cfg-2.0", "is not a guidance id; allowed forms: static-<scale>, prog-<start>-<end>, pag-<start>-<end>"),
    ("pag-a-b", "is not a guidance id"),
    ("pag-.-.", "are not numbers"),
    ("static-2", "write it as 'static-2.0'"),  # one spelling per setup, so one sample set per setup
])
def test_bad_guidance_ids_are_refused_with_the_allowed_forms(bad, message):
    with pytest.raises(ConfigError) as e:
        GuidanceId.parse(bad)
    assert str(e.value).startswith(f"guidance: {bad!r}") and message in str(e.value)


@pytest.mark.parametrize("edit, match", [
    (lambda x: x["tables"]["table7"]["rows"][0]["sample"]["run"].update(family="dit"), "family.*allowed values"),
    (lambda x: x["tables"]["table7"]["rows"][0]["sample"]["run"].update(size="XXXL"), "size.*allowed values"),
    (lambda x: x["tables"]["table7"]["rows"][0]["sample"]["run"].update(tokenizer="vq-3"), "tokenizer.*allowed"),
    (lambda x: x["tables"]["table7"]["rows"][0]["sample"]["run"].update(colour="red"), "unknown key"),
    (lambda x: x["tables"]["table7"]["rows"][0]["sample"].update(guidance="cfg-2"), "guidance"),
    (lambda x: x["tables"]["table6"]["rows"][1]["sample"]["run"].update(time_match="nope"), "time_match"),
    (lambda x: x["tables"]["table6"]["rows"][1]["sample"]["run"]["model"].update(paradigm="diffusion"),
     "paradigm.*allowed"),
    (lambda x: x["tables"]["table7"]["rows"][0]["sample"]["run"].update(model={"dim": 8}), "two different runs"),
])
def test_bad_entries_are_rejected_naming_the_key(experiments, edit, match):
    x = copy.deepcopy(experiments)
    edit(x)
    with pytest.raises(ConfigError, match=match):
        Plan(x, scale("default")).validate()


def test_scale_errors_name_the_key():
    s = scale("default")
    s["grids"] = {16: 32}
    with pytest.raises(ConfigError, match="grids.*24"):
        load_plan(ROOT, s)
    s = scale("default")
    del s["codebooks"][4096]
    with pytest.raises(ConfigError, match="codebooks.*4096"):
        load_plan(ROOT, s)


def test_adding_a_table9_cell_adds_one_sample_set(experiments):
    base = Plan(copy.deepcopy(experiments), scale("paper"))  # the default scale keeps 6 of Table 9's cells
    x = copy.deepcopy(experiments)
    x["tables"]["table9"]["rows"][0]["for"]["start,end"].append([2.0, 3.5])
    more = Plan(x, scale("paper"))
    assert set(more.samples) - set(base.samples) == {"iar2-B-24/e300/pag-2.0-3.5"}
    assert set(more.runs) == set(base.runs)
    assert all(more.ar_config(r) == base.ar_config(r) for r in base.runs)


def test_changing_table10_s_values_adds_only_those_runs(experiments):
    base = Plan(copy.deepcopy(experiments), scale("default"))
    x = copy.deepcopy(experiments)
    x["tables"]["table10"]["rows"][0]["for"]["s"] = [0.5, 1, 2, 3, 5, 4]
    more = Plan(x, scale("default"))
    assert set(more.runs) - set(base.runs) == {"iar2-B-24-s4"}
    assert all(more.ar_config(r) == base.ar_config(r) for r in base.runs)


def test_index_points_every_value_at_a_file(paper):
    idx = paper.index()
    for tid, t in idx.tables.items():
        for row in t["rows"]:
            for col, src in row.get("values", {}).items():
                assert src["file"].endswith((".json",)) and src["field"] and src["run"] in idx.runs, (tid, col)
            if t["kind"] == "settings":
                assert row["config"].startswith(("configs/sampling/", "ar/")) and row["run_config"].endswith("config.yaml")
    assert idx.protocol["samples_per_set"] == 50000 and idx.protocol["extractor"] == "inception"
    yaml.safe_dump(idx.to_dict())  # plain data


def test_figures_9_to_11_use_app_e_classes_figure_by_figure(paper):
    # App. E: Fig. 9 balloon 417, house finch 12, triumphal arch 873, breakwater 460; Fig. 10 alp 970, Arctic fox
    # 279, marmot 336, liner 628; Fig. 11 coyote 272, schooner 780, stupa 832, daisy 985
    assert paper.s.sampling.grid["classes"] == [417, 12, 873, 460, 970, 279, 336, 628, 272, 780, 832, 985]
    imgs = paper.figures["fig9"]["images"]
    assert [im["rows"] for im in imgs] == [[0, 4], [4, 8], [8, 12]] and {im["of"] for im in imgs} == {12}
    assert len({im["file"] for im in imgs}) == 1  # one sampling job, three figures
    assert imgs[0]["label"].startswith("Figure 9: balloon (417), house finch (12), triumphal arch (873), "
                                       "breakwater (460)")
    assert "Figure 10: alp (970), Arctic fox (279), marmot (336), liner (628)" in imgs[1]["label"]
    assert "Figure 11: coyote (272), schooner (780), stupa (832), daisy (985)" in imgs[2]["label"]
    assert "stand in" not in " ".join(im["label"] for im in imgs)


def test_smaller_scales_say_which_classes_stand_in():
    d = load_plan(ROOT, scale("default"))  # 10 built-in classes, no class list: all of them, in order
    imgs = d.figures["fig9"]["images"]
    assert [im["rows"] for im in imgs] == [[0, 4], [4, 8], [8, 10]]
    assert "App. E: balloon (417)" in imgs[0]["label"] and "classes 0, 1, 2, 3 of its dataset stand in" in imgs[0]["label"]
    assert "classes 8, 9 of its dataset stand in" in imgs[2]["label"]


def test_registry_index_round_trips_through_its_file(paper, tmp_path):
    """The workflow writes registry.json and the report reads it with the same type: what is read is what was
    written, and a partial or foreign file reads as far as it goes."""
    idx = paper.index("abc123")
    idx.write(tmp_path / "registry.json")
    back = RegistryIndex.read(tmp_path / "registry.json")
    assert back == idx and back.to_dict() == idx.to_dict()
    run = back.runs["ar/iar2-B-24"]
    assert (run.kind, run.dir, run.config) == ("ar", "ar/iar2-B-24", "ar/iar2-B-24/config.yaml")
    assert back.runs["tok/vq-16384"].tables is None and "tables" not in back.to_dict()["runs"]["tok/vq-16384"]
    (tmp_path / "old.json").write_text('{"scale": "ci", "runs": {"ar/x": {"kind": "ar", "dir": "ar/x", '
                                       '"config": "ar/x/config.yaml", "extra": 1}, "bad": {}}}')
    old = RegistryIndex.read(tmp_path / "old.json")
    assert old.scale == "ci" and list(old.runs) == ["ar/x"] and old.git_commit == "unknown" and old.tables == {}
    (tmp_path / "broken.json").write_text("{")
    assert RegistryIndex.read(tmp_path / "broken.json") == RegistryIndex() == RegistryIndex.read(tmp_path / "none")


def test_per_class_by_table_sizes_only_the_sets_of_those_tables():
    cfg = scale("default")
    cfg["sampling"]["per_class_by_table"] = {"table7": 40, "fig7a": 30, "table4": 60}
    plan = Plan(load_yaml(ROOT / "params" / "experiments.yaml"), cfg)
    base = cfg["sampling"]["base"]["per_class"]
    seen = set()
    for sid, s in plan.samples.items():
        n = plan.sample_config(s.guidance, sid)["per_class"]
        sizes = [v for t, v in cfg["sampling"]["per_class_by_table"].items() if t in s.tables]
        if s.is_grid:
            assert n == cfg["sampling"]["grid"]["per_class"]  # a class grid keeps its own count
        else:
            assert n == (max(sizes) if sizes else base), sid  # a set in several sized tables: the largest
            seen.add(n)
    assert seen == {base, 30, 40, 60}
    # the guidance alone (no set) is the base config, and the index points each set at its own config file
    assert plan.sample_config("static-2.25")["per_class"] == base
    runs = plan.index("x").runs
    assert runs["ar/llamagen-B-24/e100/static-2.25"].config == "configs/sampling/llamagen-B-24/e100/static-2.25.yaml"


def test_per_class_by_table_names_are_checked():
    cfg = scale("default")
    cfg["sampling"]["per_class_by_table"] = {"table99": 40}
    with pytest.raises(ConfigError, match=r"sampling.per_class_by_table: table99 .*allowed values: .*table7"):
        Plan(load_yaml(ROOT / "params" / "experiments.yaml"), cfg)
