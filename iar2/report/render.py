"""Write the report: index.html (self-contained: CSS and a small self-check script inline, figures as files under
figures/), report.md (Markdown for a code host), claims.md, provenance.json and summary.json."""
from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any

from iar2.report.claims import STATUSES, ClaimResult, tally, tally_text
from iar2.report.figures import FigureView, figure_label
from iar2.report.sources import Provenance, Results
from iar2.report.tables import NOT_IN_REGISTRY, OTHER_METHOD, OURS_ONLY, CellView, RowView, TableView

RERUN = {  # report section -> Snakemake target that rebuilds it
    **{f"table{i}": f"table{i}" for i in range(1, 14)},
    "fig3": "fig3", "fig4": "fig4", "fig7a": "fig7", "fig7b": "fig7", "fig7c": "fig7", "fig8": "fig8",
}
GRID_TARGET = "samples"

# Records broken images and script errors into #selfcheck, so a headless browser's --dump-dom can be checked.
SELFCHECK_JS = """(function () {
  var errors = [], failed = [];
  window.addEventListener('error', function (e) {
    if (e.target && e.target !== window && e.target.getAttribute) { failed.push(e.target.getAttribute('src')); }
    else { errors.push(String(e.message || 'error')); }
  }, true);
  window.addEventListener('load', function () {
    var broken = [], imgs = document.images;
    for (var i = 0; i < imgs.length; i++) {
      if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken.push(imgs[i].getAttribute('src')); }
    }
    var el = document.getElementById('selfcheck');
    el.setAttribute('data-images', String(imgs.length));
    el.setAttribute('data-broken', JSON.stringify(broken.concat(failed.filter(function (s) { return broken.indexOf(s) < 0; }))));
    el.setAttribute('data-errors', JSON.stringify(errors));
    el.setAttribute('data-status', 'done');
  });
})();"""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1400px;padding:0 1.2em 3em;color:#222;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:.6em;white-space:nowrap} .meta{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .45em;text-align:right;vertical-align:top}
th{background:#f4f6f8} td.k,th.k{text-align:left;white-space:nowrap} td.t{text-align:left}
td.paper{background:#fbfbfb} td.ours{font-weight:600} td.d{color:#666}
.missing{color:#8a8a8a;font-style:italic;font-weight:400} tr.other td{color:#777;background:#fafafa}
tr.notreg td{color:#888} .same{color:#1e7d32} .differs{color:#b35900}
.badge{display:inline-block;padding:.05em .5em;border-radius:.7em;font-size:.85em;font-weight:600;white-space:nowrap}
.b-reproduced{background:#d8f0dc;color:#14532d}.b-contradicted{background:#fbdada;color:#7f1d1d}
.b-inconclusive{background:#fdf3d0;color:#713f12}.b-not-reproduced{background:#fbdada;color:#7f1d1d}
.b-missing{background:#eee;color:#555}.b-n-a{background:#e8eefc;color:#1e3a8a}
.protocol{background:#f6f8fa;border-left:3px solid #8aa;padding:.4em .7em;font-size:.85em;margin:.4em 0}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#444}
details{font-size:.82em;margin:.3em 0} code{font-size:.95em;background:#f3f3f3;padding:0 .2em}
.tally span{margin-right:1em}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _status_class(s: str) -> str:
    return "b-" + s.replace(" ", "-").replace("/", "-")


def _badge(s: str) -> str:
    return f'<span class="badge {_status_class(s)}">{_e(s)}</span>'


def row_status(row: RowView) -> str:
    if row.origin == OTHER_METHOD:
        return "not reproduced (other method)"
    if row.origin == NOT_IN_REGISTRY:
        return "missing (not run at this scale)"
    cells = list(row.cells.values())
    ok = sum(1 for c in cells if c.ours is not None and c.ours.ok)
    prefix = "ours only: " if row.origin == OURS_ONLY else ""
    if cells and ok == len(cells):
        return prefix + "ours"
    return prefix + ("partial" if ok else "missing")


def _diff(c: CellView) -> str:
    return "" if c.diff is None else f"{c.diff:+.3g}"


def _prov_title(prov: Provenance, c: CellView) -> str:
    if c.ours is None or not c.ours.file:
        return c.note
    p = prov.number(c.ours)
    parts = [f"run {p['run']}", f"{p['file']}#{p['field']}"]
    if c.ours.seeds > 1:
        parts.append(f"mean of {c.ours.seeds} training seeds (runs <run>-seed<k>)")
    if p.get("config_hash"):
        parts.append(f"config {p['config']} sha256:{p['config_hash']}")
    if p.get("mlflow_run"):
        parts.append(f"MLflow {p['mlflow_run']}")
    if p.get("file_dvc_md5") or p.get("dvc_md5"):
        parts.append(f"DVC md5 {p.get('file_dvc_md5') or p.get('dvc_md5')}")
    if c.note:
        parts.append(c.note)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- HTML

def html_table(view: TableView, prov: Provenance) -> str:
    settings = view.kind == "settings"
    sub = ["paper", "ours", "match" if settings else "Δ"]
    h1 = "".join(f'<th class="k" rowspan="2">{_e(c)}</th>' for c in view.key_cols)
    h1 += '<th class="k" rowspan="2">status</th>'
    h1 += "".join(f'<th class="k" rowspan="2">{_e(c)}</th>' for c in view.info_cols)
    h1 += "".join(f'<th colspan="3">{_e(c)}</th>' for c in view.value_cols)
    h2 = "".join(f"<th>{s}</th>" for _ in view.value_cols for s in sub)
    body = []
    for r in view.rows:
        cls = {OTHER_METHOD: "other", NOT_IN_REGISTRY: "notreg"}.get(r.origin, "")
        tds = "".join(f'<td class="k">{_e(r.key.get(c))}</td>' for c in view.key_cols)
        tds += f'<td class="k">{_e(row_status(r))}</td>'
        tds += "".join(f'<td class="t">{_e(r.info.get(c))}</td>' for c in view.info_cols)
        for col in view.value_cols:
            c = r.cells.get(col) or CellView()
            tds += f'<td class="paper">{_e(c.paper_text)}</td>'
            if r.origin == OTHER_METHOD:
                tds += '<td class="ours missing" title="another method: not reproduced">n/r</td><td></td>'
                continue
            title = _e(_prov_title(prov, c))
            if c.ours is not None and c.ours.ok and c.ours_text:
                tds += f'<td class="ours" title="{title}">{_e(c.ours_text)}</td>'
            elif settings and c.ours is not None and c.ours.status == "no-field":
                tds += f'<td class="ours missing" title="{title}">not recorded</td>'
            else:
                tds += f'<td class="ours missing" title="{title}">missing</td>'
            if settings:
                tds += f'<td class="{c.mark}">{_e(c.mark)}</td>'
            else:
                tds += f'<td class="d">{_e(_diff(c))}</td>'
        body.append(f'<tr class="{cls}">{tds}</tr>')
    return f"<table><thead><tr>{h1}</tr><tr>{h2}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_protocol(protocol: dict) -> str:
    return '<div class="protocol">' + " · ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in protocol.items()) + "</div>"


def html_provenance(entries: list[dict]) -> str:
    if not entries:
        return "<details><summary>Provenance</summary><p>No run of ours behind this yet.</p></details>"
    cols = ["run", "kind", "config", "config_hash", "mlflow_run", "dvc_md5", "git_commit"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f'<td class="t"><code>{_e(p.get(c) or "—")}</code></td>' for c in cols) + "</tr>"
                   for p in entries)
    return (f"<details><summary>Provenance ({len(entries)} runs)</summary><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")


def rerun_cmd(section: str, scale: str) -> str:
    target = RERUN.get(section, GRID_TARGET)
    return f"snakemake --cores all {target} --config scale={scale}"


def html_figure(v: FigureView, prov: Provenance, scale: str) -> str:
    out = [f'<h3 id="{v.name}">{_e(v.title)} {_badge(v.status if v.status != "ok" else "ours")}</h3>']
    if v.kind == "grid":
        if not v.images:
            out.append('<p class="missing">missing: no sample grid in the registry at this scale</p>')
        for im in v.images:
            if im["present"]:
                out.append(f'<figure><img src="{_e(im["src"])}" alt="{_e(im["label"])}">'
                           f'<figcaption>{_e(im["label"])} (run <code>{_e(im["run"])}</code>)</figcaption></figure>')
            else:
                out.append(f'<p class="missing">missing: {_e(im["label"])} ({_e(im["file"])} not written yet)</p>')
    else:
        out.append(f'<figure><img src="{_e(v.files.get("png"))}" alt="{_e(v.title)}">'
                   f'<figcaption>{_e(v.paper_note)} <a href="{_e(v.files.get("svg"))}">SVG</a></figcaption></figure>')
    if v.kind == "grid" and v.paper_note:
        out.append(f"<p class=\"meta\">{_e(v.paper_note)}</p>")
    runs = sorted({c.run for c in v.cells if c.run})
    out.append(html_provenance([prov.run(r) for r in runs]))
    out.append(f'<p class="meta">Rerun: <code>{_e(rerun_cmd(v.name, scale))}</code></p>')
    return "\n".join(out)


def html_claims(results: list[ClaimResult]) -> str:
    t = tally(results)
    tally_html = '<p class="tally">' + "".join(f"<span>{_badge(s)} {t[s]}</span>" for s in STATUSES) + "</p>"
    rows = []
    for r in results:
        c = r.claim
        rows.append(f'<tr id="claim-{_e(c.id)}"><td class="k">{_e(c.id)}</td><td class="t">{_e(c.text)}</td>'
                    f'<td class="t">{_e(c.source)}</td><td class="t">{_e(c.check)}</td>'
                    f"<td>{_badge(r.ours.status)}</td><td class=\"t\">{_e(r.ours.detail)}</td>"
                    f'<td>{_badge(r.paper.status)}</td></tr>')
    head = ("<tr><th>id</th><th>claim</th><th>source</th><th>check</th><th>ours</th><th>detail</th>"
            "<th>on the paper's numbers</th></tr>")
    return tally_html + f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(results: Results, prov: Provenance, tables: list[TableView], figures: list[FigureView],
                claims: list[ClaimResult], generated: str, readings: list[dict] | None = None,
                diagnosis: str = "") -> str:
    """diagnosis: the Diagnosis section's HTML (iar2/report/diagnosis.py), or "" for none."""
    from iar2.report.readings import html_table as readings_html

    scale = results.scale
    nav = " ".join(f'<a href="#{t.name}">T{t.number}</a>' for t in tables)
    nav += " " + " ".join(f'<a href="#{f.name}">{_e(figure_label(f.name))}</a>' for f in figures)
    nav += (' <a href="#claims">Claims</a> <a href="#rerun">Rerun</a> <a href="#protocol">Protocol</a>'
            ' <a href="#readings">Readings</a>' + (' <a href="#diagnosis">Diagnosis</a>' if diagnosis else ""))
    t = tally(claims)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>IAR2 reproduction report: scale {_e(scale)}</title>",
        f"<script>{SELFCHECK_JS}</script>", f"<style>{CSS}</style></head><body>",
        f"<h1>IAR2 reproduction report: scale <code>{_e(scale)}</code></h1>",
        f'<p class="meta">Results <code>{_e(results.root)}</code> · registry git commit '
        f"<code>{_e(prov.git_commit)}</code> · rendered at commit <code>{_e(prov.rendered_at_commit or 'unknown')}"
        f"</code> · {_e(generated)}</p>",
        f'<p class="meta">Claims: {_e(tally_text(t))} (95 % bootstrap intervals; see the checklist). '
        "Paper values are as transcribed in "
        "<code>params/paper/</code> (see its README); ours come from the results folder. Hover a number of ours for "
        "its run, file, config hash, MLflow run and DVC hash.</p>",
        f"<nav>{nav}</nav>",
        f'<h2 id="protocol">Protocol behind our numbers</h2>{html_protocol(_global_protocol(results))}',
        '<h2 id="readings">Readings and deviations</h2>' + readings_html(readings or []),
        "<h2>Tables</h2>",
    ]
    for tv in tables:
        c = tv.counts
        parts.append(f'<h3 id="{tv.name}">{_e(tv.title)}</h3>')
        parts.append(f'<p class="meta">Paper: <code>params/paper/{_e(tv.paper_csv)}</code> · ours: {_count_text(c)}'
                     + ("" if tv.in_registry else " · <b>not in this scale's registry</b>") + "</p>")
        parts.append(html_protocol(tv.protocol))
        parts.append(html_table(tv, prov))
        parts.append(html_provenance(tv.provenance))
        parts.append(f'<p class="meta">Rerun: <code>{_e(rerun_cmd(tv.name, scale))}</code></p>')
    parts.append("<h2>Figures</h2>")
    parts += [html_figure(f, prov, scale) for f in figures]
    parts.append('<h2 id="claims">Claims checklist</h2>')
    parts.append(html_claims(claims))
    if diagnosis:
        parts.append('<h2 id="diagnosis">Diagnosis</h2>' + diagnosis)
    parts.append('<h2 id="rerun">How to rerun any one table or figure</h2>')
    parts.append("<pre>" + _e(rerun_text(scale, results)) + "</pre>")
    parts.append('<div id="selfcheck" data-status="pending" hidden></div></body></html>')
    return "\n".join(parts)


def _count_text(c: dict) -> str:
    text = f"{c['ours']} numbers, {c['missing']} missing"
    return text + (f", {c['not_at_scale']} not run at this scale" if c["not_at_scale"] else "")


def _global_protocol(results: Results) -> dict:
    p = {"scale": results.scale, **results.protocol}
    if isinstance(p.get("image_sizes"), dict):
        p["image_sizes"] = ", ".join(f"{k}x{k} tokens: {v} px" for k, v in p["image_sizes"].items())
    return p


def rerun_text(scale: str, results: Results) -> str:
    lines = [f"# every table and figure, then this report (scale {scale})",
             f"snakemake --cores all reproduce_all --config scale={scale}",
             f"iar2 report --results {results.registry.results or results.root} --out reports/{scale}", "",
             "# one table or figure"]
    lines += [f"{rerun_cmd(f'table{i}', scale)}" for i in range(1, 14)]
    lines += [f"snakemake --cores all {t} --config scale={scale}" for t in ("fig3", "fig4", "fig7", "fig8")]
    lines += [f"snakemake --cores all {GRID_TARGET} --config scale={scale}   # Figures 9-11 (sample grids)"]
    lines += ["", "# preview what would run: add -n; on a SLURM cluster add --profile <your slurm profile>"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Markdown

def _md(x: Any) -> str:
    return str("" if x is None else x).replace("|", "\\|").replace("\n", " ")


def md_table(view: TableView) -> str:
    settings = view.kind == "settings"
    head = list(view.key_cols) + ["status"] + list(view.info_cols)
    for c in view.value_cols:
        head += [f"{c} paper", f"{c} ours", f"{c} {'match' if settings else 'Δ'}"]
    lines = ["| " + " | ".join(map(_md, head)) + " |", "|" + "---|" * len(head)]
    for r in view.rows:
        cells = [r.key.get(c) for c in view.key_cols] + [row_status(r)] + [r.info.get(c) for c in view.info_cols]
        for col in view.value_cols:
            c = r.cells.get(col) or CellView()
            if r.origin == OTHER_METHOD:
                cells += [c.paper_text, "n/r", ""]
                continue
            ours = c.ours_text if c.ours is not None and c.ours.ok and c.ours_text else "*missing*"
            if settings and c.ours is not None and c.ours.status == "no-field":
                ours = "*not recorded*"
            cells += [c.paper_text, ours, c.mark if settings else _diff(c)]
        lines.append("| " + " | ".join(map(_md, cells)) + " |")
    return "\n".join(lines)


def md_claims(claims: list[ClaimResult], scale: str) -> str:
    t = tally(claims)
    lines = [f"# Claims checklist (scale {scale})", "",
             f"**{tally_text(t)}.** Rules: `params/paper/claims.yaml`. A comparison is decided by the 95 % "
             "bootstrap interval of the paired difference (reproduced: on the claimed side of 0; contradicted: on "
             "the other; inconclusive: it contains 0); the detail gives the interval, the replicates and the "
             "sample counts n. Where n reads \"x K seeds\", the set was trained on K seeds (the scale's `seeds:`): "
             "its number is the mean over them, and its interval resamples seeds, then samples, widened to a t "
             "interval over the seeds (`iar2/seeds.py`); a rule compares its rows over the seeds they all have "
             "(seed 0 beside a one-seed set). Elsewhere the interval is of sampling noise only: it holds the run's "
             "trained weights fixed. At small scales another training seed moves FID by more than that "
             "(measured at the default scale: a seed-to-seed SD of 1-9 FID against half-widths of 1.2-2.9; "
             "`workflow/scripts/seed_spread.py`), so a verdict on one seed is one of that run, not of the method.", "",
             "| id | claim | source | ours | detail | on the paper's numbers |", "|---|---|---|---|---|---|"]
    for r in claims:
        lines.append(f"| {_md(r.claim.id)} | {_md(r.claim.text)} | {_md(r.claim.source)} | **{r.ours.status}** | "
                     f"{_md(r.ours.detail)} | {r.paper.status} |")
    return "\n".join(lines) + "\n"


def render_markdown(results: Results, prov: Provenance, tables: list[TableView], figures: list[FigureView],
                    claims: list[ClaimResult], generated: str, readings: list[dict] | None = None,
                    diagnosis: str = "") -> str:
    from iar2.report.readings import markdown_table

    scale = results.scale
    t = tally(claims)
    out = [f"# IAR2 reproduction report: scale `{scale}`", "",
           f"Results `{results.root}` · registry git commit `{prov.git_commit}` · rendered at commit "
           f"`{prov.rendered_at_commit or 'unknown'}` · {generated}", "",
           f"Claims: {tally_text(t)} (see [claims.md](claims.md)). Per-number provenance: `provenance.json`.", "",
           "## Protocol behind our numbers", ""]
    out += [f"- **{k}**: {v}" for k, v in _global_protocol(results).items()]
    out += ["", "## Readings and deviations", "", markdown_table(readings or [])]
    out += ["", "## Tables", ""]
    for tv in tables:
        c = tv.counts
        out += [f"### {tv.title}", "",
                f"Paper: `params/paper/{tv.paper_csv}` · ours: {_count_text(c)}"
                + ("" if tv.in_registry else " · **not in this scale's registry**"), "",
                " · ".join(f"**{k}**: {v}" for k, v in tv.protocol.items()), "", md_table(tv), ""]
        if tv.provenance:
            out += ["<details><summary>Provenance</summary>", "", "| run | config | config sha256 | MLflow run | DVC md5 |",
                    "|---|---|---|---|---|"]
            out += [f"| `{p['run']}` | `{p.get('config') or '—'}` | `{p.get('config_hash') or '—'}` | "
                    f"`{p.get('mlflow_run') or '—'}` | `{p.get('dvc_md5') or '—'}` |" for p in tv.provenance]
            out += ["", "</details>", ""]
        out += [f"Rerun: `{rerun_cmd(tv.name, scale)}`", ""]
    out += ["## Figures", ""]
    for f in figures:
        out += [f"### {f.title} ({f.status if f.status != 'ok' else 'ours'})", ""]
        if f.kind == "grid":
            if not f.images:
                out.append("*missing*: no sample grid in the registry at this scale")
            for im in f.images:
                out.append(f"![{_md(im['label'])}]({im['src']})" if im["present"]
                           else f"*missing*: {_md(im['label'])} (`{im['file']}` not written yet)")
            out.append("")
        else:
            out += [f"![{_md(f.title)}]({f.files.get('png')})", "", f"[SVG]({f.files.get('svg')})", ""]
        if f.paper_note:
            out += [f.paper_note, ""]
        out += [f"Rerun: `{rerun_cmd(f.name, scale)}`", ""]
    out += ["## Claims", "", f"See [claims.md](claims.md): {tally_text(t)}.", ""]
    if diagnosis:
        out += ["## Diagnosis", "", diagnosis]
    out += ["## How to rerun any one table or figure", "", "```sh", rerun_text(scale, results), "```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- machine-readable

def provenance_records(tables: list[TableView], figures: list[FigureView], prov: Provenance) -> list[dict]:
    recs = []
    for tv in tables:
        for r in tv.rows:
            for col, c in r.cells.items():
                if c.ours is None:
                    continue
                rec = {"table": tv.name, "key": r.key, "column": col, "paper": c.paper_text,
                       "ours": c.ours.value if c.ours.ok else None, "status": c.ours.status}
                rec.update(prov.number(c.ours))
                recs.append(rec)
    for f in figures:
        for c in f.cells:
            rec = {"figure": f.name, "status": c.status,
                   "ours": c.value if c.ok and not isinstance(c.value, (list, dict)) else None}
            rec.update(prov.number(c))
            recs.append(rec)
    return recs


def summary(results: Results, prov: Provenance, tables: list[TableView], figures: list[FigureView],
            claims: list[ClaimResult]) -> dict:
    return {
        "scale": results.scale, "results": str(results.root), "git_commit": prov.git_commit,
        "rendered_at_commit": prov.rendered_at_commit,
        "mlflow_store": str(prov.mlflow_db) if prov.mlflow_db.is_file() else None,
        "dvc_lock": str(prov.dvc_lock) if prov.dvc_lock.is_file() else None,
        "tables": {t.name: {**t.counts, "in_registry": t.in_registry, "title": t.title} for t in tables},
        "figures": {f.name: {"status": f.status, "files": f.files,
                             "images": [i["src"] for i in f.images if i["present"]]} for f in figures},
        "claims": {"tally": tally(claims),
                   "results": [{"id": r.claim.id, "status": r.ours.status, "detail": r.ours.detail,
                                "paper_status": r.paper.status} for r in claims]},
    }


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
