"""workflow/scripts/project_runtime.py: a planned job is priced at its measured duration (found by its first
output), a job the measured run lacks at its rule's median, and the sum is divided by the measured run's
job-seconds per wall second."""
import base64
import json
from pathlib import Path

import pytest

from helpers import load_script

def record(meta: Path, output: str, rule: str, start: float, end: float, incomplete: bool = False, job=None):
    name = base64.b64encode(output.encode()).decode()
    (meta / name).write_text(json.dumps({"rule": rule, "starttime": start, "endtime": end, "incomplete": incomplete,
                                         "job_hash": job}))


@pytest.fixture
def run_dir(tmp_path):
    meta = tmp_path / ".snakemake" / "metadata"
    meta.mkdir(parents=True)
    # two cores: a 0-100 s and a 0-60 s job, then a 100-110 s job: 170 job-s in 110 s of wall
    record(meta, "r/tok/a.safetensors", "vq_train", 0, 100)
    record(meta, "r/ar/x.npz", "sample", 0, 60, job=7)
    record(meta, "r/ar/x.json", "sample", 0.01, 60, job=7)  # a second output of the job (Snakemake's own times)
    record(meta, "r/ar/y.npz", "sample", 100, 110)
    record(meta, "r/ar/half.npz", "sample", 100, 500, incomplete=True)  # a killed job is no measurement
    return tmp_path


def test_measured_jobs_count_each_job_once(run_dir):
    by_output, per_rule, job_s, wall = load_script("project_runtime").measured_jobs(run_dir)
    assert sorted(per_rule["sample"]) == [10, 60] and job_s == pytest.approx(170) and wall == pytest.approx(110)
    assert by_output["r/ar/y.npz"] == ("sample", 10) and "r/ar/half.npz" not in by_output


def test_projection_prices_planned_jobs_and_divides_by_the_efficiency(run_dir, monkeypatch, capsys, tmp_path):
    mod = load_script("project_runtime")
    # the candidate keeps a and y, drops x, and adds z, which the measured run lacks (sample median: 35 s)
    monkeypatch.setattr(mod, "planned_jobs", lambda target, args: [("vq_train", "r/tok/a.safetensors"),
                                                                   ("sample", "r/ar/y.npz"),
                                                                   ("sample", "r/ar/z.npz")])
    out = tmp_path / "p.json"
    assert mod.main(["--run-dir", str(run_dir), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["job_seconds"] == 100 + 10 + 35 and res["estimated_jobs"] == 1
    assert res["projected_wall_seconds"] == round(145 / (170 / 110))
    assert res["by_rule"] == {"vq_train": 100, "sample": 45}


def test_planned_jobs_parses_a_dry_run(monkeypatch):
    mod = load_script("project_runtime")
    dry = ("Building DAG of jobs...\n\nrule vq_train:\n    input: d\n    output: r/tok/a.safetensors, r/tok/a.json\n"
           "    jobid: 3\n\nlocalrule report:\n    input: r/tok/a.safetensors\n    output: reports/index.html\n")

    class Done:
        returncode, stdout, stderr = 0, dry, ""

    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: Done())
    assert mod.planned_jobs("reproduce_all", []) == [("vq_train", "r/tok/a.safetensors"),
                                                     ("report", "reports/index.html")]


def test_a_checkout_without_a_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no Snakemake metadata"):
        load_script("project_runtime").measured_jobs(tmp_path)
