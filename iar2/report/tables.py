"""Tables 1-13 as data: every paper row beside our number (or a reason it is missing), plus the protocol and the
runs behind our numbers. Rendering (HTML, Markdown) lives in render.py.

Results tables: each paper row is matched to the registry's rows by the table's key columns; a registry row that
matches no paper row is shown after them as "ours only". Settings tables (11, 12): the paper's settings beside
the values of the resolved config files the runs actually used.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iar2 import layout
from iar2.report.sources import (METRIC_COLUMNS, REPRODUCED_METHOD, SETTINGS_TABLES, TABLES, Cell, PaperTable,
                                 Provenance, Results, canon, fmt, is_number, key_of, load_paper_table)

log = logging.getLogger(__name__)

# Row origins
PAPER_AND_OURS = "paper+ours"
OTHER_METHOD = "other method"  # Table 2 rows of methods this project does not reproduce
NOT_IN_REGISTRY = "not in registry"  # a paper row the registry has no run for at this scale
OURS_ONLY = "ours only"
OUR_SETUP = "our setup"  # settings tables: what the scale actually trained / sampled


@dataclass
class CellView:
    paper: Any = None  # typed paper value
    paper_text: str = ""  # as printed
    ours: Cell | None = None
    ours_text: str = ""
    diff: float | None = None  # ours - paper
    mark: str = ""  # settings: "same" | "differs" | "" ; results: ""
    note: str = ""


@dataclass
class RowView:
    key: dict
    origin: str
    info: dict = field(default_factory=dict)  # descriptive paper columns, as printed
    cells: dict[str, CellView] = field(default_factory=dict)
    run: str | None = None  # settings tables: the run whose config is shown
    config: str | None = None


@dataclass
class TableView:
    name: str
    number: int
    title: str
    kind: str  # results | settings
    paper_csv: str
    key_cols: list[str]
    info_cols: list[str]
    value_cols: list[str]
    rows: list[RowView]
    protocol: dict
    runs: list[str]
    in_registry: bool
    provenance: list[dict] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Our cells: present, missing (registered, not produced yet), and not run at this scale (a paper row of a
        reproduced method the scale's registry leaves out). Other methods' rows are not counted."""
        ok = missing = not_at_scale = 0
        for r in self.rows:
            if r.origin == OTHER_METHOD:
                continue
            if r.origin == NOT_IN_REGISTRY:
                not_at_scale += len(r.cells)
                continue
            for c in r.cells.values():
                if c.ours is not None and c.ours.ok:
                    ok += 1
                else:
                    missing += 1
        return {"ours": ok, "missing": missing, "not_at_scale": not_at_scale, "rows": len(self.rows)}


def build_tables(results: Results, prov: Provenance, paper_dir: Path) -> list[TableView]:
    return [build_table(name, results, prov, paper_dir) for name in TABLES]


def build_table(name: str, results: Results, prov: Provenance, paper_dir: Path) -> TableView:
    reg = results.table(name)
    default_csv, default_title = TABLES[name]
    csv_name = reg.get("paper_csv") or default_csv
    paper = load_paper_table(paper_dir / csv_name, name)
    kind = reg.get("kind") or ("settings" if name in SETTINGS_TABLES else "results")
    columns = paper.columns if paper else []
    key_cols = list(reg.get("key") or _default_key(name, columns))
    if kind == "settings":
        value_cols = [c for c in columns if c not in key_cols]
        info_cols = [OUR_SETUP]
    else:
        reg_cols = {c for r in reg.get("rows") or [] for c in (r.get("values") or {})}
        value_cols = [c for c in columns if c not in key_cols and (c in METRIC_COLUMNS or c in reg_cols)]
        info_cols = [c for c in columns if c not in key_cols and c not in value_cols]
    view = TableView(name=name, number=int(name[5:]), title=reg.get("title") or default_title, kind=kind,
                     paper_csv=csv_name, key_cols=key_cols, info_cols=info_cols, value_cols=value_cols, rows=[],
                     protocol={}, runs=[], in_registry=bool(reg))
    if kind == "settings":
        _fill_settings(view, paper, reg, results)
    else:
        _fill_results(view, paper, reg, results)
    view.runs = sorted({r for r in _runs_of(view) if r})
    if kind == "settings":  # the config shown is the row's own (Table 12: the sampling config of an AR run)
        view.provenance = [prov.run(run, cfg) for run, cfg in sorted({(r.run, r.config) for r in view.rows if r.run})]
    else:
        view.provenance = [prov.run(r) for r in view.runs]
    view.protocol = table_protocol(view, results)
    c = view.counts
    log.info("%s: %d rows, %d of our numbers present, %d missing, %d not run at this scale", name, c["rows"],
             c["ours"], c["missing"], c["not_at_scale"])
    return view


def _default_key(name: str, columns: list[str]) -> list[str]:
    """Key columns when the registry has no entry: the leading non-metric columns."""
    return [c for c in columns if c not in METRIC_COLUMNS and c not in ("params", "source_ref", "scheme", "type")][:3]


def _runs_of(view: TableView):
    for r in view.rows:
        if r.run:
            yield r.run
        for c in r.cells.values():
            if c.ours is not None and c.ours.run:
                yield c.ours.run


# ----------------------------------------------------------------------------- results tables

def _fill_results(view: TableView, paper: PaperTable | None, reg: dict, results: Results) -> None:
    reg_rows = list(reg.get("rows") or [])
    by_key: dict[tuple, dict] = {}
    for r in reg_rows:
        by_key.setdefault(key_of(r.get("key") or {}, view.key_cols), r)
    used: set[tuple] = set()
    for prow, ptext in zip(paper.rows if paper else [], paper.text if paper else []):
        k = key_of(prow, view.key_cols)
        rrow = by_key.get(k)
        if rrow is not None:
            origin = PAPER_AND_OURS
            used.add(k)
        elif view.name == "table2" and not REPRODUCED_METHOD.match(str(prow.get("model", ""))):
            origin = OTHER_METHOD
        else:
            origin = NOT_IN_REGISTRY
        row = RowView(key={c: ptext.get(c, "") for c in view.key_cols}, origin=origin,
                      info={c: ptext.get(c, "") for c in view.info_cols})
        for col in view.value_cols:
            cv = CellView(paper=prow.get(col), paper_text=ptext.get(col, ""))
            if origin != OTHER_METHOD:
                src = ((rrow or {}).get("values") or {}).get(col)
                cv.ours = results.cell(src) if src else Cell(status="missing")
                if not src:
                    cv.note = "no run for this cell in the registry" if rrow else "not in this scale's registry"
                _finish_number(cv, col)
            row.cells[col] = cv
        view.rows.append(row)
    for k, rrow in by_key.items():  # rows of ours the paper does not print
        if k in used:
            continue
        row = RowView(key={c: str((rrow.get("key") or {}).get(c, "")) for c in view.key_cols}, origin=OURS_ONLY)
        for col in view.value_cols:
            src = (rrow.get("values") or {}).get(col)
            cv = CellView(ours=results.cell(src) if src else Cell(status="missing"))
            _finish_number(cv, col)
            row.cells[col] = cv
        view.rows.append(row)


def _finish_number(cv: CellView, col: str) -> None:
    c = cv.ours
    if c is None:
        return
    if c.ok:
        cv.ours_text = fmt(c.value, col) + (f" ({c.seeds} seeds)" if c.seeds > 1 else "")  # their mean
        if is_number(c.value) and is_number(cv.paper):
            cv.diff = float(c.value) - float(cv.paper)
    elif c.status == "no-field":
        cv.note = f"{c.file} has no field {c.field}"
    elif c.file and not cv.note:
        cv.note = f"not run yet ({c.file})"


# ----------------------------------------------------------------------------- settings tables

def _fill_settings(view: TableView, paper: PaperTable | None, reg: dict, results: Results) -> None:
    by_key = {key_of(r.get("key") or {}, view.key_cols): r for r in reg.get("rows") or []}
    used = set()
    for prow, ptext in zip(paper.rows if paper else [], paper.text if paper else []):
        k = key_of(prow, view.key_cols)
        rrow = by_key.get(k)
        used.add(k)
        view.rows.append(_settings_row(view, ptext, prow, rrow, results))
    for k, rrow in by_key.items():
        if k not in used:
            view.rows.append(_settings_row(view, {c: str((rrow.get("key") or {}).get(c, "")) for c in view.key_cols},
                                           {}, rrow, results, origin=OURS_ONLY))


def _settings_row(view: TableView, ptext: dict, prow: dict, rrow: dict | None, results: Results,
                  origin: str | None = None) -> RowView:
    row = RowView(key={c: ptext.get(c, "") for c in view.key_cols},
                  origin=origin or (PAPER_AND_OURS if rrow else NOT_IN_REGISTRY))
    cfg = None
    if rrow:
        row.run = rrow.get("run")
        row.config, cfg = results.config_of(row.run, rrow.get("config"))
        row.info[OUR_SETUP] = our_setup(cfg, view.name)
    extract = TABLE11_SETTINGS if view.name == "table11" else TABLE12_SETTINGS
    for col in view.value_cols:
        cv = CellView(paper=prow.get(col), paper_text=ptext.get(col, ""))
        if rrow is None:
            cv.note = "not in this scale's registry"
        elif cfg is None:
            cv.ours = Cell(status="missing", file=row.config, run=row.run)
            cv.note = f"config not written yet ({row.config})" if row.config else "no config in the registry"
        else:
            getter = extract.get(col)
            value, text = getter(cfg, results, row.run) if getter else (None, "")
            cv.ours = Cell(value=value, status="ok" if text else "no-field", file=row.config,
                           field=col, run=row.run)
            cv.ours_text = text
            if not text:
                cv.note = "not recorded in the run's config"
            else:
                cv.mark = "same" if same_setting(cv.paper, value) else "differs"
        row.cells[col] = cv
    return row


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)


def _pair(v: Any) -> tuple[Any, str]:
    """A (semantic, detail) pair shown as one value when both agree."""
    if isinstance(v, (list, tuple)):
        if len(set(map(str, v))) == 1:
            return v[0], _num(v[0])
        return list(v), " / ".join(_num(x) for x in v)
    return v, _num(v)


def _plain(path: str):
    def get(cfg, results, run):
        v = _get(cfg, path)
        return v, _num(v)
    return get


def _params(cfg, results: Results, run):
    d = results.run_dir(run)
    meta = results.read_json(f"{d}/{layout.MODEL_META}") if d else None
    n = (meta or {}).get("params")
    if not is_number(n):
        return None, ""
    return n, f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _lr(cfg, results, run):
    t = cfg.get("train") or {}
    if t.get("lr_schedule") == "cosine":
        return (t.get("lr"), t.get("lr_end")), f"{_num(t.get('lr'))}->{_num(t.get('lr_end'))}"
    return t.get("lr"), _num(t.get("lr"))


def _epochs(cfg, results, run):
    t = cfg.get("train") or {}
    text = _num(t.get("epochs"))
    d = results.run_dir(run)
    meta = results.read_json(f"{d}/{layout.MODEL_META}") if d else None
    if t.get("steps"):
        done = f" = {meta['epoch']:g} epochs" if meta and is_number(meta.get("epoch")) else ""
        text = f"{text} nominal; {t['steps']} steps{done}" if text else f"{t['steps']} steps{done}"
    return t.get("epochs"), text


def _gpus(cfg, results, run):
    # The scale's SLURM resources for the run (registry.json "runs" -> "resources"); CPU scales have none.
    entry = results.run(run)
    res = (entry.resources if entry else None) or {}
    n = res.get("gpu")
    if not is_number(n) or not n:
        return None, "0 (CPU)"
    return n, f"{n:g}" + (f" ({res['nodes']:g} nodes)" if is_number(res.get("nodes")) and res["nodes"] > 1 else "")


def _optimizer(cfg, results, run):
    # The AR trainer always builds AdamW (iar2/ar/train.py); the betas are in the config.
    betas = _get(cfg, "train.betas")
    return "AdamW", "AdamW" + (f" (betas {', '.join(_num(b) for b in betas)})" if betas else "")


def _cfg_range(end: int):
    def get(cfg, results, run):
        g = _get(cfg, "sampling.guidance") or {}
        mode = g.get("mode")
        if mode == "none":
            return None, "no guidance"
        if mode == "static":
            return g.get("scale"), f"{_num(g.get('scale'))} (static)"
        sem, det = g.get("semantic") or [None, None], g.get("detail") or [None, None]
        text = _num(sem[end])
        if det[end] != sem[end]:
            text += f" (detail {_num(det[end])})"
        return sem[end], f"{text} ({mode})"
    return get


def _pair_of(path: str):
    def get(cfg, results, run):
        return _pair(_get(cfg, path))
    return get


TABLE11_SETTINGS = {
    "params": _params, "optimizer": _optimizer, "weight_decay": _plain("train.weight_decay"),
    "batch_size": _plain("train.batch_size"), "lr": _lr, "lr_schedule": _plain("train.lr_schedule"),
    "epochs": _epochs, "fsdp": _plain("train.fsdp"), "s": _plain("model.semantic_weight"), "gpus": _gpus,
}
TABLE12_SETTINGS = {
    "params": _params, "seed": _plain("sampling.seed"), "top_k": _pair_of("sampling.top_k"), "top_p": _pair_of("sampling.top_p"),
    "temperature": _pair_of("sampling.temperature"), "cfg_start": _cfg_range(0), "cfg_end": _cfg_range(1),
}
# Extra columns shown for our runs only: what model and schedule the scale really trained / sampled.
OUR_MODEL_FIELDS = ("model.size", "model.dim", "model.n_layer", "model.n_head", "model.head_layers",
                    "model.paradigm", "model.local_context", "train.steps")


def our_setup(cfg: dict | None, kind: str) -> str:
    if not cfg:
        return ""
    if kind == "table12":
        g = _get(cfg, "sampling.guidance") or {}
        return f"guidance {g.get('mode')}; {cfg.get('per_class')} per class; reject x{_get(cfg, 'reject.factor') or 1}"
    m = {f: _num(_get(cfg, f)) for f in OUR_MODEL_FIELDS if _get(cfg, f) is not None}
    arch = " ".join(f"{k.split('.')[-1]} {m[k]}" for k in ("model.dim", "model.n_layer", "model.n_head",
                                                              "model.head_layers") if k in m)
    rest = [m.get("model.paradigm"), m.get("model.local_context") and f"context {m['model.local_context']}",
            m.get("train.steps") and f"{m['train.steps']} steps"]
    return "; ".join(x for x in [m.get("model.size") and f"size {m['model.size']}", arch, *rest] if x)


def same_setting(paper: Any, ours: Any) -> bool:
    """Do a paper setting and ours agree? Numbers numerically, "a->b" ranges element-wise, text case-blind."""
    if isinstance(paper, str) and "->" in paper:
        parts = [canon(p) for p in paper.split("->")]
        if isinstance(ours, (list, tuple)):
            return parts == [canon(o) for o in ours]
        return False
    if isinstance(ours, (list, tuple)):
        return False
    if is_number(paper) and is_number(ours):
        return abs(float(paper) - float(ours)) <= 1e-9 * max(1.0, abs(float(paper)))
    if isinstance(paper, str) and re.fullmatch(r"[\d.]+[MB]", paper) and is_number(ours):
        scale = 1e6 if paper.endswith("M") else 1e9
        return abs(float(paper[:-1]) * scale - float(ours)) / (float(paper[:-1]) * scale) < 0.05
    return canon(paper).lower() == canon(ours).lower()


# ----------------------------------------------------------------------------- protocol

def table_protocol(view: TableView, results: Results) -> dict:
    """What stands behind our numbers in this table: scale, dataset, sample counts, extractor, image size."""
    p = results.protocol
    out: dict[str, Any] = {"scale": results.scale, "dataset": p.get("dataset", "unknown")}
    files = sorted({c.ours.file for r in view.rows for c in r.cells.values()
                    if c.ours is not None and c.ours.ok and c.ours.file and c.ours.file.endswith(".json")})
    found: dict[str, set] = {"extractor": set(), "num_generated": set(), "num_reference": set(),
                             "num_images": set(), "image_size": set()}
    for f in files:
        d = results.read_json(f) or {}
        for k in found:
            if d.get(k) is not None:
                v = d[k]
                if k == "extractor" and d.get("extractor_name"):
                    v = f"{v} ({d['extractor_name']})"
                found[k].add(str(v))
    out["extractor"] = ", ".join(sorted(found["extractor"])) or p.get("extractor", "unknown")
    if view.kind == "settings":
        out["source"] = "resolved config files of the runs"
        out.pop("extractor")
        return out
    if found["num_generated"] or "samples_per_set" in p:
        out["generated per set"] = ", ".join(sorted(found["num_generated"])) or str(p.get("samples_per_set"))
    if found["num_reference"]:
        out["reference images"] = ", ".join(sorted(found["num_reference"]))
    if p.get("reference"):
        out["reference"] = p["reference"]
    if view.name in ("table1", "table13") and (found["num_images"] or p.get("recon_images")):
        out["recon images"] = ", ".join(sorted(found["num_images"])) or str(p.get("recon_images"))
    if found["image_size"]:
        out["image size (px)"] = ", ".join(sorted(found["image_size"], key=float))
    elif p.get("image_sizes"):
        out["image size (px)"] = ", ".join(f"{k}x{k} grid: {v}" for k, v in p["image_sizes"].items())
    return out
