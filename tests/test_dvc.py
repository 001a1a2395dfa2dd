"""DVC tracks the pipeline's artifacts: a ci-scale run is committed and pushed to a folder remote, a git clone pulls
it back byte for byte, and after the documented post-pull step Snakemake plans no job in the clone while later
params changes still rerun what they affect. Offline: the remote is a local folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCALE = "ci"
STAGE = f"reproduce@{SCALE}"
# What dvc.yaml leaves out of the stage on purpose (see the comment there).
NOT_OUTS = {"logs", "mlflow.db", "mlflow.db.lock", "mlflow-spool", "cache"}
# Rules that train or sample: none may run again in a pulled clone.
TRAINING_RULES = {"refnet", "vq_train", "vq_train_stage1", "tokenize", "rearrange", "ar_train", "time_match",
                  "sample", "gen_metrics", "code_distance"}

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None,
                                reason="needs the dvc and git commands (pip install -e '.[test]'; git)")


@dataclass
class CiRun:
    root: Path      # a git repository: a copy of the working tree, committed, with a ci-scale run in it
    target: str     # the Snakemake target that run built


def _env(tmp: Path) -> dict:
    """DVC and git isolated from the user's config and caches, no network calls."""
    env = dict(os.environ)
    for name in ("site", "global", "system"):
        (tmp / f"dvc-{name}").mkdir(exist_ok=True)
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
               DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"), DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    return env


def run(*cmd, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def git_commit(root: Path, env: dict, message: str) -> None:
    run("git", "add", "-A", cwd=root, env=env)
    run("git", "commit", "-q", "-m", message, cwd=root, env=env)


def stage_outs(root: Path, scale: str = SCALE) -> list[dict]:
    """The `reproduce` stage's outs and metrics for one scale, as {path, persist}."""
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["reproduce"]
    assert scale in stage["foreach"]
    outs = []
    for entry in stage["do"]["outs"] + stage["do"].get("metrics", []):
        path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
        outs.append({"path": path.replace("${item}", scale), "persist": bool((opts or {}).get("persist"))})
    return outs


def tree_hashes(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def planned_jobs(root: Path, target: str, env: dict, *config: str) -> dict[str, int]:
    """Rule -> job count of what `snakemake -n` would run (empty when nothing is to be done)."""
    r = run("snakemake", "-n", "--cores", "1", target, "--config", f"scale={SCALE}", *config, cwd=root, env=env)
    out = r.stdout + r.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    jobs = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.fixture(scope="module")
def ci_workspace(ci_workspace_root, tmp_path_factory) -> CiRun:
    """A copy of the shared committed workspace with the whole ci DAG run in it (tests/conftest.py): DVC commits,
    links and pushes here without touching the workspace other tests read."""
    root = tmp_path_factory.mktemp("dvc") / "workspace"
    shutil.copytree(ci_workspace_root, root, symlinks=True)
    return CiRun(root, "reproduce_all")


@pytest.fixture(scope="module")
def published(ci_workspace) -> dict:
    """The run committed to DVC (dvc.lock in git) and pushed to a folder remote."""
    ws, env = ci_workspace.root, _env(ci_workspace.root.parent)
    res = ws / "results" / SCALE
    if not (res / "summary.json").exists():
        # The target did not include rule `summary`: write what it writes, from the recon evals present.
        flat = {f"tok/{p.parent.name}.{k}": v for p in sorted(res.glob("tokenizers/*/recon.json"))
                for k, v in json.loads(p.read_text()).items() if k in ("rfid", "psnr", "ssim")}
        (res / "summary.json").write_text(json.dumps(flat, indent=1, sort_keys=True))
    placeholders = [o["path"] for o in stage_outs(ws) if not (ws / o["path"]).exists()]
    if ci_workspace.target == "reproduce_all":
        assert not placeholders, f"reproduce_all did not write these DVC outs: {placeholders}"
        run("dvc", "repro", STAGE, cwd=ws, env=env)      # Snakemake has nothing left to do; DVC hashes the outs
    else:
        # A partial run lacks some out folders; empty ones stand in so the stage can be committed.
        for p in placeholders:
            (ws / p).mkdir(parents=True)
        run("dvc", "commit", "--force", STAGE, cwd=ws, env=env)
    remote = ws.parent / "remote"
    run("dvc", "remote", "add", "--default", "folder", remote, cwd=ws, env=env)
    run("dvc", "push", STAGE, cwd=ws, env=env)
    git_commit(ws, env, "ci artifacts tracked by DVC")
    return {"root": ws, "remote": remote}


@pytest.fixture(scope="module")
def pulled_clone(ci_workspace, published) -> Path:
    """A git clone of the workspace after `dvc pull` and the documented post-pull step."""
    clone = ci_workspace.root.parent / "clone"
    env = _env(clone.parent)
    run("git", "clone", "-q", ci_workspace.root, clone, cwd=clone.parent, env=env)
    assert not (clone / "results").exists()
    run("dvc", "pull", STAGE, cwd=clone, env=env)
    status = json.loads(run("dvc", "status", "--json", STAGE, cwd=clone, env=env).stdout)
    assert status == {}, status     # the guard of the post-pull step: artifacts match this code and these params
    run("snakemake", "--cores", "1", "--touch", "--forceall", ci_workspace.target, "--config", f"scale={SCALE}",
        cwd=clone, env=env)
    return clone


@pytest.mark.slow
def test_dvc_yaml_tracks_every_artifact_folder_as_persistent_out(ci_workspace):
    ws = ci_workspace.root
    outs = stage_outs(ws)
    paths = {o["path"] for o in outs}
    # persist: DVC would otherwise delete the outs before `dvc repro` runs Snakemake, which retrains everything
    assert all(o["persist"] for o in outs), [o["path"] for o in outs if not o["persist"]]
    # the materialised dataset is an out: a clone without it would rebuild it and every job downstream
    data_root = yaml.safe_load((ws / "params" / f"{SCALE}.yaml").read_text())["data"]["root"]
    assert data_root in paths
    produced = {f"results/{SCALE}/{p.name}" for p in (ws / "results" / SCALE).iterdir() if p.name not in NOT_OUTS}
    assert produced - paths == set(), "folders the workflow writes that DVC does not track"
    assert not {f"results/{SCALE}/{n}" for n in NOT_OUTS} & paths
    # DVC can read the stage: one per built-in scale, and params come from the scale's file
    stages = run("dvc", "stage", "list", "--name-only", cwd=ws, env=_env(ws.parent)).stdout.split()
    assert {"reproduce@ci", "reproduce@default", "reproduce-paper"} <= set(stages)


@pytest.mark.slow
def test_pulled_artifacts_are_identical_to_the_pushed_ones(ci_workspace, published, pulled_clone):
    ws = ci_workspace.root
    n = 0
    for out in stage_outs(ws):
        ours, theirs = tree_hashes(ws / out["path"]), tree_hashes(pulled_clone / out["path"])
        assert theirs == ours, out["path"]
        n += len(ours)
    assert n > 20
    # dvc.lock (in git) records every out with its md5, which the report quotes
    lock = yaml.safe_load((pulled_clone / "dvc.lock").read_text())["stages"][STAGE]
    locked = {o["path"]: o for o in lock["outs"]}
    assert set(locked) == {o["path"] for o in stage_outs(ws)}
    assert all(o["md5"] for o in locked.values())
    assert not (pulled_clone / "results" / SCALE / "mlflow.db").exists()   # not an artifact (dvc.yaml says why)


@pytest.mark.slow
def test_pulled_clone_is_up_to_date_for_dvc_and_snakemake(ci_workspace, pulled_clone):
    env = _env(pulled_clone.parent)
    # the post-pull step changed mtimes only: DVC still sees the pulled content
    assert json.loads(run("dvc", "status", "--json", STAGE, cwd=pulled_clone, env=env).stdout) == {}
    r = run("dvc", "repro", "--dry", STAGE, cwd=pulled_clone, env=env)     # --dry: a regression must not retrain
    assert "didn't change, skipping" in r.stdout + r.stderr
    assert planned_jobs(pulled_clone, ci_workspace.target, env) == {}


@pytest.mark.slow
def test_params_change_in_pulled_clone_reruns_what_it_affects(ci_workspace, pulled_clone):
    """Snakemake's params trigger needs the metadata the post-pull step records: without it a pulled clone
    would ignore a changed setting."""
    env = _env(pulled_clone.parent)
    scale_cfg = yaml.safe_load((pulled_clone / "params" / f"{SCALE}.yaml").read_text())
    if "max_images" not in scale_cfg.get("recon_eval", {}):
        pytest.skip("params/ci.yaml has no recon_eval.max_images to change")
    changed = f"recon_eval={{max_images: {scale_cfg['recon_eval']['max_images'] + 1}}}"
    jobs = planned_jobs(pulled_clone, ci_workspace.target, env, changed)
    assert jobs.get("recon_eval", 0) >= 1, jobs
    assert not TRAINING_RULES & set(jobs), jobs


@pytest.mark.slow
def test_metrics_and_plots_show_read_the_pulled_files(ci_workspace, pulled_clone):
    env = _env(pulled_clone.parent)
    summary = f"results/{SCALE}/summary.json"
    shown = json.loads(run("dvc", "metrics", "show", "--json", cwd=pulled_clone, env=env).stdout)
    metrics = next(v["data"][summary]["data"] for v in shown.values() if summary in v.get("data", {}))
    assert metrics == json.loads((pulled_clone / summary).read_text()) and metrics
    curves = pulled_clone / "results" / SCALE / "analysis" / "loss_curves.csv"
    if curves.exists():     # written by rule loss_curves (Figure 8) when the target includes it
        plots = json.loads(run("dvc", "plots", "show", "--json", cwd=pulled_clone, env=env).stdout)
        assert plots["data"][str(curves.relative_to(pulled_clone))][0]["content"]["data"]["values"]


def test_loss_curve_template_draws_one_line_per_model_and_loss(tmp_path):
    """The Figure 8 plot: the CSV holds every model's rows; the template separates them."""
    env = _env(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    run("dvc", "init", "--no-scm", "-q", cwd=tmp_path, env=env)
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots", dirs_exist_ok=True)
    csv = tmp_path / "results" / SCALE / "analysis" / "loss_curves.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("step,epoch,semantic_ce,detail_ce,run,label\n"
                   "1,0.5,4.1,5.2,ar/iar2-B-16,IAR2-B\n2,1.0,3.9,5.0,ar/iar2-B-16,IAR2-B\n"
                   "1,0.5,4.0,5.1,ar/iar2-L-16,IAR2-L\n2,1.0,3.7,4.8,ar/iar2-L-16,IAR2-L\n")
    # no target: a path given on the command line is also drawn as a raw file, with the default template
    shown = json.loads(run("dvc", "plots", "show", "--json", cwd=tmp_path, env=env).stdout)
    content = shown["data"][str(csv.relative_to(tmp_path))][0]["content"]
    assert content["encoding"]["color"]["field"] == "label"     # one colour per model
    assert content["encoding"]["strokeDash"]["field"] == "field"    # semantic vs detail
    assert "Figure 8" in content["title"]
    values = content["data"]["values"]
    assert {(v["label"], v["field"]) for v in values} == {(m, f) for m in ("IAR2-B", "IAR2-L")
                                                           for f in ("semantic_ce", "detail_ce")}
    assert len(values) == 8
