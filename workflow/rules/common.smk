# Configuration: load the scale file, validate every derived run config before any job is scheduled.
import json
from pathlib import Path

import yaml

from iar2.ar.train import ARRunConfig
from iar2.config import ConfigError, deep_merge, from_dict, to_dict
from iar2.sample import SampleRunConfig
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


TOKENIZERS = list(VARIANTS) + [f"{n}-rearranged" for n in config.get("rearrange", {}).get("variants", [])]
AR = config.get("ar", {"base": {}, "variants": {}})
SAMPLING = config.get("sampling", {"base": {}, "guidance": {}, "runs": {}})


def base_tokenizer(tok):
    """A tokenizer name's trained variant ("x-rearranged" is x with its codebook permuted)."""
    return tok[: -len("-rearranged")] if tok.endswith("-rearranged") else tok


def ar_config(name):
    """The resolved ARRunConfig of one AR variant: model grid and vocabularies come from its tokenizer."""
    v = dict(AR["variants"][name])
    tok = v.pop("tokenizer")
    tcfg = tokenizer_config(base_tokenizer(tok), stages(base_tokenizer(tok))[-1])
    m = tcfg["model"]
    grid = tcfg["data"]["image_size"] // 2 ** (len(m["ch_mult"]) - 1)
    vocab = ({"vocab_size": m["codebook_size"]} if m["quantizer"] == "single"
             else {"semantic_size": m["semantic_size"], "detail_size": m["detail_size"]})
    raw = deep_merge(deep_merge(AR["base"], {"model": {"grid": grid, **vocab}}), v)
    raw = deep_merge(raw, {"name": name, "train": {"tokens": f"{R}/tokens/{tok}/train"}})
    return to_dict(from_dict(ARRunConfig, raw))


def ar_tokenizer(name):
    return AR["variants"][name]["tokenizer"]


def sample_config(guidance):
    raw = deep_merge(SAMPLING["base"], {"sampling": {"guidance": SAMPLING["guidance"][guidance]}})
    return to_dict(from_dict(SampleRunConfig, raw))


# Validate every run config now, so a bad key fails before any job starts.
for _n in VARIANTS:
    for _s in stages(_n):
        tokenizer_config(_n, _s)
for _key, _allowed in (("tokenize", TOKENIZERS), ("rearrange", VARIANTS), ("code_distance", VARIANTS)):
    for _n in config.get(_key, {}).get("variants", []):
        if _n not in _allowed:
            raise ConfigError(f"{_key}.variants: {_n!r} is not a tokenizer variant; allowed values: "
                              + ", ".join(_allowed))
for _n in AR["variants"]:
    if AR["variants"][_n].get("tokenizer") not in config.get("tokenize", {}).get("variants", []):
        raise ConfigError(f"ar.variants.{_n}.tokenizer: {AR['variants'][_n].get('tokenizer')!r} has no tokens; "
                          "allowed values: " + ", ".join(config.get("tokenize", {}).get("variants", [])))
    ar_config(_n)
for _g in SAMPLING["guidance"]:
    sample_config(_g)
for _n, _gs in SAMPLING["runs"].items():
    if _n not in AR["variants"]:
        raise ConfigError(f"sampling.runs: {_n!r} is not an AR variant; allowed values: " + ", ".join(AR["variants"]))
    for _g in _gs:
        if _g not in SAMPLING["guidance"]:
            raise ConfigError(f"sampling.runs.{_n}: {_g!r} is not a guidance config; allowed values: "
                              + ", ".join(SAMPLING["guidance"]))

# Every job logs to one MLflow experiment per scale (a SQLite store under the results folder by default).
import os

os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(R).resolve()}/mlflow.db")
os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"iar2-{config.get('scale', 'default')}")


def run_dir(name, stage):
    return f"{R}/tokenizers/{name}/stage1" if stage == "stage1" else f"{R}/tokenizers/{name}"


TOKENIZER_TARGETS = [f"{R}/tokenizers/{n}/recon.json" for n in VARIANTS]
AR_TARGETS = [f"{R}/ar/{n}/model.safetensors" for n in AR["variants"]]
GENERATION_TARGETS = [f"{R}/ar/{n}/samples/{g}/metrics.json" for n, gs in SAMPLING["runs"].items() for g in gs]
ANALYSIS_TARGETS = (
    [f"{R}/tokens/{n}/train/meta.json" for n in config.get("tokenize", {}).get("variants", [])]
    + [f"{R}/tokenizers/{n}-rearranged/summary.json" for n in config.get("rearrange", {}).get("variants", [])]
    + [f"{R}/analysis/code_distance/{n}.json" for n in config.get("code_distance", {}).get("variants", [])]
)
