"""Inputs of the report: the paper's numbers, the registry index of a results folder, the metric files it points
to, and the provenance of each number (config hash, MLflow run, DVC hash, git commit).

Everything here tolerates a partial run: a file that does not exist yet resolves to a missing value, never an
exception. The registry index is read with its one typed reader (iar2.registry.index.RegistryIndex; paths in it
are relative to the results folder).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iar2 import layout
from iar2.registry.index import RegistryIndex, RunEntry
from iar2.seeds import combine as seed_combine

log = logging.getLogger(__name__)

# Paper tables in order; the registry may name its own CSV, these are the defaults.
TABLES: dict[str, tuple[str, str]] = {
    "table1": ("table01_codebook_size.csv", "Table 1: semantic / detail codebook sizes"),
    "table2": ("table02_sota_imagenet256.csv", "Table 2: class-conditional ImageNet 256x256"),
    "table3": ("table03_scales_tokens_epochs.csv", "Table 3: model sizes, token grids and training epochs"),
    "table4": ("table04_ablation_components.csv", "Table 4: core components"),
    "table5": ("table05_prediction_paradigms.csv", "Table 5: token prediction paradigms"),
    "table6": ("table06_local_context.csv", "Table 6: local-context enhancement"),
    "table7": ("table07_codebook_architecture.csv", "Table 7: codebook architecture"),
    "table8": ("table08_pag_cfg_ablation.csv", "Table 8: progressive attention-guided CFG"),
    "table9": ("table09_cfg_range.csv", "Table 9: PAG-CFG start and end scales"),
    "table10": ("table10_semantic_weight.csv", "Table 10: semantic loss weight s"),
    "table11": ("table11_training_settings.csv", "Table 11: training settings"),
    "table12": ("table12_inference_settings.csv", "Table 12: inference settings"),
    "table13": ("table13_tokenizers.csv", "Table 13: tokenizers"),
}
SETTINGS_TABLES = ("table11", "table12")
# Columns that hold measured numbers (the rest of a paper CSV describes the row).
METRIC_COLUMNS = ("rfid", "psnr", "ssim", "gfid", "fid", "is", "precision", "recall")
# Table 2 rows of these methods are reproduced; every other row is another method's published number.
REPRODUCED_METHOD = re.compile(r"^(LlamaGen|IAR2?)-(B|L|XL|XXL)$")
MODEL_NAME = re.compile(r"^(?P<method>.+)-(?P<size>B|L|XL|XXL)$")


# ----------------------------------------------------------------------------- values and keys

def parse_cell(text: str) -> Any:
    """A CSV cell typed as the paper CSVs use it: '' -> None, true/false -> bool, int, float, else str."""
    t = text.strip()
    if t == "":
        return None
    if t in ("true", "false"):
        return t == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def canon(v: Any) -> str:
    """A comparable spelling of a key value: 100, 100.0 and "100" are equal; so are True and "true"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    s = str(v).strip()
    if s in ("true", "false", "True", "False"):
        return s.lower()
    try:
        return canon(float(s))
    except ValueError:
        return s


def key_of(row: dict, cols: list[str]) -> tuple[str, ...]:
    return tuple(canon(row.get(c)) for c in cols)


def derive_columns(row: dict) -> dict:
    """Add `method` and `size` for a model name like "IAR2-XL" (claims group by them); a bare size ("B") gives
    only `size`, a bare method name ("IAR2") only `method`."""
    name = str(row.get("model", "") or "")
    m = MODEL_NAME.match(name)
    if m:
        return {"method": m["method"], "size": m["size"], **row}
    if name in ("B", "L", "XL", "XXL"):
        return {"size": name, **row}
    return {"method": name, **row} if name else row


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def fmt(v: Any, col: str = "") -> str:
    """Our numbers at a precision that suits the column (the paper's keep their printed text)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if col in ("precision", "recall", "ssim") or abs(v) < 1:
            return f"{v:.3f}"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"
    return str(v)


# ----------------------------------------------------------------------------- the paper

@dataclass
class PaperTable:
    name: str
    path: Path
    columns: list[str]
    rows: list[dict]  # typed values
    text: list[dict]  # the cells exactly as printed (for display)


def load_paper_table(path: Path, name: str = "") -> PaperTable | None:
    if not path.is_file():
        log.warning("paper table %s not found at %s", name, path)
        return None
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        text = [dict(r) for r in reader]
        columns = list(reader.fieldnames or [])
    rows = [{k: parse_cell(v or "") for k, v in r.items()} for r in text]
    return PaperTable(name, path, columns, rows, text)


def load_fig_claims(paper_dir: Path) -> list[dict]:
    path = paper_dir / "fig_claims.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def default_paper_dir() -> Path:
    """params/paper of the working directory, else of the source tree this package lives in."""
    here = Path("params/paper")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "params" / "paper"


# ----------------------------------------------------------------------------- our results

@dataclass
class Cell:
    """One of our numbers: its value (None when missing), why it is missing, and where it comes from."""

    value: Any = None
    status: str = "missing"  # ok | missing (file absent) | no-field (file present, field absent)
    file: str | None = None  # relative to the results folder
    field: str | None = None
    run: str | None = None
    replicates: list | None = None  # bootstrap replicates of the value (iar2.bootstrap), when its job wrote them
    samples: int | None = None  # the sample count behind the value (generated images), per seed
    seeds: int = 1  # training seeds behind the value (their mean; iar2/seeds.py)
    seed_values: list | None = None  # per seed (0, 1, ...): its value and its replicates, when seeds > 1
    seed_replicates: list | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Results:
    """A results folder and its registry.json (an empty registry when the file is absent)."""

    root: Path
    registry: RegistryIndex = field(default_factory=RegistryIndex)
    repo_root: Path = Path(".")
    _json_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | Path, repo_root: str | Path | None = None) -> "Results":
        root = Path(root)
        registry = RegistryIndex.read(root / layout.REGISTRY_INDEX)
        return cls(root=root, registry=registry, repo_root=Path(repo_root) if repo_root else _repo_root(root, registry))

    @property
    def scale(self) -> str:
        return str(self.registry.scale or self.root.name)

    @property
    def protocol(self) -> dict:
        return dict(self.registry.protocol)

    @property
    def runs(self) -> dict[str, RunEntry]:
        return dict(self.registry.runs)

    def run(self, run_id: str | None) -> RunEntry | None:
        return self.registry.runs.get(run_id or "")

    def run_dir(self, run_id: str | None) -> str | None:
        entry = self.run(run_id)
        return entry.dir if entry else None

    def table(self, name: str) -> dict:
        return dict(self.registry.tables.get(name) or {})

    def figure(self, name: str) -> dict:
        return dict(self.registry.figures.get(name) or {})

    def path(self, rel: str | None) -> Path | None:
        return None if not rel else self.root / rel

    def read_json(self, rel: str) -> dict | None:
        """A metric JSON (cached); None when absent or unreadable (a job may be writing it right now)."""
        if rel in self._json_cache:
            return self._json_cache[rel]
        p = self.root / rel
        data = None
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                log.warning("cannot read %s: %s", p, e)
        self._json_cache[rel] = data
        return data

    def cell(self, source: dict | None) -> Cell:
        """Resolve {"file", "field", "run"} to our number; with "seeds" (the files of the same set trained on other
        seeds), to the mean over the seeds and its two-level bootstrap (iar2/seeds.py). A set whose seeds are not all
        present is missing: a mean over some of them would be another number."""
        if source and source.get("seeds"):
            return self._seeded_cell(source)
        return self._one_cell(source)

    def _seeded_cell(self, source: dict) -> Cell:
        cells = [self._one_cell({**source, "file": f}) for f in [source["file"], *source["seeds"]]]
        c = Cell(file=source["file"], field=source.get("field"), run=source.get("run"), seeds=len(cells))
        bad = [x for x in cells if not x.ok or not is_number(x.value)]
        if bad:
            c.status = bad[0].status
            return c
        reps = [x.replicates for x in cells] if all(x.replicates for x in cells) else None
        c.seed_values, c.seed_replicates = [float(x.value) for x in cells], reps
        c.value, c.replicates = seed_combine(c.seed_values, reps)
        c.status = "ok"
        ns = [x.samples for x in cells if x.samples is not None]
        c.samples = min(ns) if ns else None
        return c

    def _one_cell(self, source: dict | None) -> Cell:
        if not source or not source.get("file"):
            return Cell(status="missing")
        c = Cell(file=source["file"], field=source.get("field"), run=source.get("run"))
        data = self.read_json(source["file"])
        if data is None:
            return c
        value: Any = data
        for part in str(source.get("field") or "").split("."):
            if not part:
                continue
            if not isinstance(value, dict) or part not in value:
                c.status = "no-field"
                return c
            value = value[part]
        c.value, c.status = value, "ok"
        boot = data.get("bootstrap") if isinstance(data, dict) else None
        name = str(source.get("field") or "").rsplit(".", 1)[-1]
        if isinstance(boot, dict) and isinstance(boot.get(name), list):
            c.replicates, c.samples = boot[name], boot.get("num_generated")
        return c

    def intervals_of(self, sources: dict) -> dict:
        """A claims row's entries for the metric columns of `sources` (`interval_entries`)."""
        return interval_entries({col: self.cell(src) for col, src in sources.items() if src})

    def config_of(self, run_id: str | None, config_rel: str | None = None) -> tuple[str | None, dict | None]:
        """(config path relative to the results folder, parsed config) of a run; (path, None) when absent."""
        entry = self.run(run_id)
        rel = config_rel or (entry.config if entry else None)
        if not rel:
            return None, None
        p = self.root / rel
        if not p.is_file():
            return rel, None
        try:
            return rel, yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            log.warning("cannot parse %s: %s", p, e)
            return rel, None


def interval_entries(cells: dict[str, Cell]) -> dict:
    """A claims row's entries for its metric columns: for those whose job wrote replicates `_boot` (replicates), `_n`
    (samples per seed) and `_seeds` (training seeds); for a column over several seeds also `_seeds`, `_sv` (each
    seed's value) and `_sb` (each seed's replicates, when written), so a claim can compare it with a set of fewer
    seeds over the seeds both have (iar2/report/claims.py), with or without replicates."""
    out: dict = {}
    for col, c in cells.items():
        if c is None:
            continue
        if c.replicates:
            for key, v in (("_boot", c.replicates), ("_n", c.samples)):
                out.setdefault(key, {})[col] = v
        if c.replicates or (c.seeds > 1 and c.seed_values):
            out.setdefault("_seeds", {})[col] = c.seeds
        if c.seeds > 1 and c.seed_values:
            out.setdefault("_sv", {})[col] = c.seed_values
            if c.seed_replicates:
                out.setdefault("_sb", {})[col] = c.seed_replicates
    return out


def _repo_root(root: Path, registry: RegistryIndex) -> Path:
    """The repository the results folder belongs to (dvc.lock and git live there)."""
    rel = registry.results.strip("/")
    absolute = root.resolve()
    if rel and absolute.as_posix().endswith("/" + rel):
        return Path(absolute.as_posix()[: -len(rel) - 1])
    for parent in [absolute, *absolute.parents]:
        if (parent / ".git").exists() or (parent / "dvc.lock").exists():
            return parent
    return Path.cwd()


# ----------------------------------------------------------------------------- provenance

def file_sha256_12(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def git_head(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def mlflow_runs(db: Path, experiment: str) -> dict[str, dict]:
    """Tag run_id -> {"mlflow_run", "status", "experiment"} from an MLflow SQLite store, opened read-only.

    Several MLflow runs may carry one run id (a job rerun); the finished one started last wins, and runs of the
    scale's experiment win over others. An absent or unreadable store gives {}.
    """
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute(
                "SELECT t.value, r.run_uuid, r.status, r.start_time, e.name FROM tags t "
                "JOIN runs r ON r.run_uuid = t.run_uuid "
                "LEFT JOIN experiments e ON e.experiment_id = r.experiment_id "
                "WHERE t.key = 'run_id' AND r.lifecycle_stage = 'active'").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        log.warning("MLflow store %s not readable (%s): no MLflow run ids in the report", db, e)
        return {}
    best: dict[str, tuple] = {}
    for run_id, uuid, status, start, exp in rows:
        rank = (exp == experiment, status == "FINISHED", start or 0)
        if run_id not in best or rank > best[run_id][0]:
            best[run_id] = (rank, {"mlflow_run": uuid, "status": status, "experiment": exp})
    return {k: v[1] for k, v in best.items()}


def dvc_hashes(lock: Path) -> dict[str, str]:
    """Output path (relative to the repository, normalised) -> md5 from dvc.lock; {} without one."""
    if not lock.is_file():
        return {}
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as e:
        log.warning("cannot parse %s: %s", lock, e)
        return {}
    out: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for o in (stage or {}).get("outs") or []:
            digest = o.get("md5") or o.get("etag") or o.get("checksum")
            if o.get("path") and digest:
                out[os.path.normpath(o["path"])] = str(digest)
    return out


class Provenance:
    """Where each of our numbers comes from: run id, config file and its hash, MLflow run, DVC hash, git commit."""

    def __init__(self, results: Results):
        self.results = results
        self.git_commit = results.registry.git_commit
        self.rendered_at_commit = git_head(results.repo_root)
        self.mlflow_db = results.root / layout.MLFLOW_DB
        self.experiment = f"iar2-{results.scale}"
        self.mlflow = mlflow_runs(self.mlflow_db, self.experiment)
        self.dvc_lock = results.repo_root / "dvc.lock"
        self.dvc = dvc_hashes(self.dvc_lock)
        self._rel_results = os.path.relpath(results.root.resolve(), results.repo_root.resolve())
        log.info("provenance: git %s, %d MLflow runs tagged (%s), %d DVC outputs (%s)", self.git_commit[:12],
                 len(self.mlflow), self.mlflow_db if self.mlflow_db.is_file() else "no store",
                 len(self.dvc), self.dvc_lock if self.dvc_lock.is_file() else "no dvc.lock")

    def dvc_hash(self, rel: str | None) -> str | None:
        """md5 of the DVC output holding this file (the file itself or a folder above it)."""
        if not rel or not self.dvc:
            return None
        p = os.path.normpath(os.path.join(self._rel_results, rel))
        while p and p not in (".", os.sep):
            if p in self.dvc:
                return self.dvc[p]
            p = os.path.dirname(p)
        return None

    def run(self, run_id: str | None, config_rel: str | None = None) -> dict:
        info = self.results.run(run_id)
        config = config_rel or (info.config if info else None)
        cfg_path = self.results.path(config)
        ml = self.mlflow.get(run_id or "") or {}
        return {"run": run_id, "kind": info.kind if info else None, "dir": info.dir if info else None,
                "config": config, "config_hash": file_sha256_12(cfg_path) if cfg_path else None,
                "mlflow_run": ml.get("mlflow_run"), "mlflow_status": ml.get("status"),
                "dvc_md5": self.dvc_hash(info.dir if info else None), "git_commit": self.git_commit}

    def number(self, cell: Cell) -> dict:
        d = self.run(cell.run)
        d.update({"file": cell.file, "field": cell.field, "file_dvc_md5": self.dvc_hash(cell.file)})
        return d
