# Configuration: the scale file (params/<scale>.yaml) over the experiment registry (params/experiments.yaml),
# resolved into the plan of jobs and validated before any job is scheduled (iar2/registry/). Result paths come
# from iar2/layout.py.
import json
import os
import re
import shlex
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from iar2 import layout
from iar2.config import ConfigError, deep_merge, dicts_in
from iar2.registry import GuidanceId, load_plan, write_index, write_loss_curves, write_summary
from iar2.registry.guidance import PATTERN as GUIDANCE_PATTERN
from iar2.registry.index import tok_run_id
from iar2.scale_schema import check_scale, coerce_numbers


def _load_scale(cfg):
    scale = cfg.get("scale", "default")
    path = Path(workflow.basedir) / "params" / f"{scale}.yaml"
    allowed = sorted(p.stem for p in (Path(workflow.basedir) / "params").glob("*.yaml") if p.stem != "experiments")
    if scale == "experiments" or not path.is_file():
        raise ConfigError(f"scale: {scale!r} has no params/{scale}.yaml; allowed values: " + ", ".join(allowed))
    return deep_merge(yaml.safe_load(path.read_text()), cfg)


config.update(_load_scale(config))
# The merged config (scale file + --configfile/--config) against the schema, before anything is planned: an
# unknown key, a wrong type or an out-of-range number stops here. Snakemake's own message prints the whole schema
# fragment; ours names the dotted key, the allowed keys or values and the closest match of a misspelt key.
coerce_numbers(config)  # `--config 'recon_eval={max_images: 9}'` arrives as the string '9'
try:
    validate(config, "../schemas/scale.schema.yaml", set_default=False)
except WorkflowError:
    check_scale(config)  # the same schema: raises ConfigError, one line per problem
    raise
PLAN = load_plan(workflow.basedir, config)  # raises ConfigError naming the key and the allowed values
SCALE_CFG = PLAN.s  # the same config typed, with the defaults of optional keys (iar2/scale.py)
# (Snakemake exports OMP_NUM_THREADS = the rule's threads, so two 1-thread torch jobs share two cores
# without spinning against each other.)
R = config["results"]
DATA = config["data"]
SCALE = config["scale"]
# The paper's numbers and claims (the report's inputs), relative to where Snakemake runs.
_PAPER = os.path.relpath(Path(workflow.basedir) / "params" / "paper")
PAPER_FILES = sorted(str(Path(_PAPER) / p.name) for p in Path(_PAPER).iterdir() if p.suffix in (".csv", ".yaml"))


def _alternation(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "^$"


TRAINED = PLAN.trained_tokenizers()
ENV = "../../environment.yml"  # every rule runs in the project's one environment (--use-conda builds it)
TOKENIZER_IDS = TRAINED + PLAN.rearranged

wildcard_constraints:
    stage=r"stage1|stage2|single",
    grid=r"\d+",
    epoch=r"\d+",
    run=_alternation(PLAN.runs),
    tok=_alternation(TOKENIZER_IDS),
    guidance=GUIDANCE_PATTERN,

# Every job logs to one MLflow experiment per scale (a SQLite store under the results folder by default;
# export MLFLOW_TRACKING_URI=http://... to use an `mlflow server` on a cluster).
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(R).resolve()}/{layout.MLFLOW_DB}")
os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"iar2-{SCALE}")
# tracking.mode spool (ci, default): jobs write their runs as records; one `iar2 track sync` logs them all when
# the workflow ends (iar2/tracking.py says why). live (paper): jobs log to the store themselves.
TRACKING = SCALE_CFG.tracking.mode
SPOOL = f"{Path(R).resolve()}/{layout.MLFLOW_SPOOL}"
if TRACKING == "spool":
    os.environ.setdefault("IAR2_MLFLOW_SPOOL", SPOOL)


def sync_tracking(log):
    """The Snakefile's onsuccess/onerror hook: log the spooled runs (a failed sync leaves them in the spool)."""
    if TRACKING == "spool":
        try:
            shell("iar2 track sync")
        except Exception as e:  # never mask the workflow's own outcome
            print(f"MLflow sync failed ({e}); the runs stay in {SPOOL}: run `iar2 track sync` to log them")


def tag(rule_name, run_id, tables=""):
    """Environment the job's MLflow run is tagged from: rule, run id, the tables it feeds. A shell prefix of
    assignments, each value quoted (NAME='v a l'), so that no value is ever read as shell syntax."""
    env = {"IAR2_RULE": rule_name, "IAR2_RUN_ID": run_id, "IAR2_TABLES": tables or "-"}
    return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())


# Each job writes the resolved config it runs with (JSON, which is YAML) atomically before it starts, from its
# `params.cfg` (the shell commands' `printf ... && mv` prefix): a changed config changes the params and reruns
# exactly that job (Snakemake's params trigger).
def cfg_json(d):
    return json.dumps(d, sort_keys=True)


def opt(flag, value):
    """`--flag 'value'` as shell words, or nothing when value is empty (an optional file argument)."""
    return shlex.join([flag, str(value)]) if value else ""


# ----------------------------------------------------------------------------- resources (SLURM)

def resources_of(rule_name, run=None):
    return PLAN.resources(rule_name, run)


def res(rule_name):
    """Resource callables per job (the plugin's names). A value of None drops the key for that job: the SLURM
    plugin reacts to `mpi` being present, which only multi-node jobs get (iar2/launch.py: slurm_resources)."""
    from iar2.launch import slurm_resources

    def shape(run):
        r = resources_of(rule_name, run)
        nodes = int(r.get("nodes", 1))
        return slurm_resources(gpus=int(r.get("gpu", 0)) // nodes, nodes=nodes, cpus_per_task=r.get("cpus_per_task"),
                               mem_mb=r.get("mem_mb"), runtime=r.get("runtime"))

    runs = list(PLAN.runs) if rule_name == "ar_train" else []
    keys = set(shape(None)).union(*(shape(rid) for rid in runs))
    return {k: (lambda w, k=k: shape(getattr(w, "run", None)).get(k)) for k in sorted(keys)}


def launch(rule_name, run=None):
    """Command prefix running a trainer on the job's GPUs (torchrun) and nodes (srun); empty on CPU scales."""
    r = resources_of(rule_name, run)
    gpus, nodes = int(r.get("gpu", 0)), int(r.get("nodes", 1))
    if gpus <= 1 and nodes <= 1:
        return ""
    return shlex.join(["python", "-m", "iar2.launch", "--gpus", str(gpus // max(nodes, 1)), "--nodes", str(nodes),
                       "--"]) + " "


# ----------------------------------------------------------------------------- targets

def table_targets(tid):
    """The files one table needs: metrics of its sample sets, recon evals of its tokenizers, configs."""
    files = {f"{R}/{layout.REGISTRY_INDEX}"}
    t = PLAN.index().tables[tid]
    for row in t["rows"]:
        for src in row.get("values", {}).values():
            files.update(f"{R}/{f}" for f in [src["file"], *src.get("seeds", [])])  # seeds: iar2/seeds.py
        if t["kind"] == "settings":
            files.add(f"{R}/{layout.ar_weights(layout.run_of(row['run']))}")
            if row.get("sample"):
                files.add(f"{R}/{layout.samples(row['sample'])}")
    return sorted(files)


def figure_targets(fid):
    files = {f"{R}/{layout.REGISTRY_INDEX}"}
    for d in dicts_in(PLAN.figures[fid]):
        if isinstance(d.get("file"), str):
            files.update(f"{R}/{f}" for f in [d["file"], *d.get("seeds", [])])  # seeds: iar2/seeds.py
    return sorted(files)


TABLES = sorted(PLAN.tables, key=lambda t: int(t[len("table"):]))
FIGURES = list(PLAN.figures)
ALL_TARGETS = sorted({p for t in TABLES for p in table_targets(t)} | {p for f in FIGURES for p in figure_targets(f)})
SAMPLE_TARGETS = sorted(f"{R}/{layout.sample_grid(s.id) if s.is_grid else layout.gen_metrics(s.id)}"
                        for s in PLAN.samples.values())


LOSS_RUNS = [layout.run_of(s["run"]) for f in PLAN.figures.values() if f["kind"] == "loss_curves" for s in f["series"]]


# ----------------------------------------------------------------------------- input functions


def final_stage(w):
    return PLAN.stages(w.tok)[-1]


def train_inputs(w):
    # report: the config's data.check_report (the registry sets it), so its bad images are skipped
    inp = {"refnet": f"{R}/{layout.refnet()}", "data": DATA["root"], "report": f"{R}/{layout.data_check()}"}
    if final_stage(w) == "stage2":
        inp["init"] = f"{R}/{layout.stage1_vq(w.tok)}"
    return inp


def tokens_of(rid):
    """The token set a run trains on."""
    r = PLAN.runs[rid]
    return layout.tokens_meta(r.tokenizer, r.grid)


SAMPLE = layout.sample_id("{run}", "{epoch}", "{guidance}")  # a sample set's id in the rules' wildcards


def sample_of(w):
    return layout.sample_id(w.run, w.epoch, w.guidance)


def sample_inputs(w):
    r = PLAN.runs[w.run]
    inp = {"ar": f"{R}/{layout.ar_weights(w.run)}", "vq": f"{R}/{layout.vq(r.tokenizer)}"}
    if GuidanceId.parse(w.guidance).reject:
        inp["refnet"] = f"{R}/{layout.refnet()}"
    return inp
