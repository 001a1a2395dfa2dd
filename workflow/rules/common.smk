# Configuration: load the scale file, validate every derived run config before any job is scheduled.
import json
from pathlib import Path

import yaml

from iar2.config import ConfigError, deep_merge, from_dict, to_dict
from iar2.tokenizer.config import TokenizerRunConfig


def _load_scale(cfg):
    scale = cfg.get("scale", "default")
    path = Path(workflow.basedir) / "params" / f"{scale}.yaml"
    if not path.is_file():
        raise ConfigError(f"scale: {scale!r} has no params/{scale}.yaml; allowed values: "
                          + ", ".join(sorted(p.stem for p in (Path(workflow.basedir) / "params").glob("*.yaml"))))
    return deep_merge(yaml.safe_load(path.read_text()), cfg)


config.update(_load_scale(config))
# (Snakemake exports OMP_NUM_THREADS = the rule's threads, so two 1-thread torch jobs share two cores
# without spinning against each other.)
R = config["results"]
DATA = config["data"]
TOK = config["tokenizer"]
VARIANTS = TOK["variants"]
NAME = r"[A-Za-z0-9_.+-]+"

wildcard_constraints:
    name=NAME,
    stage=r"stage1|stage2|single",


def is_dual_sd(name):
    return VARIANTS[name].get("model", {}).get("quantizer") == "semantic_detail"


def tokenizer_config(name, stage):
    """The resolved TokenizerRunConfig of one variant and stage, as a plain dict."""
    raw = deep_merge(TOK["base"], VARIANTS[name])
    raw = deep_merge(raw, {"name": f"{name}-{stage}" if stage != "single" else name,
                           "data": {"root": DATA["root"]},
                           "loss": {"domain_net": f"{R}/refnet/refnet.safetensors"},
                           "train": {"stage": stage}})
    if stage == "stage1":
        raw = deep_merge(raw, TOK.get("stage1", {}))
    if stage == "stage2":
        raw = deep_merge(raw, {"train": {"init_from": f"{R}/tokenizers/{name}/stage1/vq.safetensors"}})
    if raw["loss"].get("perceptual") != "domain":
        raw["loss"].pop("domain_net")
    return to_dict(from_dict(TokenizerRunConfig, raw))  # raises ConfigError naming the key


def stages(name):
    return ["stage1", "stage2"] if is_dual_sd(name) else ["single"]


# Validate every run config now, so a bad key fails before any job starts.
for _n in VARIANTS:
    for _s in stages(_n):
        tokenizer_config(_n, _s)
for _key in ("tokenize", "rearrange", "code_distance"):
    for _n in config.get(_key, {}).get("variants", []):
        if _n not in VARIANTS:
            raise ConfigError(f"{_key}.variants: {_n!r} is not a tokenizer variant; allowed values: "
                              + ", ".join(VARIANTS))


def run_dir(name, stage):
    return f"{R}/tokenizers/{name}/stage1" if stage == "stage1" else f"{R}/tokenizers/{name}"


TOKENIZER_TARGETS = [f"{R}/tokenizers/{n}/recon.json" for n in VARIANTS]
ANALYSIS_TARGETS = (
    [f"{R}/tokens/{n}/train/meta.json" for n in config.get("tokenize", {}).get("variants", [])]
    + [f"{R}/tokenizers/{n}-rearranged/summary.json" for n in config.get("rearrange", {}).get("variants", [])]
    + [f"{R}/analysis/code_distance/{n}.json" for n in config.get("code_distance", {}).get("variants", [])]
)
