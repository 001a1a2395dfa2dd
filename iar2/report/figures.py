"""The paper's figures from our results, with the points the paper states, as PNG and SVG (matplotlib, Agg).

Each figure first becomes data (`FigureView.rows`: one dict per plotted point, which the claims checklist reads
too), then a plot. A figure without any of our results is still drawn, with the paper's points and a "no results
yet" mark, so the report always has every figure. The paper's values sit on their own y axis (right, red) where
they are stated: our protocol (dataset, extractor, sample count) differs, so only shapes are comparable.
"""
from __future__ import annotations

import csv
import io
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from iar2 import layout  # noqa: E402
from iar2.report.sources import Cell, PaperTable, Results, derive_columns, is_number  # noqa: E402

log = logging.getLogger(__name__)

FIGURES: dict[str, tuple[str, str]] = {  # name -> (kind, default title)
    "fig3": ("code_distance", "Figure 3: decoded-image change vs code distance"),
    "fig4": ("codebook_sweep", "Figure 4: rFID and gFID vs single-codebook size"),
    "fig7a": ("cfg_sweep", "Figure 7a: static CFG sweep vs PAG-CFG"),
    "fig7b": ("scaling", "Figure 7b: FID and IS vs model size"),
    "fig7c": ("epochs", "Figure 7c: FID and IS vs training epochs"),
    "fig8": ("loss_curves", "Figure 8: semantic and detail cross-entropy during training"),
    "fig9": ("grid", "Figures 9-11: IAR2 samples"),
}
SIZES = ["B", "L", "XL", "XXL"]
PAPER_COLOR = "#c0392b"

plt.rcParams.update({"svg.hashsalt": "iar2-report", "font.size": 9})  # deterministic SVG element ids


@dataclass
class FigureView:
    name: str
    kind: str
    title: str
    rows: list[dict] = field(default_factory=list)  # our points
    paper_rows: list[dict] = field(default_factory=list)  # points the paper states
    curves: dict[str, list[dict]] = field(default_factory=dict)  # fig8: label -> logged rows
    images: list[dict] = field(default_factory=list)  # grids: label, src (relative to the report), run, present
    cells: list[Cell] = field(default_factory=list)  # where our numbers come from (provenance)
    files: dict[str, str] = field(default_factory=dict)  # png / svg, relative to the report folder
    paper_note: str = ""
    status: str = "missing"  # ok | partial | missing
    in_registry: bool = False


def figure_names(results: Results) -> list[str]:
    """The fixed figures, plus every further sample-grid figure the registry lists (fig10, fig11)."""
    names = list(FIGURES)
    extra = sorted(n for n, f in results.registry.figures.items()
                   if n not in names and (f or {}).get("kind") == "grid")
    return names + extra


# ----------------------------------------------------------------------------- data

def build_figures(results: Results, paper_tables: dict[str, PaperTable | None], fig_claims: list[dict]) -> list[FigureView]:
    views = []
    for name in figure_names(results):
        reg = results.figure(name)
        kind, title = FIGURES.get(name, ("grid", f"Figure {name[3:]}: samples"))
        v = FigureView(name=name, kind=reg.get("kind") or kind, title=reg.get("title") or title, in_registry=bool(reg))
        BUILDERS[v.kind](v, reg, results)
        _paper_points(v, paper_tables, fig_claims)
        have, expected = _parts(v)
        v.status = "missing" if have == 0 else ("ok" if have == expected else "partial")
        log.info("%s (%s): %s, %d of %d parts present", name, v.kind, v.status, have, expected)
        views.append(v)
    return views


def _parts(v: FigureView) -> tuple[int, int]:
    """(present, expected) parts: curves for loss curves, else every registered source (a metric of a point, a
    series file, an image), so a sweep with rFID but no gFID yet is partial."""
    if v.kind == "loss_curves":
        return sum(1 for c in v.curves.values() if c), len(v.curves)
    return sum(1 for c in v.cells if c.ok), len(v.cells)


def _resolve(v: FigureView, results: Results, src: dict | None) -> Any:
    c = results.cell(src)
    if src:
        v.cells.append(c)
    return c.value if c.ok and is_number(c.value) else None


def _code_distance(v: FigureView, reg: dict, results: Results) -> None:
    for s in reg.get("series") or []:
        c = results.cell({"file": s.get("file"), "field": "results", "run": s.get("run")})
        v.cells.append(c)
        if not c.ok:
            v.rows.append({"series": s.get("label"), "_ok": False})
            continue
        for r in c.value or []:
            v.rows.append({"series": s.get("label"), "_ok": True, "distance": r.get("achieved_mean"),
                           "target": r.get("target"),
                           **{k: (r.get(k) or {}).get("mean") for k in
                              ("mse_vs_source", "lpips_vs_source", "mse_vs_recon", "lpips_vs_recon")}})


def _codebook_sweep(v: FigureView, reg: dict, results: Results) -> None:
    for p in reg.get("points") or []:
        row = {"x": p.get("x"), "label": p.get("label"), "actual_size": p.get("actual_size"),
               "rfid": _resolve(v, results, p.get("rfid")),
               "gfid": _resolve(v, results, p.get("gfid")),
               **results.intervals_of({"rfid": p.get("rfid"), "gfid": p.get("gfid")})}
        row["_ok"] = row["rfid"] is not None or row["gfid"] is not None
        v.rows.append(row)


def _cfg_sweep(v: FigureView, reg: dict, results: Results) -> None:
    for s in reg.get("series") or []:
        for p in s.get("static") or []:
            row = {"series": s.get("label"), "model": s.get("label"), "mode": "static", "x": p.get("x"),
                   "fid": _resolve(v, results, p.get("fid")), "is": _resolve(v, results, p.get("is")),
                   **results.intervals_of({"fid": p.get("fid"), "is": p.get("is")})}
            v.rows.append(derive_columns({**row, "_ok": row["fid"] is not None or row["is"] is not None}))
        if s.get("pag"):
            p = s["pag"]
            row = {"series": s.get("label"), "model": s.get("label"), "mode": "pag", "x": None,
                   "fid": _resolve(v, results, p.get("fid")), "is": _resolve(v, results, p.get("is")),
                   **results.intervals_of({"fid": p.get("fid"), "is": p.get("is")})}
            v.rows.append(derive_columns({**row, "_ok": row["fid"] is not None or row["is"] is not None}))


def _points(v: FigureView, reg: dict, results: Results) -> None:
    """scaling (x = size name) and epochs (x = epochs): series of points with fid / is."""
    for s in reg.get("series") or []:
        for p in s.get("points") or []:
            params = p.get("params")
            if params is None and p.get("params_file"):  # our model's size, from the trained run's model.json
                params = (results.read_json(p["params_file"]) or {}).get("params")
            row = {"series": s.get("label"), "x": p.get("x"), "params": params,
                   "fid": _resolve(v, results, p.get("fid")), "is": _resolve(v, results, p.get("is")),
                   **results.intervals_of({"fid": p.get("fid"), "is": p.get("is")})}
            if v.kind == "scaling":  # series = method, x = size
                row = derive_columns({**row, "model": f"{s.get('label')}-{p.get('x')}"})
            else:  # series = a model ("IAR2-B") or a method
                row = derive_columns({**row, "model": s.get("label")})
            v.rows.append({**row, "_ok": row["fid"] is not None or row["is"] is not None})


def _loss_curves(v: FigureView, reg: dict, results: Results) -> None:
    """Per series: the rows of the analysis CSV for its run, else the run's own metrics.csv."""
    table: list[dict] = []
    if reg.get("file") and (results.root / reg["file"]).is_file():
        with open(results.root / reg["file"], newline="") as fh:
            table = list(csv.DictReader(fh))
        v.cells.append(Cell(value=len(table), status="ok", file=reg["file"]))
    for s in reg.get("series") or []:
        label, run = s.get("label"), s.get("run")
        rows = [r for r in table if (run and r.get("run") == run) or (not run and r.get("label") == label)]
        if not rows and run:
            d = results.run_dir(run)
            p = results.root / d / layout.TRAIN_METRICS if d else None
            if p is not None and p.is_file():
                with open(p, newline="") as fh:
                    rows = list(csv.DictReader(fh))
                v.cells.append(Cell(value=len(rows), status="ok", file=f"{d}/{layout.TRAIN_METRICS}", run=run))
        pts = []
        for r in rows:
            try:
                pts.append({k: float(r[k]) for k in ("step", "semantic_ce", "detail_ce") if r.get(k) not in (None, "")}
                           | {"epoch": float(r["epoch"]) if r.get("epoch") not in (None, "") else None})
            except ValueError:
                continue
        pts = [p for p in pts if "semantic_ce" in p and "detail_ce" in p]
        v.curves[label] = pts
        summary = derive_columns({"series": label, "model": label, "run": run, "steps": len(pts)})
        if pts:  # the last logged value, averaged over the last few logs (single logs are noisy)
            tail = pts[-3:]
            summary.update(final_semantic_ce=sum(p["semantic_ce"] for p in tail) / len(tail),
                           final_detail_ce=sum(p["detail_ce"] for p in tail) / len(tail))
        v.rows.append({**summary, "_ok": bool(pts), "_summary": True})


def _grid(v: FigureView, reg: dict, results: Results) -> None:
    images = list(reg.get("images") or [])
    if not images and reg.get("file"):
        images = [{"label": reg.get("title", v.name), "file": reg["file"], "run": reg.get("run")}]
    for i, im in enumerate(images):
        p = results.path(im.get("file"))
        rows = im.get("rows")
        # a panel with no rows (a scale with fewer grid classes than App. E's twelve) has nothing to show
        present = bool(p and p.is_file()) and not (rows and rows[1] <= rows[0])
        v.images.append({"label": im.get("label") or im.get("file"), "file": im.get("file"), "run": im.get("run"),
                         "present": present, "src": f"figures/{v.name}-{i}.png" if present else None,
                         "rows": im.get("rows"), "of": im.get("of")})
        v.cells.append(Cell(status="ok" if present else "missing", file=im.get("file"), run=im.get("run")))


BUILDERS = {"code_distance": _code_distance, "codebook_sweep": _codebook_sweep, "cfg_sweep": _cfg_sweep,
            "scaling": _points, "epochs": _points, "loss_curves": _loss_curves, "grid": _grid}


def _claim_value(fig_claims: list[dict], figure: str, startswith: str) -> str | None:
    for c in fig_claims:
        if c.get("figure") == figure and c.get("claim", "").startswith(startswith):
            return c.get("value")
    return None


def _float(text: str | None) -> float | None:
    try:
        return float(str(text).replace("%", ""))
    except (TypeError, ValueError):
        return None


def _paper_points(v: FigureView, tables: dict[str, PaperTable | None], claims: list[dict]) -> None:
    """The paper's own numbers for this figure: stated in prose (fig_claims.csv) or in Table 3."""
    if v.name == "fig3":
        t = _claim_value(claims, "Fig 3", "Code-distance threshold")
        v.paper_note = (f"Paper: MSE and LPIPS grow with code distance and are negligible below a code distance of "
                        f"{t} (in the paper's VQGAN code units; our axis is the distance between our codebook's "
                        f"vectors, so the threshold does not transfer)." if t else "")
    elif v.name == "fig4":
        at256 = _float(_claim_value(claims, "Fig 4", "gFID with a 256-entry"))
        best = _float(_claim_value(claims, "Fig 4", "Optimal (lowest) gFID"))
        best_x = _float(_claim_value(claims, "Fig 4", "Codebook size at which gFID is optimal"))
        if at256 is not None:
            v.paper_rows.append({"x": 256, "gfid": at256, "_ok": True})
        if best is not None and best_x is not None:
            v.paper_rows.append({"x": int(best_x), "gfid": best, "_ok": True})
        v.paper_note = "Paper (Sec. 4.1): gFID 6.4 with 256 entries, best 6.1 at 1024; rFID falls monotonically."
    elif v.name == "fig7a":
        band = _claim_value(claims, "Fig 7(a)", "Static-CFG performance peaks")
        if band and "-" in band:
            lo, hi = (_float(x) for x in band.split("-"))
            v.paper_rows.append({"band": (lo, hi)})
        v.paper_note = f"Paper: static CFG is best near {band}; PAG-CFG (horizontal lines) beats the best static CFG."
    elif v.name == "fig7b":
        t3 = tables.get("table3")
        for r in (t3.rows if t3 else []):
            if r.get("tokens") == "24x24" and r.get("epochs") == 300:
                v.paper_rows.append(derive_columns({"series": str(r["model"]).rsplit("-", 1)[0],
                                                    "x": str(r["model"]).rsplit("-", 1)[1],
                                                    "model": r["model"], "fid": r.get("fid"), "is": r.get("is"),
                                                    "_ok": True}))
        xxl = _claim_value(claims, "Fig 7(b)", "IAR2 FID at the XXL")
        v.paper_note = f"Paper points: Table 3 at 24x24 tokens, 300 epochs (the prose's IAR2-XXL FID {xxl})."
    elif v.name == "fig7c":
        d_fid = _claim_value(claims, "Fig 7(c)", "FID reduction")
        d_is = _claim_value(claims, "Fig 7(c)", "IS increase")
        v.paper_note = (f"Paper: at 300 epochs (static CFG 2.25) IAR2 leads LlamaGen by {d_fid} FID and +{d_is} IS; "
                        "the model size is not stated, so no Table 3 point is drawn.")
    elif v.name == "fig8":
        v.paper_note = "Paper (App. D): larger models reach lower semantic and detail CE; XXL converges fastest."
    elif v.kind == "grid":
        s0 = _claim_value(claims, "Fig 9-11", "Samples generated by IAR2-XL with progressive CFG start")
        s1 = _claim_value(claims, "Fig 9-11", "Samples generated by IAR2-XL with progressive CFG end")
        px = _claim_value(claims, "Fig 9-11", "Image size")
        v.paper_note = f"Paper: IAR2-XL samples, progressive CFG {s0} -> {s1}, {px} px, 12 ImageNet classes."


# ----------------------------------------------------------------------------- plots

def render_figures(views: list[FigureView], results: Results, out_dir: Path) -> None:
    """Write every figure's PNG + SVG (and copy sample grids) under out_dir/figures/."""
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for v in views:
        if v.kind == "grid":
            for im in v.images:
                if im["present"]:
                    _copy_grid(results.path(im["file"]), out_dir / im["src"], im.get("rows"), im.get("of"))
            continue
        fig = PLOTTERS[v.kind](v)
        fig.suptitle(v.title, fontsize=10)
        if v.status == "missing":
            fig.text(0.5, 0.5, "our results: missing", ha="center", va="center", fontsize=16, color="#7f8c8d",
                     alpha=0.8, rotation=12)
        fig.tight_layout()
        for fmt_ in ("png", "svg"):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt_, dpi=100, metadata={"Date": None} if fmt_ == "svg" else None)
            (fig_dir / f"{v.name}.{fmt_}").write_bytes(buf.getvalue())
            v.files[fmt_] = f"figures/{v.name}.{fmt_}"
        plt.close(fig)


def _copy_grid(src: Path, dst: Path, rows: list | None, of: int | None) -> None:
    """Copy a sample sheet, or only rows [first, stop) of its `of` equal class rows (one figure of App. E)."""
    if not rows or not of:
        shutil.copyfile(src, dst)
        return
    from PIL import Image

    with Image.open(src) as im:
        h = im.height / of
        im.crop((0, round(rows[0] * h), im.width, round(rows[1] * h))).save(dst, format="PNG")


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, **kw)


def _two_panels():
    return plt.subplots(1, 2, figsize=(10, 3.8))


def _paper_axis(ax, label: str):
    twin = ax.twinx()
    twin.set_ylabel(label, color=PAPER_COLOR)
    twin.tick_params(axis="y", colors=PAPER_COLOR)
    return twin


def _plot_code_distance(v: FigureView):
    fig, axes = _two_panels()
    series = list(dict.fromkeys(r["series"] for r in v.rows if r.get("_ok")))
    for ax, metric in zip(axes, ("mse", "lpips")):
        for i, s in enumerate(series):
            pts = sorted((r for r in v.rows if r.get("_ok") and r["series"] == s), key=lambda r: r["distance"] or 0)
            x = [r["distance"] for r in pts]
            ax.plot(x, [r[f"{metric}_vs_source"] for r in pts], "o-", color=f"C{i}", label=f"{s}: vs source")
            ax.plot(x, [r[f"{metric}_vs_recon"] for r in pts], "s--", color=f"C{i}", alpha=0.7,
                    label=f"{s}: vs reconstruction")
        ax.set_xlabel("code distance (achieved, mean)")
        ax.set_ylabel("MSE ([0,1] pixels)" if metric == "mse" else "LPIPS-style distance")
        if series:
            _legend(ax)
    return fig


def _plot_codebook_sweep(v: FigureView):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)  # one x range for ours and the paper's points
    for ax, metric in zip(axes, ("rfid", "gfid")):
        pts = sorted((r for r in v.rows if r.get(metric) is not None), key=lambda r: r["x"])
        if pts:
            ax.plot([r["x"] for r in pts], [r[metric] for r in pts], "o-", label=f"ours ({metric})")
            for r in pts:  # a scale may shrink the codebooks: show the size actually trained
                if r.get("actual_size") not in (None, r["x"]):
                    ax.annotate(f"{r['actual_size']}", (r["x"], r[metric]), textcoords="offset points",
                                xytext=(-4, -12), fontsize=7, color="C0")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("single-codebook size (paper's entries; small labels: our entries)")
        ax.set_ylabel(f"{metric} (ours)")
        paper = [r for r in v.paper_rows if r.get(metric) is not None]
        if paper:
            twin = _paper_axis(ax, f"paper {metric}")
            twin.plot([r["x"] for r in paper], [r[metric] for r in paper], "*", color=PAPER_COLOR, markersize=12,
                      label="paper (Sec. 4.1)")
            for r in paper:
                twin.annotate(f"{r[metric]:g}", (r["x"], r[metric]), textcoords="offset points", xytext=(6, 4),
                              color=PAPER_COLOR, fontsize=8)
            twin.margins(y=0.3)  # two or three stated points: keep them off the frame
            _legend(twin, loc="upper right")
        if pts:
            _legend(ax, loc="upper left")
    return fig


def _plot_cfg_sweep(v: FigureView):
    fig, axes = _two_panels()
    series = list(dict.fromkeys(r["series"] for r in v.rows))
    for ax, metric in zip(axes, ("fid", "is")):
        for i, s in enumerate(series):
            pts = sorted((r for r in v.rows if r["series"] == s and r["mode"] == "static" and r.get(metric) is not None),
                         key=lambda r: r["x"])
            if pts:
                ax.plot([r["x"] for r in pts], [r[metric] for r in pts], "o-", color=f"C{i}", label=f"{s} static")
            pag = [r for r in v.rows if r["series"] == s and r["mode"] == "pag" and r.get(metric) is not None]
            if pag:
                ax.axhline(pag[0][metric], color=f"C{i}", linestyle="--", label=f"{s} PAG-CFG")
        for r in v.paper_rows:
            if "band" in r:
                ax.axvspan(*r["band"], color=PAPER_COLOR, alpha=0.12, label="paper: best static range")
        ax.set_xlabel("static CFG scale")
        ax.set_ylabel(metric.upper())
        _legend(ax)
    return fig


def _plot_scaling(v: FigureView):
    fig, axes = _two_panels()
    xpos = {s: i for i, s in enumerate(SIZES)}
    methods = list(dict.fromkeys([r["series"] for r in v.rows] + [r["series"] for r in v.paper_rows]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, metric in zip(axes, ("fid", "is")):
        for s in dict.fromkeys(r["series"] for r in v.rows):
            pts = sorted((r for r in v.rows if r["series"] == s and r.get(metric) is not None and r["x"] in xpos),
                         key=lambda r: xpos[r["x"]])
            if pts:
                ax.plot([xpos[r["x"]] for r in pts], [r[metric] for r in pts], "o-", color=colors[s], label=f"{s} (ours)")
                for r in pts:
                    if is_number(r.get("params")) and metric == "fid":
                        ax.annotate(f"{r['params'] / 1e6:.2g}M", (xpos[r["x"]], r[metric]), textcoords="offset points",
                                    xytext=(4, 4), fontsize=7, color=colors[s])
        paper = [r for r in v.paper_rows if r.get(metric) is not None]
        if paper:  # same colour per method as ours; dotted with hollow markers, on the paper's own axis
            twin = _paper_axis(ax, f"paper {metric.upper()} (Table 3, 24x24, 300 ep; dotted)")
            for s in dict.fromkeys(r["series"] for r in paper):
                pts = sorted((r for r in paper if r["series"] == s), key=lambda r: xpos[r["x"]])
                twin.plot([xpos[r["x"]] for r in pts], [r[metric] for r in pts], marker="^", linestyle=":",
                          markerfacecolor="none", color=colors[s], label=f"{s} (paper)")
            _legend(twin, loc="upper right")
        ax.set_xticks(range(len(SIZES)), SIZES)
        ax.set_xlabel("model size")
        ax.set_ylabel(f"{metric.upper()} (ours)")
        if v.rows:
            _legend(ax, loc="upper left")
    return fig


def _plot_epochs(v: FigureView):
    fig, axes = _two_panels()
    series = list(dict.fromkeys(r["series"] for r in v.rows))
    for ax, metric in zip(axes, ("fid", "is")):
        for i, s in enumerate(series):
            pts = sorted((r for r in v.rows if r["series"] == s and r.get(metric) is not None), key=lambda r: r["x"])
            if pts:
                ax.plot([r["x"] for r in pts], [r[metric] for r in pts], "o-", color=f"C{i}", label=s)
        ax.set_xlabel("training epochs (paper's epoch labels)")
        ax.set_ylabel(metric.upper())
        if any(r.get(metric) is not None for r in v.rows):
            _legend(ax)
    return fig


def _plot_loss_curves(v: FigureView):
    fig, axes = _two_panels()
    for ax, metric in zip(axes, ("semantic_ce", "detail_ce")):
        for i, (label, pts) in enumerate(v.curves.items()):
            if pts:
                ax.plot([p["step"] for p in pts], [p[metric] for p in pts], color=f"C{i}", label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " ").replace("ce", "cross-entropy"))
        if any(v.curves.values()):
            _legend(ax)
    return fig


PLOTTERS = {"code_distance": _plot_code_distance, "codebook_sweep": _plot_codebook_sweep,
            "cfg_sweep": _plot_cfg_sweep, "scaling": _plot_scaling, "epochs": _plot_epochs,
            "loss_curves": _plot_loss_curves}


def figure_label(name: str) -> str:
    """fig7a -> "Figure 7a"."""
    m = re.fullmatch(r"fig(\d+)([a-z]?)", name)
    return f"Figure {m[1]}{m[2]}" if m else name
