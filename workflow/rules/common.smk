# Configuration: the scale file (params/<scale>.yaml) over the experiment registry (params/experiments.yaml),
# resolved into the plan of jobs and validated before any job is scheduled (iar2/registry.py).
import json
import os
import re
from pathlib import Path

import yaml

from iar2.config import ConfigError, deep_merge
from iar2.registry import load_plan


def _load_scale(cfg):
    scale = cfg.get("scale", "default")
    path = Path(workflow.basedir) / "params" / f"{scale}.yaml"
    allowed = sorted(p.stem for p in (Path(workflow.basedir) / "params").glob("*.yaml") if p.stem != "experiments")
    if scale == "experiments" or not path.is_file():
        raise ConfigError(f"scale: {scale!r} has no params/{scale}.yaml; allowed values: " + ", ".join(allowed))
    return deep_merge(yaml.safe_load(path.read_text()), cfg)


config.update(_load_scale(config))
PLAN = load_plan(workflow.basedir, config)  # raises ConfigError naming the key and the allowed values
# (Snakemake exports OMP_NUM_THREADS = the rule's threads, so two 1-thread torch jobs share two cores
# without spinning against each other.)
R = config["results"]
DATA = config["data"]
SCALE = config["scale"]


def _alternation(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "^$"


TRAINED = PLAN.trained_tokenizers()
TOKENIZER_IDS = TRAINED + PLAN.rearranged

wildcard_constraints:
    stage=r"stage1|stage2|single",
    grid=r"\d+",
    epoch=r"\d+",
    run=_alternation(PLAN.runs),
    tok=_alternation(TOKENIZER_IDS),
    guidance=r"(grid-)?(static|prog|pag)-[0-9.]+(-[0-9.]+)?(-reject)?",

# Every job logs to one MLflow experiment per scale (a SQLite store under the results folder by default;
# export MLFLOW_TRACKING_URI=http://... to use an `mlflow server` on a cluster).
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(R).resolve()}/mlflow.db")
os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"iar2-{SCALE}")


def tag(rule_name, run_id, tables=""):
    """Environment the job's MLflow run is tagged from: rule, run id, the tables it feeds."""
    return f"IAR2_RULE={rule_name} IAR2_RUN_ID={run_id} IAR2_TABLES={tables or '-'}"


# Each job writes the resolved config it runs with (JSON, which is YAML) atomically before it starts, from its
# `params.cfg`: a changed config changes the params and reruns exactly that job (Snakemake's params trigger).
WRITE_CFG = ("mkdir -p \"$(dirname {params.cfgfile})\" && printf '%s\\n' {params.cfg:q} > {params.cfgfile}.tmp$$ && "
             "mv -f {params.cfgfile}.tmp$$ {params.cfgfile} && ")


def cfg_json(d):
    return json.dumps(d, sort_keys=True)


# ----------------------------------------------------------------------------- resources (SLURM)

RESOURCES = config.get("resources", {}) or {}


def resources_of(rule_name, run=None):
    """The scale's resources for one job: `default`, then the rule's, then (ar_train) by size and size-grid."""
    spec = RESOURCES.get(rule_name, {}) or {}
    out = dict(RESOURCES.get("default", {}) or {})
    if rule_name == "ar_train":
        out.update(spec.get("default", {}) or {})
        if run is not None:
            r = PLAN.runs[run]
            out.update(spec.get(r.size, {}) or {})
            out.update(spec.get(f"{r.size}-{r.grid}", {}) or {})
    else:
        out.update(spec)
    return out


def res(rule_name):
    """Resource callables for a rule (keys known statically; values per job). Multi-node jobs take the plugin's
    `mpi` route: the job script runs our launcher once, and it calls srun with one torchrun per node."""
    keys = set(resources_of(rule_name))
    if rule_name == "ar_train":
        for rid in PLAN.runs:
            keys |= set(resources_of(rule_name, rid))
    out = {}
    for k in sorted(keys):
        out[k] = (lambda w, k=k: resources_of(rule_name, getattr(w, "run", None)).get(k, 0))
    if "nodes" in keys:
        out["tasks"] = lambda w: resources_of(rule_name, getattr(w, "run", None)).get("nodes", 1)
        out["mpi"] = "srun"
    return out


def launch(rule_name, run=None):
    """Command prefix running a trainer on the job's GPUs (torchrun) and nodes (srun); empty on CPU scales."""
    r = resources_of(rule_name, run)
    gpus, nodes = int(r.get("gpu", 0)), int(r.get("nodes", 1))
    if gpus <= 1 and nodes <= 1:
        return ""
    return f"python -m iar2.launch --gpus {gpus // max(nodes, 1)} --nodes {nodes} -- "


# ----------------------------------------------------------------------------- targets

def table_targets(tid):
    """The files one table needs: metrics of its sample sets, recon evals of its tokenizers, configs."""
    files = {f"{R}/registry.json"}
    t = PLAN.index()["tables"][tid]
    for row in t["rows"]:
        for src in row.get("values", {}).values():
            files.add(f"{R}/{src['file']}")
        if t["kind"] == "settings":
            files.add(f"{R}/{row['run']}/model.safetensors")
            if row.get("sample"):
                files.add(f"{R}/ar/{row['sample']}/samples.npz")
    return sorted(files)


def figure_targets(fid):
    files = {f"{R}/registry.json"}
    f = PLAN.figures[fid]

    def walk(obj):
        if isinstance(obj, dict):
            if "file" in obj and isinstance(obj["file"], str):
                files.add(f"{R}/{obj['file']}")
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(f)
    return sorted(files)


TABLES = sorted(PLAN.tables, key=lambda t: int(t[len("table"):]))
FIGURES = list(PLAN.figures)
ALL_TARGETS = sorted({p for t in TABLES for p in table_targets(t)} | {p for f in FIGURES for p in figure_targets(f)})
SAMPLE_TARGETS = sorted(f"{R}/ar/{s.id}/" + ("grid.png" if s.is_grid else "metrics.json")
                        for s in PLAN.samples.values())
