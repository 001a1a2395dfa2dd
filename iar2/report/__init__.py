"""`iar2 report`: every table and figure of the paper beside our numbers, with provenance, as one report folder.

    iar2 report --results results/<scale> --out reports/<scale>

Reads <results>/registry.json (written by the workflow's registry_index rule) and the metric files, configs and
curves it points to, plus the paper's numbers in params/paper/. Writes, under --out:

    index.html      self-contained page (inline CSS); open it in a browser
    report.md       the same for a code host
    claims.md       the claims checklist (reproduced / contradicted / inconclusive / missing / n/a), tallied
    figures/        Figures 3, 4, 7a-c, 8 as PNG + SVG; Figures 9-11 sample grids (copied)
    provenance.json every number of ours with run id, file, config hash, MLflow run id, DVC hash, git commit
    summary.json    counts per table, figure status, claim outcomes

A partial run renders what exists and marks the rest missing; the command fails only on unusable arguments.
The output folder is replaced as a whole (built beside it, then renamed), so it never holds a half-written report.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__.split("\n\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 1)[1]
    p.add_argument("--results", required=True, help="results folder of one scale (holds registry.json)")
    p.add_argument("--out", required=True, help="report folder to write (replaced as a whole)")
    p.add_argument("--paper", default=None,
                   help="folder of the paper's numbers (default: params/paper of the working directory or source tree)")
    p.add_argument("--claims", default=None, help="claims file (default: <paper>/claims.yaml)")
    p.add_argument("--repo-root", default=None,
                   help="repository holding dvc.lock and .git (default: derived from the registry's results path)")


def run(args: argparse.Namespace) -> int:
    s = render_report(args.results, args.out, paper_dir=args.paper, claims_file=args.claims, repo_root=args.repo_root)
    t = s["claims"]["tally"]
    from iar2.report.claims import tally_text

    print(f"report: {Path(args.out) / 'index.html'} (claims: {tally_text(t)})")
    return 0


def render_report(results_dir: str | Path, out_dir: str | Path, paper_dir: str | Path | None = None,
                  claims_file: str | Path | None = None, repo_root: str | Path | None = None) -> dict:
    """Render the report folder; returns the summary (also written as summary.json)."""
    from iar2.io import atomic_path
    from iar2.report import claims as cl
    from iar2.report import diagnosis as dg
    from iar2.report import figures as fg
    from iar2.report import render as rd
    from iar2.report import tables as tb
    from iar2.report.sources import (Provenance, Results, TABLES, default_paper_dir, derive_columns, is_number,
                                     load_fig_claims, load_paper_table, parse_cell)

    paper = Path(paper_dir) if paper_dir else default_paper_dir()
    if not paper.is_dir():
        raise FileNotFoundError(f"paper numbers folder {paper} not found (expected params/paper)")
    results = Results.open(results_dir, repo_root)
    log.info("report for scale %s from %s (paper numbers: %s)", results.scale, results.root, paper)
    prov = Provenance(results)

    tables = tb.build_tables(results, prov, paper)
    paper_tables = {n: load_paper_table(paper / (results.table(n).get("paper_csv") or f), n)
                    for n, (f, _) in TABLES.items()}
    figures = fg.build_figures(results, paper_tables, load_fig_claims(paper))

    # Row sets for the claims: ours (rows this scale's registry defines) and the paper's.
    ours_rows: dict[str, list[dict]] = {}
    for tv in tables:
        if tv.kind != "results":
            continue
        ours_rows[tv.name] = [
            derive_columns({**{c: parse_cell(str(v)) for c, v in r.key.items()},
                            **{c: (cv.ours.value if cv.ours is not None and cv.ours.ok and is_number(cv.ours.value)
                                   else None) for c, cv in r.cells.items()},
                            **_intervals(r)})
            for r in tv.rows if r.origin in (tb.PAPER_AND_OURS, tb.OURS_ONLY)]
    paper_rows = {n: [derive_columns(r) for r in t.rows] for n, t in paper_tables.items() if t is not None}
    for f in figures:
        ours_rows[f.name] = list(f.rows)  # a series not yet run makes its claims "missing", not decided early
        paper_rows[f.name] = list(f.paper_rows)
    claims_path = Path(claims_file) if claims_file else paper / "claims.yaml"
    claim_list = cl.load_claims(claims_path) if claims_path.is_file() else []
    if not claim_list:
        log.warning("no claims file at %s: the checklist is empty", claims_path)
    checked = cl.check_claims(claim_list, cl.Dataset(ours_rows), cl.Dataset(paper_rows, paper=True))

    from iar2.report.readings import load_readings

    readings = load_readings(paper)
    diag = dg.load(results.root)  # the Diagnosis section: None unless the scale diagnosed its runs
    generated = rd.now_utc()
    out = Path(out_dir)
    # Build the whole folder beside the target and rename it into place: readers never see half a report.
    with atomic_path(out, is_dir=True) as tmp:
        fg.render_figures(figures, results, tmp)
        images = dg.copy_images(diag, tmp) if diag else {}
        (tmp / "index.html").write_text(rd.render_html(results, prov, tables, figures, checked, generated, readings,
                                                       dg.html_section(diag, images) if diag else ""))
        (tmp / "report.md").write_text(rd.render_markdown(results, prov, tables, figures, checked, generated,
                                                          readings, dg.markdown(diag, images) if diag else ""))
        (tmp / "claims.md").write_text(rd.md_claims(checked, results.scale))
        rd.write_json(tmp / "provenance.json", rd.provenance_records(tables, figures, prov))
        summary = rd.summary(results, prov, tables, figures, checked)
        rd.write_json(tmp / "summary.json", summary)
    log.info("wrote %s (index.html, report.md, claims.md, figures/)", out)
    return summary


def _intervals(row) -> dict:
    """A table row's bootstrap replicates per metric column (the claims' intervals); {} when none."""
    from iar2.report.sources import interval_entries

    return interval_entries({c: cv.ours for c, cv in row.cells.items()})
