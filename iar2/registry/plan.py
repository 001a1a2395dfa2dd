"""The plan of one scale: every table and figure of params/experiments.yaml expanded into the jobs of the DAG.

`Plan(experiments, scale)` holds
  - tokenizers   id -> the registry's spec (trained per stage)       (tokenizers/<id>)
  - runs         AR training runs, each with the epochs it must export (ar/<family>-<size>-<grid>[-<tag>])
  - samples      (run, epoch, guidance) sample sets                  (ar/<run>/e<epoch>/<guidance>)
  - tables, figures  each row and point -> the file and field holding our number (and, for a set the scale
                     trains on several seeds, its seeded copies' files: iar2/seeds.py)
Runs with the same resolved config are one run under the shortest id, so a run shared by several tables
trains once. The configs come from iar2.registry.resolve, the paths from iar2.layout.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from iar2 import layout
from iar2.config import ConfigError, dicts_in
from iar2.grid_panels import grid_panels
from iar2.registry.expand import FIGURE_SWEEPS, check_restrict, expand
from iar2.registry.guidance import GuidanceId
from iar2.registry.index import build_index, tok_run_id
from iar2.registry.resolve import Configs
from iar2.scale import Scale, load_scale
from iar2.seeds import add_seeds

METRIC_FIELDS = {"fid": "fid", "gfid": "fid", "is": "isc_mean", "precision": "precision", "recall": "recall"}
RECON_FIELDS = {"rfid": "rfid", "psnr": "psnr", "ssim": "ssim"}
SIZES = ("B", "L", "XL", "XXL")
PAPER_TABLES = Path(__file__).resolve().parents[2] / "params" / "paper"


@dataclass
class Run:
    id: str
    family: str
    size: str
    grid: int
    tokenizer: str
    model: dict
    time_match: str | None = None
    seed_offset: int = 0  # a seeded copy (iar2/seeds.py): train.seed + this
    epochs: set = field(default_factory=set)
    tables: set = field(default_factory=set)


@dataclass
class SampleSet:
    id: str
    run: str
    epoch: int
    guidance: GuidanceId
    tables: set = field(default_factory=set)

    @property
    def is_grid(self) -> bool:
        return self.guidance.grid


class Plan:
    def __init__(self, experiments: dict, scale: dict | Scale):
        self.x = copy.deepcopy(experiments)
        self.s = load_scale(scale)  # the schema's checks, then typed (iar2/scale.py)
        self.restrict = self.s.restrict
        check_restrict(self.restrict, self.x)
        self.results = self.s.results
        self.families = self.x["families"]
        self.tokenizers: dict[str, dict] = {}
        for name, entry in self.x["tokenizers"].items():
            for env, spec in expand({**entry, "_id": name}, {}, self.families, f"tokenizers.{name}"):
                tid = spec.pop("_id")
                self.tokenizers[tid] = spec
        self.configs = Configs(self.s, self.tokenizers, self.families)
        self.rearranged = [layout.rearranged(t) for t in self.x.get("rearranged", [])]
        for t in self.x.get("rearranged", []):
            if t not in self.tokenizers:
                raise ConfigError(f"rearranged: {t!r} is not a tokenizer; allowed values: " + ", ".join(self.tokenizers))
        self.runs: dict[str, Run] = {}
        self.samples: dict[str, SampleSet] = {}
        self.used_tokenizers: dict[str, set] = {}  # tokenizer -> tables
        self.tables: dict[str, dict] = {}
        self.figures: dict[str, dict] = {}
        for tid, t in self.x["tables"].items():
            self.tables[tid] = self._table(tid, t)
        for fid, f in self.x["figures"].items():
            self.figures[fid] = self._figure(fid, f)
        self._dedupe_runs()
        self._resolve_time_match()
        add_seeds(self)
        unknown = sorted(set(self.s.sampling.per_class_by_table) - set(self.tables) - set(self.figures))
        if unknown:
            raise ConfigError(f"sampling.per_class_by_table: {', '.join(unknown)} not a table or figure of the "
                              "registry; allowed values: " + ", ".join(sorted(self.tables) + sorted(self.figures)))

    # -- each job's config (iar2.registry.resolve), by the ids the rules know
    def codebook(self, n: int) -> int:
        return self.configs.codebook(n)

    def image_size(self, grid: int) -> int:
        return self.configs.image_size(grid)

    def stages(self, tok: str) -> list[str]:
        return self.configs.stages(tok)

    def base_tokenizer(self, tok: str) -> str:
        return self.configs.base_tokenizer(tok)

    def tokenizer_config(self, tok: str, stage: str) -> dict:
        return self.configs.tokenizer_config(tok, stage)

    def ar_config(self, rid: str, epoch_steps: float | None = None, identity: bool = False) -> dict:
        return self.configs.ar_config(self.runs[rid], epoch_steps, identity)

    def sample_config(self, gid: GuidanceId | str, sid: str | None = None) -> dict:
        """Sampling config of sample set `sid` (its tables may size it), or of guidance `gid` alone."""
        return self.configs.sample_config(gid, self.samples[sid].tables if sid else ())

    def resources(self, rule: str, rid: str | None = None) -> dict:
        return self.configs.resources(rule, self.runs[rid] if rid is not None else None)

    # -- what the DAG builds
    def token_sets(self) -> list[tuple[str, int]]:
        return sorted({(r.tokenizer, r.grid) for r in self.runs.values()})

    def trained_tokenizers(self) -> list[str]:
        need = {self.base_tokenizer(t) for t in self.used_tokenizers} | {self.base_tokenizer(t) for t, _ in
                                                                         self.token_sets()}
        return [t for t in self.tokenizers if t in need]

    def validate(self) -> None:
        """Resolve every config once, so a wrong key or value fails before any job runs."""
        for t in self.trained_tokenizers():
            for st in self.stages(t):
                self.tokenizer_config(t, st)
        for rid in self.runs:
            self.ar_config(rid)
        for sid, s in self.samples.items():
            self.sample_config(s.guidance, sid)

    def tables_of_run(self, rid: str) -> str:
        return ",".join(sorted(self.runs[rid].tables))

    def last_sample(self, rid: str, gid: str) -> str:
        run = self.runs[rid]
        return layout.sample_id(rid, max(run.epochs), gid) if run.epochs else ""

    def index(self, git_commit: str = "unknown"):
        """What the report reads (results/<scale>/registry.json): iar2.registry.index."""
        return build_index(self, git_commit)

    # -- building the plan: table rows and figure points -> runs and sample sets
    def guidance_id(self, g: str, family: str, size: str, grid: int) -> GuidanceId:
        """A row's `guidance:` as an id: `fixed` (the ablations' CFG), `main` (the family's), or an id."""
        if g == "fixed":
            g = self.x["fixed_cfg"]
        elif g == "main":
            m = self.x["main_guidance"][family]
            g = m if isinstance(m, str) else m[f"{size}-{grid}"]
        return GuidanceId.parse(g)

    def _run(self, spec, where: str, table: str) -> str:
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}.run: expected a mapping (family, size, grid, ...), got {spec!r}")
        unknown = set(spec) - {"family", "size", "grid", "tokenizer", "tag", "model", "time_match"}
        if unknown:
            raise ConfigError(f"{where}.run: unknown key(s) {sorted(unknown)}; allowed values: family, size, grid, "
                              "tokenizer, tag, model, time_match")
        fam = spec.get("family")
        if fam not in self.families:
            raise ConfigError(f"{where}.run.family: {fam!r}; allowed values: " + ", ".join(self.families))
        size, grid = str(spec.get("size")), int(spec.get("grid", 0))
        if size not in SIZES:
            raise ConfigError(f"{where}.run.size: {size!r}; allowed values: " + ", ".join(SIZES))
        self.image_size(grid)
        tok = spec.get("tokenizer") or self.families[fam]["tokenizer"]
        if tok not in self.tokenizers and tok not in self.rearranged:
            raise ConfigError(f"{where}.run.tokenizer: {tok!r}; allowed values: "
                              + ", ".join([*self.tokenizers, *self.rearranged]))
        tag = spec.get("tag")
        if tag is None and tok != self.families[fam]["tokenizer"]:
            tag = tok.replace("-", "", 1).replace("-", "x")  # vq-256 -> vq256, sd-128-4096 -> sd128x4096
        rid = f"{fam}-{size}-{grid}" + (f"-{tag}" if tag else "")
        run = Run(rid, fam, size, grid, tok, spec.get("model", {}) or {}, spec.get("time_match"))
        old = self.runs.get(rid)
        if old is not None and (old.tokenizer, old.model, old.time_match) != (run.tokenizer, run.model, run.time_match):
            raise ConfigError(f"{where}.run: id {rid!r} names two different runs; give one a distinct `tag`")
        run = old or run
        self.runs[rid] = run
        run.tables.add(table)
        self.used_tokenizers.setdefault(tok, set()).add(table)
        return rid

    def _sample(self, spec: dict, where: str, table: str) -> SampleSet:
        rid = self._run(spec.get("run"), where, table)
        run = self.runs[rid]
        epoch = int(spec.get("epoch", 0))
        if epoch <= 0:
            raise ConfigError(f"{where}.epoch: {spec.get('epoch')!r}; expected a positive number of epochs")
        gid = self.guidance_id(str(spec.get("guidance", "main")), run.family, run.size, run.grid)
        run.epochs.add(epoch)
        sid = layout.sample_id(rid, epoch, gid)
        ss = self.samples.setdefault(sid, SampleSet(sid, rid, epoch, gid))
        ss.tables.add(table)
        return ss

    def _metric_sources(self, ss: SampleSet, columns) -> dict:
        path = layout.gen_metrics(ss.id)
        return {c: {"file": path, "field": METRIC_FIELDS[c], "run": layout.sample_dir(ss.id)} for c in columns
                if c in METRIC_FIELDS}

    def _recon_sources(self, tok: str, columns) -> dict:
        return {c: {"file": layout.recon(tok), "field": f, "run": tok_run_id(tok)}
                for c, f in RECON_FIELDS.items() if c in columns}

    def _table(self, tid: str, t: dict) -> dict:
        cols = _paper_columns(t["paper_csv"])
        rows = []
        for i, entry in enumerate(t["rows"]):
            for env, row in expand(entry, self.restrict, self.families, f"tables.{tid}.rows[{i}]"):
                r = {"key": row["key"], "values": {}}
                if "tokenizer" in row:
                    if row["tokenizer"] not in self.tokenizers:
                        raise ConfigError(f"tables.{tid}: tokenizer {row['tokenizer']!r}; allowed values: "
                                          + ", ".join(self.tokenizers))
                    self.used_tokenizers.setdefault(row["tokenizer"], set()).add(tid)
                    r["values"].update(self._recon_sources(row["tokenizer"], cols))
                if "sample" in row:
                    ss = self._sample(row["sample"], f"tables.{tid}", tid)
                    r["values"].update(self._metric_sources(ss, cols))
                    r["sample"] = ss.id
                if "run" in row:  # settings rows (Tables 11, 12)
                    rid = self._run(row["run"], f"tables.{tid}", tid)
                    r["run"] = layout.run_dir(rid)
                if "guidance" in row:
                    run = self.runs[rid]
                    r["guidance"] = str(self.guidance_id(row["guidance"], run.family, run.size, run.grid))
                rows.append(r)
        return {"title": t["title"], "paper_csv": t["paper_csv"], "key": t["key"],
                "kind": t.get("kind", "results"), "rows": rows}

    def _figure(self, fid: str, f: dict) -> dict:
        kind = f["kind"]
        out = {"title": f["title"], "kind": kind}
        # the figure's list swept by `name` (FIGURE_SWEEPS), shortened by the scale's restrict
        keep = lambda name: [v for v in f[FIGURE_SWEEPS[kind][name]]
                             if name not in self.restrict or v in self.restrict[name]]
        if kind == "code_distance":
            out["series"] = []
            for tok in f["tokenizers"]:
                self.used_tokenizers.setdefault(tok, set()).add(fid)
                out["series"].append({"label": tok, "file": layout.code_distance(tok), "run": tok_run_id(tok)})
        elif kind == "codebook_sweep":
            out["x"], out["points"] = "codebook_size", []
            for env, row in expand({k: f[k] for k in ("for", "tokenizer", "sample")}, self.restrict, self.families,
                                   f"figures.{fid}"):
                self.used_tokenizers.setdefault(row["tokenizer"], set()).add(fid)
                ss = self._sample(row["sample"], f"figures.{fid}", fid)
                out["points"].append({"x": env["codebook"], "label": row["tokenizer"],
                                      "actual_size": self.codebook(env["codebook"]),
                                      **self._recon_sources(row["tokenizer"], ["rfid"]),
                                      "gfid": self._metric_sources(ss, ["fid"])["fid"],
                                      "is": self._metric_sources(ss, ["is"])["is"]})
        elif kind == "cfg_sweep":
            out["series"] = []
            for size in keep("size"):
                spec = {**f["run"], "size": size}
                pts = []
                for scale in keep("static"):
                    ss = self._sample({"run": spec, "epoch": f["epoch"], "guidance": f"static-{scale}"},
                                      f"figures.{fid}", fid)
                    pts.append({"x": scale, **self._metric_sources(ss, ["fid", "is"])})
                pag = self._sample({"run": spec, "epoch": f["epoch"], "guidance": "main"}, f"figures.{fid}", fid)
                out["series"].append({"label": f"{self.families[spec['family']]['label']}-{size}", "static": pts,
                                      "pag": {**self._metric_sources(pag, ["fid", "is"]), "guidance": str(pag.guidance)}})
        elif kind == "scaling":
            out["series"] = []
            for fam in keep("family"):
                pts = []
                for size in keep("size"):
                    ss = self._sample({"run": {"family": fam, "size": size, "grid": f["grid"]}, "epoch": f["epoch"],
                                       "guidance": "main"}, f"figures.{fid}", fid)
                    pts.append({"x": size, "params_file": layout.model_meta(ss.run),
                                **self._metric_sources(ss, ["fid", "is"])})
                out["series"].append({"label": self.families[fam]["label"], "points": pts})
        elif kind == "epochs":
            out["series"] = []
            for fam in keep("family"):
                pts = []
                for ep in keep("epochs"):
                    ss = self._sample({"run": {"family": fam, "size": f["size"], "grid": f["grid"]}, "epoch": ep,
                                       "guidance": f["guidance"]}, f"figures.{fid}", fid)
                    pts.append({"x": ep, **self._metric_sources(ss, ["fid", "is"])})
                out["series"].append({"label": f"{self.families[fam]['label']}-{f['size']}", "points": pts})
        elif kind == "loss_curves":
            out["file"] = layout.LOSS_CURVES
            out["series"] = []
            for size in keep("size"):
                rid = self._run({"family": "iar2", "size": size, "grid": f["grid"]}, f"figures.{fid}", fid)
                out["series"].append({"label": f"IAR2-{size}", "run": layout.run_dir(rid)})
        elif kind == "grid":
            ss = self._sample(f["sample"], f"figures.{fid}", fid)
            label = f"{self.families[self.runs[ss.run].family]['label']}-{self.runs[ss.run].size}, {ss.guidance}"
            out["images"] = [{"label": label, "file": layout.sample_grid(ss.id), "run": layout.sample_dir(ss.id)}]
            if f.get("panels"):  # Figures 9-11: one panel per figure, rows of the sheet (iar2/grid_panels.py)
                classes = self.s.sampling.grid.get("classes") or list(range(int(self.s.ar.base["model"]["num_classes"])))
                out["images"] = grid_panels(f["panels"], [int(c) for c in classes], label, out["images"][0]["file"],
                                            out["images"][0]["run"])
        else:
            raise ConfigError(f"figures.{fid}.kind: {kind!r}; allowed values: code_distance, codebook_sweep, "
                              "cfg_sweep, scaling, epochs, loss_curves, grid")
        return out

    # -- runs: one job per resolved config
    def _dedupe_runs(self):
        by_cfg: dict[str, list[str]] = {}
        for rid in self.runs:
            key = json.dumps(self.ar_config(rid, identity=True), sort_keys=True)
            by_cfg.setdefault(key, []).append(rid)
        alias = {}
        for ids in by_cfg.values():
            keepid = min(ids, key=lambda i: (len(i), i))
            for i in ids:
                alias[i] = keepid
        if all(a == i for i, a in alias.items()):
            return
        for i, a in alias.items():
            if i != a:
                self.runs[a].epochs |= self.runs[i].epochs
                self.runs[a].tables |= self.runs[i].tables
                del self.runs[i]
        for r in self.runs.values():
            if r.time_match:
                r.time_match = alias.get(r.time_match, r.time_match)
        new_samples = {}
        for ss in self.samples.values():
            rid = alias[ss.run]
            sid = layout.sample_id(rid, ss.epoch, ss.guidance)
            n = new_samples.setdefault(sid, SampleSet(sid, rid, ss.epoch, ss.guidance))
            n.tables |= ss.tables
        old_to_new = {s.id: layout.sample_id(alias[s.run], s.epoch, s.guidance) for s in self.samples.values()}
        self.samples = new_samples

        for d in dicts_in([self.tables, self.figures]):
            for k, v in d.items():
                if isinstance(v, str):
                    d[k] = _rename(v, old_to_new, alias)

    def _resolve_time_match(self):
        for r in self.runs.values():
            if r.time_match is None:
                continue
            if r.time_match not in self.runs:
                raise ConfigError(f"time_match: {r.time_match!r} (of run {r.id}) is not a run of the registry; "
                                  "allowed values: " + ", ".join(sorted(self.runs)))
            ref = self.runs[r.time_match]
            if ref.time_match:
                raise ConfigError(f"time_match: {r.id} matches {ref.id}, which is itself time-matched")
            if max(r.epochs) > max(ref.epochs) and max(r.epochs):
                ref.epochs.add(max(r.epochs))


def _rename(v: str, samples: dict, runs: dict) -> str:
    """A sample id, or a path under a run's or sample set's folder, after runs merged (old id -> kept id)."""
    if v in samples:
        return samples[v]
    for old, new in samples.items():
        d = layout.sample_dir(old)
        if old != new and (f"{d}/" in v or v == d):
            return v.replace(d, layout.sample_dir(new))
    m = re.fullmatch(re.escape(layout.run_dir("")) + r"([^/]+)(/.*)?", v)
    if m and m.group(1) in runs and runs[m.group(1)] != m.group(1):
        return f"{layout.run_dir(runs[m.group(1)])}{m.group(2) or ''}"
    return v


def _paper_columns(csv_name: str) -> list[str]:
    """Column names of a paper table (params/paper/<csv>); the registry maps our numbers onto them."""
    p = PAPER_TABLES / csv_name
    if p.is_file():
        return p.read_text().splitlines()[0].split(",")
    return list(METRIC_FIELDS) + list(RECON_FIELDS)
