# Stage: the report reviewers read (iar2/report/): every table and figure beside the paper's numbers, the claims
# checklist and the provenance of every number. `iar2 report` also renders a partial results folder by hand.


rule report:
    """reports/<scale>/: index.html (self-contained), report.md, claims.md, figures (PNG + SVG), provenance."""
    input:
        targets=ALL_TARGETS,
        diagnosis=DIAG_TARGETS,  # the Diagnosis section (empty unless the scale file names runs)
        summary=f"{R}/{layout.SUMMARY}",
        paper=PAPER_FILES,  # the paper's numbers and claims the report sets ours beside
    output:
        report(directory(layout.report_dir(SCALE)), htmlindex="index.html", caption="../report/report.rst",
               category="Reproduction report"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('report')}",
    params:
        # spooled MLflow runs are logged first, so the provenance names every number's MLflow run
        sync="iar2 track sync && " if TRACKING == "spool" else "",
        results=lambda w, input: os.path.dirname(input.summary),
        paper=lambda w, input: os.path.dirname(input.paper[0]),
    localrule: True
    shell:
        "({params.sync}iar2 report --results {params.results:q} --paper {params.paper:q} --out {output:q}) "
        "> {log:q} 2>&1"
