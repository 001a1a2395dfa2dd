"""The experiment registry: params/experiments.yaml (the paper's tables and figures as named runs) resolved at
one scale (params/<scale>.yaml) into the jobs of the DAG. Pure Python (no Snakemake), so it is tested directly
and validated before any job runs.

    guidance   GuidanceId: the ids of sampling setups (pag-1.75-3.0, static-2.25, ...)
    expand     a table row's `for:` sweep -> concrete rows; the sweeps a scale may `restrict`
    plan       Plan: tables and figures -> tokenizers, AR runs, sample sets (one run per resolved config)
    resolve    Configs: the config each job runs with at the scale
    index      registry.json, what the report reads: its typed reader and writer
    outputs    Figure 8's loss curves and the DVC summary
Paths come from iar2.layout.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from iar2.config import deep_merge
from iar2.registry.expand import expand, sweep_variables
from iar2.registry.guidance import GuidanceId
from iar2.registry.index import RegistryIndex, RunEntry, write_index
from iar2.registry.outputs import write_loss_curves, write_summary
from iar2.registry.plan import Plan, Run, SampleSet
from iar2.scale import Scale, load_scale

__all__ = ["GuidanceId", "Plan", "RegistryIndex", "Run", "RunEntry", "SampleSet", "expand", "load_plan",
           "load_yaml", "sweep_variables", "write_index", "write_loss_curves", "write_summary"]


def load_yaml(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def load_plan(repo: str | Path, scale_cfg: dict | Scale) -> Plan:
    """The plan of one scale: params/experiments.yaml deep-merged with the scale's `experiments:` overlay."""
    scale = load_scale(scale_cfg)
    x = deep_merge(load_yaml(Path(repo) / "params" / "experiments.yaml"), scale.experiments)
    plan = Plan(x, scale)
    plan.validate()
    return plan
