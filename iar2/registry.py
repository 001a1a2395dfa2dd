"""The experiment registry: params/experiments.yaml (the paper's tables and figures as named runs) resolved at
one scale (params/<scale>.yaml) into the jobs of the DAG.

`Plan(experiments, scale)` expands every table row and figure into
  - tokenizers   id -> resolved TokenizerRunConfig per stage      (tok/<id>)
  - tokens       (tokenizer, paper grid) pairs to encode             (tokens/<id>/g<grid>)
  - runs         AR training runs, each with the epochs it must export (ar/<family>-<size>-<grid>[-<tag>])
  - samples      (run, epoch, guidance) sample sets                  (ar/<run>/e<epoch>/<guidance>)
and the index the report reads (`index()`, written as results/<scale>/registry.json). Runs with the same
resolved config are one run under the shortest id, so a run shared by several tables trains once.
Everything here is pure Python (no Snakemake), so it is tested directly and validated before any job runs.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from iar2.config import ConfigError, deep_merge, from_dict, to_dict

METRIC_FIELDS = {"fid": "fid", "gfid": "fid", "is": "isc_mean", "precision": "precision", "recall": "recall"}
RECON_FIELDS = {"rfid": "rfid", "psnr": "psnr", "ssim": "ssim"}
SIZES = ("B", "L", "XL", "XXL")
GUIDANCE_RE = re.compile(r"^(?P<grid>grid-)?(?P<mode>static|prog|pag)-(?P<a>[0-9.]+)(?:-(?P<b>[0-9.]+))?"
                         r"(?P<reject>-reject)?$")
PARADIGM_LABELS = {"alternating": "Alternating Prediction", "grouped": "Grouped Sequential Prediction",
                   "fused_independent": "Fused Independent Prediction",
                   "fused_hierarchical": "Fused Hierarchical Prediction (Ours)"}


def load_yaml(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


# ----------------------------------------------------------------------------- templates

def _fmt(value, env: dict):
    """Fill {name} placeholders; a string that is exactly "{name}" takes the value with its type."""
    if isinstance(value, str):
        m = re.fullmatch(r"\{(\w+)\}", value)
        if m and m.group(1) in env:
            return env[m.group(1)]
        try:
            return value.format(**env)
        except KeyError as e:
            raise ConfigError(f"experiments: {value!r} uses {{{e.args[0]}}}, which its row does not define") from None
    if isinstance(value, dict):
        return {_fmt(k, env): _fmt(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_fmt(v, env) for v in value]
    return value


def expand(entry: dict, restrict: dict, families: dict, where: str) -> list[tuple[dict, dict]]:
    """A row with `for: {name: values, "a,b": [[a1, b1], ...]}` -> [(env, row without for)] over the product,
    minus `skip` combinations and values the scale's `restrict` leaves out."""
    entry = dict(entry)
    loops = entry.pop("for", {}) or {}
    skips = entry.pop("skip", []) or []
    axes = []
    for names, values in loops.items():
        names = [n.strip() for n in str(names).split(",")]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.for.{','.join(names)}: expected a non-empty list")
        combos = []
        for v in values:
            vals = v if len(names) > 1 else [v]
            if len(vals) != len(names):
                raise ConfigError(f"{where}.for.{','.join(names)}: {v!r} should have {len(names)} values")
            env = dict(zip(names, vals))
            if all(n not in restrict or env[n] in restrict[n] for n in names):
                combos.append(env)
        axes.append(combos)
    out = []
    for parts in itertools.product(*axes):
        env = {}
        for p in parts:
            env.update(p)
        if any(all(env.get(k) == v for k, v in s.items()) for s in skips):
            continue
        if "family" in env:
            if env["family"] not in families:
                raise ConfigError(f"{where}: family {env['family']!r} unknown; allowed values: "
                                  + ", ".join(families))
            env["label"] = families[env["family"]]["label"]
        if "paradigm" in env:
            env["paradigm_label"] = PARADIGM_LABELS.get(env["paradigm"], env["paradigm"])
        out.append((env, _fmt(entry, env)))
    return out


def parse_guidance(gid: str) -> dict:
    """A guidance id -> {guidance: GuidanceConfig dict, reject: bool, grid: bool}."""
    m = GUIDANCE_RE.match(str(gid))
    if not m:
        raise ConfigError(f"guidance: {gid!r} is not a guidance id; allowed forms: static-<scale>, "
                          "prog-<start>-<end>, pag-<start>-<end> (+ -reject), grid-<any of those>")
    a, b = float(m["a"]), m["b"]
    if m["mode"] == "static":
        if b is not None:
            raise ConfigError(f"guidance: {gid!r}: static takes one scale (static-<scale>)")
        g = {"mode": "static", "scale": a}
    else:
        if b is None:
            raise ConfigError(f"guidance: {gid!r}: {m['mode']} takes a start and an end (<mode>-<start>-<end>)")
        g = {"mode": "progressive" if m["mode"] == "prog" else "pag", "semantic": [a, float(b)],
             "detail": [a, float(b)]}
    return {"guidance": g, "reject": bool(m["reject"]), "grid": bool(m["grid"])}


# The figure lists a scale may shorten with `restrict`, by figure kind: sweep variable -> the figure's key.
FIGURE_SWEEPS = {"cfg_sweep": {"size": "models", "static": "static"},
                 "scaling": {"family": "families", "size": "sizes"},
                 "epochs": {"family": "families", "epochs": "epochs"},
                 "loss_curves": {"size": "sizes"}}


def sweep_variables(experiments: dict) -> dict[str, list]:
    """Every variable a scale may `restrict`, with the values the registry sweeps it over (first-seen order):
    the `for:` names of table rows and figures, and the figure lists of FIGURE_SWEEPS."""
    out: dict[str, list] = {}

    def add(name, values):
        seen = out.setdefault(name, [])
        seen.extend(v for v in values if v not in seen)

    def loops(entry):
        for names, values in ((entry or {}).get("for") or {}).items():
            names = [n.strip() for n in str(names).split(",")]
            for i, n in enumerate(names):
                add(n, [v[i] if len(names) > 1 else v for v in values or []])

    for t in (experiments.get("tables") or {}).values():
        for row in t.get("rows") or []:
            loops(row)
    for f in (experiments.get("figures") or {}).values():
        loops(f)
        for name, key in FIGURE_SWEEPS.get(f.get("kind"), {}).items():
            add(name, f.get(key) or [])
    return out


# ----------------------------------------------------------------------------- the plan

@dataclass
class Run:
    id: str
    family: str
    size: str
    grid: int
    tokenizer: str
    model: dict
    time_match: str | None = None
    epochs: set = field(default_factory=set)
    tables: set = field(default_factory=set)


@dataclass
class SampleSet:
    id: str
    run: str
    epoch: int
    guidance: str
    tables: set = field(default_factory=set)

    @property
    def is_grid(self) -> bool:
        return self.guidance.startswith("grid-")


class Plan:
    def __init__(self, experiments: dict, scale: dict):
        self.x = copy.deepcopy(experiments)
        self.s = scale
        self.restrict = scale.get("restrict", {}) or {}
        self._check_scale()
        self.results = scale["results"]
        self.families = self.x["families"]
        self.tokenizers: dict[str, dict] = {}
        for name, entry in self.x["tokenizers"].items():
            for env, spec in expand({**entry, "_id": name}, {}, self.families, f"tokenizers.{name}"):
                tid = spec.pop("_id")
                self.tokenizers[tid] = spec
        self.rearranged = [f"{t}-rearranged" for t in self.x.get("rearranged", [])]
        for t in self.x.get("rearranged", []):
            if t not in self.tokenizers:
                raise ConfigError(f"rearranged: {t!r} is not a tokenizer; allowed values: " + ", ".join(self.tokenizers))
        self.runs: dict[str, Run] = {}
        self.samples: dict[str, SampleSet] = {}
        self.used_tokenizers: dict[str, set] = {}  # tokenizer -> tables
        self.tables: dict[str, dict] = {}
        self.figures: dict[str, dict] = {}
        self._spec_ids: dict[str, str] = {}
        for tid, t in self.x["tables"].items():
            self.tables[tid] = self._table(tid, t)
        for fid, f in self.x["figures"].items():
            self.figures[fid] = self._figure(fid, f)
        self._dedupe_runs()
        self._resolve_time_match()

    # -- scale checks
    def _check_scale(self):
        """The scale file's shape (keys, types, ranges: workflow/schemas/scale.schema.yaml), then what only the
        registry knows: `restrict:` names must be sweep variables and its values values of those sweeps (a
        misspelt one would silently keep a whole sweep, or drop every row)."""
        from iar2.config import close_match
        from iar2.scale_schema import check_scale

        check_scale(self.s)
        sweeps = sweep_variables(self.x)
        for name, values in self.restrict.items():
            if name not in sweeps:
                raise ConfigError(f"restrict.{name}: not a sweep variable of the registry; allowed keys: "
                                  + ", ".join(sorted(sweeps)) + close_match(name, sweeps))
            unknown = [v for v in values if v not in sweeps[name]]
            if unknown:
                raise ConfigError(f"restrict.{name}: {', '.join(map(repr, unknown))} not in the registry's sweep "
                                  f"of {name}; allowed values: " + ", ".join(map(str, sweeps[name])))

    # -- helpers
    def codebook(self, n: int) -> int:
        cb = self.s["codebooks"]
        if n not in cb:
            raise ConfigError(f"codebooks: no entry for the paper's size {n}; add `{n}: <size at this scale>`")
        return int(cb[n])

    def image_size(self, grid: int) -> int:
        g = self.s["grids"]
        if grid not in g:
            raise ConfigError(f"grids: no image size for the paper's {grid}x{grid} grid; allowed values: "
                              + ", ".join(map(str, g)))
        return int(g[grid])

    def guidance_id(self, g: str, family: str, size: str, grid: int) -> str:
        if g == "fixed":
            return self.x["fixed_cfg"]
        if g == "main":
            m = self.x["main_guidance"][family]
            return m if isinstance(m, str) else m[f"{size}-{grid}"]
        parse_guidance(g)
        return g

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
        sid = f"{rid}/e{epoch}/{gid}"
        ss = self.samples.setdefault(sid, SampleSet(sid, rid, epoch, gid))
        ss.tables.add(table)
        return ss

    def _metric_sources(self, ss: SampleSet, columns) -> dict:
        path = f"ar/{ss.id}/metrics.json"
        return {c: {"file": path, "field": METRIC_FIELDS[c], "run": f"ar/{ss.id}"} for c in columns if c in METRIC_FIELDS}

    def _recon_sources(self, tok: str, columns) -> dict:
        return {c: {"file": f"tokenizers/{tok}/recon.json", "field": f, "run": f"tok/{tok}"}
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
                    r["run"] = f"ar/{rid}"
                if "guidance" in row:
                    run = self.runs[r["run"][3:]]
                    r["guidance"] = self.guidance_id(row["guidance"], run.family, run.size, run.grid)
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
                out["series"].append({"label": tok, "file": f"analysis/code_distance/{tok}.json", "run": f"tok/{tok}"})
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
                                      "pag": {**self._metric_sources(pag, ["fid", "is"]), "guidance": pag.guidance}})
        elif kind == "scaling":
            out["series"] = []
            for fam in keep("family"):
                pts = []
                for size in keep("size"):
                    ss = self._sample({"run": {"family": fam, "size": size, "grid": f["grid"]}, "epoch": f["epoch"],
                                       "guidance": "main"}, f"figures.{fid}", fid)
                    pts.append({"x": size, "params_file": f"ar/{ss.run}/model.json",
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
            out["file"] = "analysis/loss_curves.csv"
            out["series"] = []
            for size in keep("size"):
                rid = self._run({"family": "iar2", "size": size, "grid": f["grid"]}, f"figures.{fid}", fid)
                out["series"].append({"label": f"IAR2-{size}", "run": f"ar/{rid}"})
        elif kind == "grid":
            ss = self._sample(f["sample"], f"figures.{fid}", fid)
            label = f"{self.families[self.runs[ss.run].family]['label']}-{self.runs[ss.run].size}, {ss.guidance}"
            out["images"] = [{"label": label, "file": f"ar/{ss.id}/grid.png", "run": f"ar/{ss.id}"}]
            if f.get("panels"):  # Figures 9-11: one panel per figure, rows of the sheet (iar2/grid_panels.py)
                from iar2.grid_panels import grid_panels

                grid = self.s["sampling"].get("grid") or {}
                classes = grid.get("classes") or list(range(int(self.s["ar"]["base"]["model"]["num_classes"])))
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
            key = json.dumps(self.ar_config(rid, _for_key=True), sort_keys=True)
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
            sid = f"{rid}/e{ss.epoch}/{ss.guidance}"
            n = new_samples.setdefault(sid, SampleSet(sid, rid, ss.epoch, ss.guidance))
            n.tables |= ss.tables
        old_to_new = {s.id: f"{alias[s.run]}/e{s.epoch}/{s.guidance}" for s in self.samples.values()}
        self.samples = new_samples

        def fix(obj):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if isinstance(v, str):
                        obj[k] = _rename(v, old_to_new, alias)
                    else:
                        fix(v)
            elif isinstance(obj, list):
                for v in obj:
                    fix(v)
        fix(self.tables)
        fix(self.figures)

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

    # -- resolved configs
    def tokenizer_config(self, tok: str, stage: str) -> dict:
        spec = self.tokenizers[tok]
        tb = self.s["tokenizer"]
        model = dict(spec["model"])
        for k in ("codebook_size", "semantic_size", "detail_size"):
            if k in model:
                model[k] = self.codebook(int(model[k]))
        raw = deep_merge(tb["base"], {"model": model})
        raw = deep_merge(raw, {"name": f"{tok}-{stage}" if stage != "single" else tok,
                               "data": {"root": self.s["data"]["root"],
                                        "check_report": f"{self.results}/data/check.json"},
                               "loss": {"domain_net": f"{self.results}/refnet/refnet.safetensors"},
                               "train": {"stage": stage}})
        if stage == "stage1":
            raw = deep_merge(raw, tb.get("stage1", {}))
        if stage == "stage2":
            raw = deep_merge(raw, {"train": {"init_from": f"{self.results}/tokenizers/{tok}/stage1/vq.safetensors"}})
        if raw["loss"].get("perceptual") != "domain":
            raw["loss"].pop("domain_net")
        from iar2.tokenizer.config import TokenizerRunConfig

        return to_dict(from_dict(TokenizerRunConfig, raw, "tokenizer"))  # errors: tokenizer.model: ...

    def stages(self, tok: str) -> list[str]:
        return ["stage1", "stage2"] if self.tokenizers[tok]["model"]["quantizer"] == "semantic_detail" else ["single"]

    def base_tokenizer(self, tok: str) -> str:
        return tok[: -len("-rearranged")] if tok.endswith("-rearranged") else tok

    def token_grid(self, tok: str, grid: int) -> int:
        m = self.tokenizer_config(self.base_tokenizer(tok), self.stages(self.base_tokenizer(tok))[-1])["model"]
        return self.image_size(grid) // 2 ** (len(m["ch_mult"]) - 1)

    def ar_config(self, rid: str, epoch_steps: float | None = None, _for_key: bool = False) -> dict:
        from iar2.ar.config import ARRunConfig

        r = self.runs[rid]
        base_tok = self.base_tokenizer(r.tokenizer)
        m = self.tokenizer_config(base_tok, self.stages(base_tok)[-1])["model"]
        vocab = ({"vocab_size": m["codebook_size"]} if m["quantizer"] == "single"
                 else {"semantic_size": m["semantic_size"], "detail_size": m["detail_size"]})
        ar = self.s["ar"]
        sizes = ar.get("sizes", {})
        raw = deep_merge(ar["base"], {"model": {"grid": self.token_grid(r.tokenizer, r.grid), **vocab}})
        raw = deep_merge(raw, {"model": self.families[r.family].get("model", {})})
        if r.tokenizer.endswith("-rearranged"):
            raw = deep_merge(raw, {"model": {"cluster_size": m["codebook_size"] // int(self.s["rearrange"]["clusters"])}})
        sw = self.families[r.family].get("semantic_weight")
        if sw:
            raw = deep_merge(raw, {"model": {"semantic_weight": sw.get(f"{r.size}-{r.grid}", sw.get(r.size, 1.0))}})
        raw = deep_merge(raw, sizes.get(r.size, {}))
        raw = deep_merge(raw, sizes.get(f"{r.size}-{r.grid}", {}))
        raw = deep_merge(raw, {"model": r.model})
        train = {"tokens": f"{self.results}/tokens/{r.tokenizer}/g{r.grid}",
                 "epochs": float(max(r.epochs)) if r.epochs else float(raw.get("train", {}).get("epochs", 1)),
                 "ckpt_epochs": sorted(r.epochs)}
        es = epoch_steps if epoch_steps is not None else ar.get("epoch_steps")
        if es is not None:
            train["epoch_steps"] = float(es)
        raw = deep_merge(raw, {"name": rid, "train": train})
        cfg = to_dict(from_dict(ARRunConfig, raw, "ar"))
        if _for_key:  # identity of a run: everything but its name and how long it trains
            cfg = copy.deepcopy(cfg)
            for k in ("epochs", "ckpt_epochs"):
                cfg["train"].pop(k)
            cfg.pop("name")
            cfg["identity"] = {"time_match": r.time_match, "paper_grid": r.grid}
        return cfg

    def sample_config(self, gid: str) -> dict:
        from iar2.sample_config import SampleRunConfig

        p = parse_guidance(gid)
        sb = self.s["sampling"]
        raw = deep_merge(sb["base"], {"sampling": {"guidance": p["guidance"]}})
        if p["reject"]:
            raw = deep_merge(raw, sb.get("reject", {}))
            if raw.get("reject", {}).get("classifier", "domain") == "domain":
                raw = deep_merge(raw, {"reject": {"domain_net": f"{self.results}/refnet/refnet.safetensors"}})
        if p["grid"]:
            raw = deep_merge(raw, sb.get("grid", {}))
        return to_dict(from_dict(SampleRunConfig, raw, "sampling"))

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
        for g in {s.guidance for s in self.samples.values()}:
            self.sample_config(g)

    def resources(self, rule: str, rid: str | None = None) -> dict:
        """The scale's SLURM resources of one job: `default`, then the rule's, then (ar_train) by size, size-grid."""
        table = self.s.get("resources", {}) or {}
        spec = table.get(rule, {}) or {}
        out = dict(table.get("default", {}) or {})
        if rule == "ar_train":
            out.update(spec.get("default", {}) or {})
            if rid is not None:
                r = self.runs[rid]
                out.update(spec.get(r.size, {}) or {})
                out.update(spec.get(f"{r.size}-{r.grid}", {}) or {})
        else:
            out.update(spec)
        return out

    def tables_of_run(self, rid: str) -> str:
        return ",".join(sorted(self.runs[rid].tables))

    def index(self, git_commit: str = "unknown") -> dict:
        """results/<scale>/registry.json: what the report reads (see the contract in the report module)."""
        runs = {}
        for t in self.trained_tokenizers() + [r for r in self.rearranged]:
            st = self.stages(self.base_tokenizer(t))[-1] if not t.endswith("-rearranged") else None
            runs[f"tok/{t}"] = {"kind": "tokenizer", "dir": f"tokenizers/{t}",
                                "config": f"tokenizers/{t}/config.yaml" if st else f"tokenizers/{t}/summary.json"}
        for rid in self.runs:
            runs[f"ar/{rid}"] = {"kind": "ar", "dir": f"ar/{rid}", "config": f"ar/{rid}/config.yaml",
                                 "tables": sorted(self.runs[rid].tables),
                                 "resources": self.resources("ar_train", rid)}
        for sid, ss in self.samples.items():
            runs[f"ar/{sid}"] = {"kind": "samples", "dir": f"ar/{sid}", "config": f"configs/sampling/{ss.guidance}.yaml",
                                 "tables": sorted(ss.tables)}
        proto = self.s.get("protocol", {})
        return {"scale": self.s.get("scale"), "results": self.results, "git_commit": git_commit,
                "protocol": {**proto, "image_sizes": {str(k): v for k, v in self.s["grids"].items()},
                             "extractor": self.s.get("gen_metrics", {}).get("extractor", "inception"),
                             "samples_per_set": self.samples_per_set(),
                             "recon_images": self.s.get("recon_eval", {}).get("max_images")},
                "runs": runs,
                "tables": {**self.tables, **self._settings_configs()},
                "figures": self.figures}

    def samples_per_set(self) -> int:
        b = self.s["sampling"]["base"]
        return int(b.get("per_class", 50)) * int(b.get("num_classes") or self.s["ar"]["base"]["model"].get("num_classes", 1000))

    def _settings_configs(self) -> dict:
        """Tables 11 and 12 point at the resolved configs actually used: the AR run's (written by the trainer) and,
        for Table 12, the sampling config of the run's main sample set at its last epoch."""
        out = {}
        for tid, t in self.tables.items():
            if t["kind"] != "settings":
                continue
            t = copy.deepcopy(t)
            for row in t["rows"]:
                rid = row["run"][len("ar/"):]
                row["run_config"] = f"ar/{rid}/config.yaml"
                row["config"] = row["run_config"]
                if "guidance" in row:
                    sid = self.last_sample(rid, row["guidance"])
                    row["sample"] = sid
                    row["config"] = f"configs/sampling/{row['guidance']}.yaml"
                    row["sample_config"] = f"ar/{sid}/samples.json"
            out[tid] = t
        return out

    def last_sample(self, rid: str, gid: str) -> str:
        run = self.runs[rid]
        return f"{rid}/e{max(run.epochs)}/{gid}" if run.epochs else ""


def _rename(v: str, samples: dict, runs: dict) -> str:
    if v in samples:
        return samples[v]
    for old, new in samples.items():
        if old != new and (f"ar/{old}/" in v or v == f"ar/{old}"):
            return v.replace(f"ar/{old}", f"ar/{new}")
    m = re.fullmatch(r"ar/([^/]+)(/.*)?", v)
    if m and m.group(1) in runs and runs[m.group(1)] != m.group(1):
        return f"ar/{runs[m.group(1)]}{m.group(2) or ''}"
    return v


def _paper_columns(csv_name: str) -> list[str]:
    """Column names of a paper table (params/paper/<csv>); the registry maps our numbers onto them."""
    for root in (Path(__file__).resolve().parent.parent / "params" / "paper",
                 Path(__file__).resolve().parent.parent.parent / "shared" / "paper" / "tables"):
        p = root / csv_name
        if p.is_file():
            return p.read_text().splitlines()[0].split(",")
    return list(METRIC_FIELDS) + list(RECON_FIELDS)


# ----------------------------------------------------------------------------- small outputs of the DAG

def write_index(plan: Plan, out: str | Path, repo: str | Path) -> None:
    """results/<scale>/registry.json, stamped with the commit that wrote it."""
    import subprocess

    from iar2.io import atomic_write_json

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    atomic_write_json(out, plan.index(commit))


def write_loss_curves(plan: Plan, runs: list[str], out: str | Path) -> None:
    """Figure 8's CSV: step, epoch, semantic and detail CE of each run's metrics.csv, labelled by size."""
    import pandas as pd

    from iar2.io import atomic_write_text

    frames = []
    for rid in runs:
        df = pd.read_csv(Path(plan.results) / "ar" / rid / "metrics.csv")
        r = plan.runs[rid]
        df = df[[c for c in ("step", "epoch", "semantic_ce", "detail_ce", "loss") if c in df]]
        frames.append(df.assign(run=f"ar/{rid}", label=f"{plan.families[r.family]['label']}-{r.size}"))
    atomic_write_text(out, pd.concat(frames).to_csv(index=False))


def write_summary(plan: Plan, out: str | Path) -> None:
    """results/<scale>/summary.json: headline numbers of every run, flat ("<run id>.<metric>"), for DVC."""
    from iar2.io import atomic_write_json

    res, flat = Path(plan.results), {}
    for tok in plan.trained_tokenizers():
        p = res / "tokenizers" / tok / "recon.json"
        if p.is_file():
            d = json.loads(p.read_text())
            flat.update({f"tok/{tok}.{k}": d[k] for k in ("rfid", "psnr", "ssim") if k in d})
    for s in plan.samples.values():
        p = res / "ar" / s.id / "metrics.json"
        if not s.is_grid and p.is_file():
            d = json.loads(p.read_text())
            flat.update({f"ar/{s.id}.{k}": d[k] for k in ("fid", "isc_mean", "precision", "recall") if k in d})
    atomic_write_json(out, dict(sorted(flat.items())))


def load_plan(repo: str | Path, scale_cfg: dict) -> Plan:
    """The plan of one scale: params/experiments.yaml deep-merged with the scale's `experiments:` overlay."""
    x = load_yaml(Path(repo) / "params" / "experiments.yaml")
    x = deep_merge(x, scale_cfg.get("experiments", {}) or {})
    plan = Plan(x, scale_cfg)
    plan.validate()
    return plan
