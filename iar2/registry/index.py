"""registry.json: the index of one results folder, what the report reads (iar2/report/sources.py).

    scale, results, git_commit    which scale, its results folder (relative to the repository), the commit
    protocol                      image sizes, extractor, samples per set, ... (shown beside each table)
    runs                          run id -> RunEntry: its kind, folder and config file, the tables it feeds
    tables, figures               each row and point -> {"file", "field", "run"} of our number (paths relative
                                  to the results folder), as built by iar2.registry.plan

`build_index` makes it from a plan, `RegistryIndex.write` and `RegistryIndex.read` are the one writer and
reader: the workflow writes with the first, the report reads with the second.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from iar2 import layout
from iar2.io import atomic_write_json

if TYPE_CHECKING:  # the plan builds its index by calling build_index
    from iar2.registry.plan import Plan

log = logging.getLogger(__name__)


def tok_run_id(tok: str) -> str:
    """A tokenizer's run id (a key of `runs`, and its MLflow tag); an AR run's or a sample set's is its folder."""
    return f"tok/{tok}"


@dataclass
class RunEntry:
    kind: str  # tokenizer | ar | samples
    dir: str
    config: str
    tables: list[str] | None = None  # ar and samples
    resources: dict | None = None  # ar: the scale's SLURM resources of its training job

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class RegistryIndex:
    scale: str | None = None
    results: str = ""
    git_commit: str = "unknown"
    protocol: dict = field(default_factory=dict)
    runs: dict[str, RunEntry] = field(default_factory=dict)
    tables: dict[str, dict] = field(default_factory=dict)
    figures: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "runs": {k: r.to_dict() for k, r in self.runs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> RegistryIndex:
        """Tolerant of a partial or older file: an absent key keeps its default, an unknown one is dropped."""
        known = {f.name for f in dataclasses.fields(RunEntry)}
        runs = {k: RunEntry(**{n: v for n, v in (r or {}).items() if n in known})
                for k, r in (d.get("runs") or {}).items() if (r or {}).keys() >= {"kind", "dir", "config"}}
        return cls(scale=d.get("scale"), results=str(d.get("results") or ""),
                   git_commit=str(d.get("git_commit") or "unknown"), protocol=dict(d.get("protocol") or {}),
                   runs=runs, tables=dict(d.get("tables") or {}), figures=dict(d.get("figures") or {}))

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> RegistryIndex:
        """The index at `path`; an empty one (and a logged reason) when it is absent or unreadable, so the
        report of a partial run still renders the paper's numbers."""
        path = Path(path)
        if not path.is_file():
            log.warning("no registry at %s: every number of ours will be marked missing", path)
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            log.error("registry %s is not valid JSON (%s): rendering the paper's numbers only", path, e)
            return cls()
        if not isinstance(data, dict):
            log.error("registry %s is not a mapping: rendering the paper's numbers only", path)
            return cls()
        return cls.from_dict(data)


def build_index(plan: Plan, git_commit: str = "unknown") -> RegistryIndex:
    """The index of `plan` (see the module doc)."""
    runs = {}
    for t in plan.trained_tokenizers() + plan.rearranged:
        trained = not t.endswith(layout.REARRANGED)
        runs[tok_run_id(t)] = RunEntry("tokenizer", layout.tokenizer_dir(t),
                                       layout.tokenizer_config(t) if trained else layout.rearrange_summary(t))
    for rid, r in plan.runs.items():
        runs[layout.run_dir(rid)] = RunEntry("ar", layout.run_dir(rid), layout.ar_run_config(rid),
                                             sorted(r.tables), plan.resources("ar_train", rid))
    for sid, ss in plan.samples.items():
        runs[layout.sample_dir(sid)] = RunEntry("samples", layout.sample_dir(sid),
                                                layout.job_config("sampling", sid), sorted(ss.tables))
    s = plan.s
    protocol = {**s.protocol.as_dict(), "image_sizes": {str(k): v for k, v in s.grids.items()},
                "extractor": s.gen_metrics.extractor, "samples_per_set": plan.configs.samples_per_set(),
                "recon_images": s.recon_eval.max_images}
    return RegistryIndex(scale=s.scale, results=plan.results, git_commit=git_commit, protocol=protocol,
                         runs=runs, tables={**plan.tables, **_settings_configs(plan)}, figures=plan.figures)


def _settings_configs(plan: Plan) -> dict:
    """Tables 11 and 12 point at the resolved configs actually used: the AR run's (written by the trainer) and,
    for Table 12, the sampling config of the run's main sample set at its last epoch."""
    out = {}
    for tid, t in plan.tables.items():
        if t["kind"] != "settings":
            continue
        t = copy.deepcopy(t)
        for row in t["rows"]:
            rid = layout.run_of(row["run"])
            row["run_config"] = layout.ar_run_config(rid)
            row["config"] = row["run_config"]
            if "guidance" in row:
                sid = plan.last_sample(rid, row["guidance"])
                row["sample"] = sid
                row["config"] = layout.job_config("sampling", sid)
                row["sample_config"] = layout.samples_summary(sid)
        out[tid] = t
    return out


def head_commit(repo: str | Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_index(plan: Plan, out: str | Path, repo: str | Path) -> None:
    """results/<scale>/registry.json, stamped with the commit that wrote it."""
    plan.index(head_commit(repo)).write(out)
