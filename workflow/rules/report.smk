# Stage: the report reviewers read (iar2/report/): every table and figure beside the paper's numbers, the claims
# checklist and the provenance of every number. `iar2 report` also renders a partial results folder by hand.


rule report:
    """reports/<scale>/: index.html (self-contained), report.md, claims.md, figures (PNG + SVG), provenance."""
    input:
        targets=ALL_TARGETS,
        summary=f"{R}/summary.json",
    output:
        report(directory(f"reports/{SCALE}"), htmlindex="index.html", caption="../report/report.rst",
               category="Reproduction report"),
    conda:
        ENV
    log:
        f"{R}/logs/report.log",
    params:
        # spooled MLflow runs are logged first, so the provenance names every number's MLflow run
        sync="iar2 track sync && " if TRACKING == "spool" else "",
    localrule: True
    shell:
        "({params.sync}iar2 report --results $(dirname {input.summary}) --out {output}) > {log} 2>&1"
