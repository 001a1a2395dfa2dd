"""The `gpu` scale: the whole DAG planned (dry run), every model family in bf16; the CPU scales stay fp32."""
import subprocess
from pathlib import Path

from iar2.registry import load_plan, load_yaml

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_scale_plans_every_rule_in_a_dry_run(tmp_path):
    r = subprocess.run(["snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2", "-n", "reproduce_all",
                        "--config", "scale=gpu"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    plan = load_plan(ROOT, load_yaml(ROOT / "params" / "gpu.yaml"))
    for rule in ("vq_train", "vq_train_stage1", "tokenize", "rearrange", "ar_train", "time_match", "sample",
                 "gen_metrics", "recon_eval", "code_distance", "summary", "report"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    assert {r.family for r in plan.runs.values()} >= {"llamagen", "iar", "iar2"}
    assert not (tmp_path / "results").exists()


def test_gpu_scale_trains_and_samples_in_bf16_and_cpu_scales_in_fp32():
    gpu = load_plan(ROOT, load_yaml(ROOT / "params" / "gpu.yaml"))
    assert all(gpu.ar_config(rid)["train"]["precision"] == "bf16" for rid in gpu.runs)
    assert gpu.sample_config("static-2.0")["precision"] == "bf16"
    assert gpu.s.gen_metrics.extractor == "domain" and gpu.s.recon_eval.extractor == "domain"
    for name in ("ci", "default"):  # no native bf16 on the CPUs these run on: fp32 (README, "Speed and precision")
        p = load_plan(ROOT, load_yaml(ROOT / "params" / f"{name}.yaml"))
        assert all(p.ar_config(rid)["train"]["precision"] == "fp32" for rid in p.runs)
        assert p.sample_config("static-2.0")["precision"] == "fp32"
