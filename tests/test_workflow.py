"""The Snakemake DAG: configs validated before any job, the ci scale end to end, no-op reruns."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def smk(*args, cwd):
    return subprocess.run(["snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=1500)


def test_bad_config_is_rejected_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scale: ci\ntokenizer:\n  variants:\n    x: {model: {quantizer: trinary}}\n")
    r = smk("-n", "reproduce_all", "--configfile", str(bad), cwd=tmp_path)
    assert r.returncode != 0
    assert "quantizer" in r.stderr + r.stdout and "allowed values" in r.stderr + r.stdout
    assert not (tmp_path / "results").exists()


def test_unknown_scale_names_the_allowed_ones(tmp_path):
    r = smk("-n", "reproduce_all", "--config", "scale=huge", cwd=tmp_path)
    assert r.returncode != 0 and "allowed values" in r.stderr + r.stdout and "default" in r.stderr + r.stdout


@pytest.mark.slow
def test_ci_scale_runs_end_to_end_and_a_rerun_does_nothing(tmp_path):
    r = smk("reproduce_all", "--config", "scale=ci", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = tmp_path / "results" / "ci"
    for name in ("single-64", "dual-8-32", "unassoc-8-32"):
        m = json.loads((res / "tokenizers" / name / "recon.json").read_text())
        assert m["extractor"] == "domain" and m["psnr"] > 5
    assert json.loads((res / "tokens" / "dual-8-32" / "train" / "meta.json").read_text())["levels"] == ["semantic", "detail"]
    assert (res / "tokenizers" / "single-64-rearranged" / "mapping.pt").is_file()
    assert json.loads((res / "analysis" / "code_distance" / "single-64.json").read_text())["results"]
    for name, guidance in (("llamagen", "static"), ("iar", "static"), ("iar2", "static"), ("iar2", "pag")):
        m = json.loads((res / "ar" / name / "samples" / guidance / "metrics.json").read_text())
        assert m["extractor"] == "domain" and m["num_generated"] == 40 and m["fid"] > 0
    assert (res / "ar" / "iar2" / "samples" / "pag" / "grid.png").is_file()
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{res / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("iar2-ci").experiment_id], max_results=1000)
    jobs = [r.data.tags.get("job") for r in runs]
    # one run per training, sampling and metrics job, all finished
    assert jobs.count("vq_train") == 4 and jobs.count("ar_train") == 3
    assert jobs.count("sample") == 4 and jobs.count("gen_metrics") == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags.get("run_id") for r in runs if r.data.tags.get("job") == "ar_train"} == \
        {"ar/llamagen", "ar/iar", "ar/iar2"}
    again = smk("-n", "reproduce_all", "--config", "scale=ci", cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
