"""Where every result lives in a results folder (results/<scale>/), in one place.

Each function returns a path relative to the results folder, as registry.json stores it. The rules put the
folder in front (f"{R}/{layout.vq('{tok}')}") and pass Snakemake wildcards as the ids, so one function gives
both a rule's output pattern and the concrete path the registry and the report use: a path changes here, in
one line. File names a job writes inside its own folder are named here too, for those who read them.
"""
from __future__ import annotations

# -- inside one job's folder
VQ_WEIGHTS = "vq.safetensors"
AR_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"  # the exported AR model's size and settings
RUN_CONFIG = "config.yaml"  # the resolved config a trainer ran with
TRAIN_METRICS = "metrics.csv"

# -- the whole scale
REGISTRY_INDEX = "registry.json"
SUMMARY = "summary.json"
MLFLOW_DB = "mlflow.db"
MLFLOW_SPOOL = "mlflow-spool"
REFERENCE_CACHE = "cache/reference"  # reference-set features of the generation metrics
LOSS_CURVES = "analysis/loss_curves.csv"  # Figure 8


def log(job: str, name: str | None = None) -> str:
    """logs/<job>.log, or logs/<job>/<name>.log for a job that runs once per id."""
    return f"logs/{job}/{name}.log" if name else f"logs/{job}.log"


def report_dir(scale: str) -> str:
    """The rendered report, relative to the repository (not the results folder)."""
    return f"reports/{scale}"


# -- data and the reference network
def data_check() -> str:
    return "data/check.json"


def refnet() -> str:
    return "refnet/refnet.safetensors"


# -- tokenizers (a rearranged one is the tokenizer "<tok>-rearranged")
def tokenizer_dir(tok: str) -> str:
    return f"tokenizers/{tok}"


def stage1_dir(tok: str) -> str:
    return f"{tokenizer_dir(tok)}/stage1"


def vq(tok: str) -> str:
    return f"{tokenizer_dir(tok)}/{VQ_WEIGHTS}"


def stage1_vq(tok: str) -> str:
    return f"{stage1_dir(tok)}/{VQ_WEIGHTS}"


def recon(tok: str) -> str:
    """Reconstruction metrics (Tables 1, 13; Figure 4)."""
    return f"{tokenizer_dir(tok)}/recon.json"


def tokenizer_config(tok: str) -> str:
    return f"{tokenizer_dir(tok)}/{RUN_CONFIG}"


REARRANGED = "-rearranged"


def rearranged(tok: str) -> str:
    """The id (and folder name) of the tokenizer `tok` with its codebook rearranged (IAR)."""
    return f"{tok}{REARRANGED}"


def rearrange_summary(tok: str) -> str:
    """The rearranged tokenizer's clusters and permutation; `tok` is the rearranged one's id."""
    return f"{tokenizer_dir(tok)}/summary.json"


def code_distance(tok: str) -> str:
    """Figure 3."""
    return f"analysis/code_distance/{tok}.json"


def tokens_dir(tok: str, grid) -> str:
    return f"tokens/{tok}/g{grid}"


def tokens_meta(tok: str, grid) -> str:
    return f"{tokens_dir(tok, grid)}/meta.json"


# -- AR runs and their sample sets
def run_dir(run: str) -> str:
    return f"ar/{run}"


def run_of(folder: str) -> str:
    """The run id of an AR run's folder (run_dir's inverse; the index names runs by their folders)."""
    prefix = run_dir("")
    if not folder.startswith(prefix):
        raise ValueError(f"{folder!r} is not an AR run's folder ({prefix}<run>)")
    return folder[len(prefix):]


def ar_weights(run: str) -> str:
    return f"{run_dir(run)}/{AR_WEIGHTS}"


def ar_weights_at(run: str, epoch) -> str:
    """The weights exported after `epoch` (the same ar_train job writes them)."""
    return f"{run_dir(run)}/model_e{int(epoch):03d}.safetensors"


def ar_run_config(run: str) -> str:
    return f"{run_dir(run)}/{RUN_CONFIG}"


def model_meta(run: str) -> str:
    return f"{run_dir(run)}/{MODEL_META}"


def train_metrics(run: str) -> str:
    """Per-step losses of an AR run (Figure 8); a tokenizer writes its own in its folder (and stage1/)."""
    return f"{run_dir(run)}/{TRAIN_METRICS}"


def time_match(run: str) -> str:
    return f"{run_dir(run)}/time_match.json"


def sample_id(run: str, epoch, guidance) -> str:
    """<run>/e<epoch>/<guidance>: a sample set's id, and its folder under ar/."""
    return f"{run}/e{epoch}/{guidance}"


def sample_dir(sample: str) -> str:
    return run_dir(sample)


def samples(sample: str) -> str:
    """The images, ADM-style (arr_0: N x H x W x 3)."""
    return f"{sample_dir(sample)}/samples.npz"


def samples_summary(sample: str) -> str:
    """What was sampled, with the sampling config (Table 12)."""
    return f"{sample_dir(sample)}/samples.json"


def sample_grid(sample: str) -> str:
    """One row of samples per class (Figures 9-11)."""
    return f"{sample_dir(sample)}/grid.png"


def gen_metrics(sample: str) -> str:
    """FID, IS, precision, recall of one sample set."""
    return f"{sample_dir(sample)}/metrics.json"


# -- the diagnosis of chosen runs (workflow/rules/diagnosis.smk, read by iar2/report/diagnosis.py)
DIAGNOSIS = "diagnose"
DIAGNOSIS_BUDGET = "budget.json"  # written last: its presence marks the diagnosis complete


def diagnosis_budget() -> str:
    return f"{DIAGNOSIS}/{DIAGNOSIS_BUDGET}"


def diagnosis_tokenizer(tok: str, png: bool = False) -> str:
    """A tokenizer's diagnosis, or (png) its constant-code decodes."""
    return f"{DIAGNOSIS}/tok-{tok}" + ("-const.png" if png else ".json")


def diagnosis_ar(run: str, png: bool = False) -> str:
    """An AR run's diagnosis, or (png) its samples."""
    return f"{DIAGNOSIS}/ar-{run}" + (".png" if png else ".json")


def heldout_tokens_dir(tok: str, grid) -> str:
    """The val split's codes, unaugmented: held-out tokens for the AR diagnosis."""
    return f"{DIAGNOSIS}/tokens-val/{tok}/g{grid}"


def heldout_tokens_meta(tok: str, grid) -> str:
    return f"{heldout_tokens_dir(tok, grid)}/meta.json"


# -- resolved configs each job writes before it starts
def job_config(job: str, name: str) -> str:
    """configs/<job>/<name>.yaml: tokenizer/<tok>-<stage>, ar/<run>, sampling/<sample set>, time_match/<run>."""
    return f"configs/{job}/{name}.yaml"
