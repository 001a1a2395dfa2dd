"""The Snakemake DAG over the experiment registry: configs validated before any job, the paper scale planned
offline with every table and figure, the ci scale end to end with one MLflow run per job, incremental reruns."""
import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from iar2.registry import load_plan, load_yaml

ROOT = Path(__file__).resolve().parent.parent


def smk(*args, cwd, timeout=1500, snakefile=ROOT / "Snakefile"):
    return subprocess.run(["snakemake", "-s", str(snakefile), "--cores", "2", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def job_counts(out: str) -> Counter:
    """Snakemake's 'Job stats' table -> {rule: count} (without the total)."""
    block = out.split("Job stats:")[-1]
    counts = Counter()
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_bad_config_is_rejected_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scale: ci\ntokenizer:\n  base:\n    loss: {perceptual: alexnet}\n")
    r = smk("-n", "reproduce_all", "--configfile", str(bad), cwd=tmp_path)
    assert r.returncode != 0
    assert "perceptual" in r.stderr + r.stdout and "allowed values" in r.stderr + r.stdout
    assert not (tmp_path / "results").exists()


def test_bad_registry_overlay_is_rejected_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scale: ci\nexperiments:\n  fixed_cfg: cfg-2\n")
    r = smk("-n", "table7", "--configfile", str(bad), cwd=tmp_path)
    assert r.returncode != 0 and "guidance" in r.stderr + r.stdout and "allowed forms" in r.stderr + r.stdout


def test_unknown_scale_names_the_allowed_ones(tmp_path):
    r = smk("-n", "reproduce_all", "--config", "scale=huge", cwd=tmp_path)
    out = r.stderr + r.stdout
    assert r.returncode != 0 and "allowed values" in out and "default" in out and "paper" in out


def test_lint_is_clean(tmp_path):
    r = smk("--lint", "--config", "scale=ci", cwd=tmp_path, timeout=300)
    assert "Congratulations, your workflow is in a good condition!" in r.stdout + r.stderr, r.stdout[-3000:]


def test_paper_scale_plans_every_table_and_figure_offline(tmp_path):
    """The full paper DAG (ImageNet absent: its rule only says where to get it) with the job count of every
    rule equal to what the registry asks for."""
    r = smk("-n", "reproduce_all", "--configfile", str(ROOT / "params" / "paper.yaml"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout)
    plan = load_plan(ROOT, load_yaml(ROOT / "params" / "paper.yaml"))
    dual = [t for t in plan.trained_tokenizers() if plan.stages(t) == ["stage1", "stage2"]]
    assert counts["ar_train"] == len(plan.runs) == 46
    assert counts["sample"] == len(plan.samples) == 104
    assert counts["gen_metrics"] == 103  # every sample set but the Figures 9-11 grid
    assert counts["vq_train"] == len(plan.trained_tokenizers()) == 13 and counts["vq_train_stage1"] == len(dual) == 5
    assert counts["tokenize"] == len(plan.token_sets()) == 17
    assert counts["time_match"] == 5  # Table 5's three paradigms + no-context, Table 6's concatenation
    assert counts["recon_eval"] == 12 and counts["code_distance"] == 2 and counts["rearrange"] == 1
    assert counts["dataset_missing"] == 1 and counts["loss_curves"] == 1 and counts["summary"] == 1
    targets = smk("--list-target-rules", cwd=tmp_path, timeout=300).stdout.split()
    for t in [f"table{i}" for i in range(1, 14)] + ["fig3", "fig4", "fig7", "fig8", "samples", "reproduce_all"]:
        assert t in targets
    # The resources of a 32-GPU run (Table 11: IAR2-XXL 24x24) reach the job, through the multi-node launcher.
    r = smk("-n", "-p", "results/paper/ar/iar2-XXL-24/model.safetensors", "--configfile",
            str(ROOT / "params" / "paper.yaml"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iar2.launch --gpus 8 --nodes 4" in r.stdout and "gpu=32" in r.stdout and "nodes=4" in r.stdout


@pytest.fixture(scope="module")
def ci_run(ci_workspace_root):
    """The whole ci DAG, run once per session in a copy of the repository (tests/conftest.py)."""
    return ci_workspace_root


@pytest.mark.slow
def test_ci_scale_runs_end_to_end(ci_run, tmp_path):
    res = ci_run / "results" / "ci"
    plan = load_plan(ROOT, load_yaml(ROOT / "params" / "ci.yaml"))
    index = json.loads((res / "registry.json").read_text())
    assert set(index["tables"]) == {f"table{i}" for i in range(1, 14)}
    # every number the report will show exists
    for tid, t in index["tables"].items():
        for row in t["rows"]:
            for col, src in row.get("values", {}).items():
                value = json.loads((res / src["file"]).read_text())[src["field"]]
                assert isinstance(value, float), (tid, col)
    for tok in {src["run"][len("tok/"):] for t in index["tables"].values() for row in t["rows"]
                for src in row.get("values", {}).values() if src["run"].startswith("tok/")}:
        m = json.loads((res / "tokenizers" / tok / "recon.json").read_text())
        assert m["extractor"] == "domain" and m["psnr"] > 5
    meta = json.loads((res / "tokens" / "sd-256-4096" / "g24" / "meta.json").read_text())
    assert meta["levels"] == ["semantic", "detail"] and meta["grid"] == [6, 6]  # 24 px at this scale / 4
    assert (res / "tokenizers" / "vq-16384-rearranged" / "mapping.pt").is_file()
    assert json.loads((res / "analysis" / "code_distance" / "vq-16384.json").read_text())["results"]
    # epoch checkpoints: one export per sampled epoch
    assert {p.name for p in (res / "ar" / "iar2-B-24").glob("model_e*.safetensors")} == \
        {f"model_e{e:03d}.safetensors" for e in sorted(plan.runs["iar2-B-24"].epochs)}
    # equal-time runs: their steps per epoch come from the measurement
    tm = json.loads((res / "ar" / "iar2-B-24-sd128x4096-alternating" / "time_match.json").read_text())
    cfg = yaml.safe_load((res / "ar" / "iar2-B-24-sd128x4096-alternating" / "config.yaml").read_text())
    assert cfg["train"]["epoch_steps"] == pytest.approx(tm["epoch_steps"]) and tm["speed_ratio"] > 0
    curves = (res / "analysis" / "loss_curves.csv").read_text().splitlines()
    assert curves[0].startswith("step") and "semantic_ce" in curves[0] and len(curves) > 2
    assert (res / "ar" / "iar2-XL-24" / "e300" / "grid-pag-1.35-3.0" / "grid.png").is_file()
    summary = json.loads((res / "summary.json").read_text())
    assert summary["ar/iar2-B-24/e300/pag-1.75-3.0.fid"] > 0
    assert (ci_run / "reports" / "ci" / "index.html").is_file() and (ci_run / "reports" / "ci" / "claims.md").is_file()
    # the Diagnosis section from the rules' real `iar2 diagnose` outputs (params/ci.yaml names two runs)
    diag = json.loads((res / "diagnose" / "ar-iar2-B-16.json").read_text())
    assert diag["levels"] == ["semantic", "detail"] and diag["teacher_forced"]["heldout"]["detail"]["ce"] > 0
    md = (ci_run / "reports" / "ci" / "report.md").read_text()
    assert "## Diagnosis" in md and "llamagen-B-16 single: held-out CE" in md
    assert (ci_run / "reports" / "ci" / "diagnosis" / "ar-iar2-B-16.png").is_file()
    # Snakemake's own report from the report()-tagged outputs (a zip: the rendered report is a folder)
    import zipfile

    r = smk("--report", str(tmp_path / "report.zip"), "--config", "scale=ci", cwd=ci_run, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(n.endswith("grid.png") for n in names) and any(n.endswith("index.html") for n in names)


@pytest.mark.slow
def test_every_job_logged_one_finished_mlflow_run(ci_run):
    """Two jobs at a time spooled their runs; the workflow's end logged them all to the SQLite store: no run lost,
    none left unfinished, none left in the spool, tags name the job."""
    import mlflow

    res = ci_run / "results" / "ci"
    assert (res / "mlflow-spool").is_dir() and not list((res / "mlflow-spool").iterdir())
    plan = load_plan(ROOT, load_yaml(ROOT / "params" / "ci.yaml"))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{res / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("iar2-ci").experiment_id], max_results=5000)
    assert all(r.info.status == "FINISHED" for r in runs)
    by_rule = Counter(r.data.tags.get("rule") for r in runs)
    assert by_rule["ar_train"] == len(plan.runs)
    assert by_rule["sample"] == len(plan.samples)
    assert by_rule["gen_metrics"] == len([s for s in plan.samples.values() if not s.is_grid])
    assert by_rule["vq_train"] == len(plan.trained_tokenizers())
    ar_ids = {r.data.tags["run_id"] for r in runs if r.data.tags.get("rule") == "ar_train"}
    assert ar_ids == {f"ar/{rid}" for rid in plan.runs}
    # the report rule logged the spool before rendering: its provenance names the MLflow run of every number
    prov = json.loads((ci_run / "reports" / "ci" / "provenance.json").read_text())
    ar_rows = [p for p in prov if str(p.get("run", "")).startswith(("ar/", "tok/")) and p.get("status") == "ok"]
    assert ar_rows and all(p["mlflow_run"] for p in ar_rows), [p["run"] for p in ar_rows if not p["mlflow_run"]][:5]
    t9 = [r for r in runs if r.data.tags.get("run_id") == "ar/iar2-B-24/e300/pag-1.75-3.0"]
    assert {r.data.tags.get("rule") for r in t9} == {"sample", "gen_metrics"}
    assert "table9" in t9[0].data.tags["tables"].split(",")


@pytest.mark.slow
def test_incremental_reruns(ci_run, tmp_path):
    """A finished table does nothing; a new Table 9 cell samples and scores only that cell; new Table 10 s values
    train only the new runs."""
    import shutil

    ci_run = shutil.copytree(ci_run, tmp_path / "ws", symlinks=True)  # the shared run stays as it is
    # (its own Snakefile: the report declares the paper's files relative to the Snakefile's folder)
    again = smk("-n", "reproduce_all", "--config", "scale=ci", cwd=ci_run, snakefile=ci_run / "Snakefile")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    t9 = smk("-n", "table9", "--config", "scale=ci", cwd=ci_run, snakefile=ci_run / "Snakefile")
    assert "Nothing to be done" in t9.stdout + t9.stderr

    x = load_yaml(ROOT / "params" / "experiments.yaml")
    rows = x["tables"]["table9"]["rows"]
    rows[0]["for"]["start,end"].append([1.75, 2.0])
    extra = tmp_path / "table9.yaml"
    extra.write_text(yaml.safe_dump({"experiments": {"tables": {"table9": {"rows": rows}}},
                                     "restrict": {"end": [2.0, 2.5, 3.0]}}))  # the ci scale keeps these ends
    r = smk("table9", "--config", "scale=ci", "--configfile", str(extra), cwd=ci_run, snakefile=ci_run / "Snakefile")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert counts == Counter({"sample": 1, "gen_metrics": 1, "registry_index": 1, "table9": 1}), counts
    new = ci_run / "results" / "ci" / "ar" / "iar2-B-24" / "e300" / "pag-1.75-2.0" / "metrics.json"
    assert json.loads(new.read_text())["fid"] > 0

    s_rows = x["tables"]["table10"]["rows"]
    s_rows[0]["for"]["s"] = [1, 2, 4]
    extra10 = tmp_path / "table10.yaml"
    extra10.write_text(yaml.safe_dump({"experiments": {"tables": {"table10": {"rows": s_rows}}},
                                       "restrict": {"s": [1, 2, 4]}}))
    r = smk("-n", "table10", "--config", "scale=ci", "--configfile", str(extra10), cwd=ci_run, snakefile=ci_run / "Snakefile")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout)
    assert counts["ar_train"] == 1 and counts["sample"] == 1 and counts["gen_metrics"] == 1, counts
    assert "wildcards: run=iar2-B-24-s4" in r.stdout
