# iar2-repro: the reproduction DAG over the experiment registry (params/experiments.yaml).
#   snakemake --cores all reproduce_all                       embedded default (params/default.yaml)
#   snakemake --cores all table9                              one table (table1 .. table13, fig3, fig4, fig7, fig8)
#   snakemake --cores all reproduce_all --config scale=ci     another scale (params/<scale>.yaml)
#   snakemake --profile slurm reproduce_all                   the paper scale on a SLURM cluster (slurm/config.yaml)
# Stages mirror the rule files: data -> tokenizer -> analysis (tokens, rearrangement, Fig. 3/8) -> ar (train,
# sample, metrics) -> diagnosis (IAR2 vs LlamaGen taken apart) -> report.

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/ar.smk"
include: "workflow/rules/diagnosis.smk"
include: "workflow/rules/report.smk"


rule reproduce_all:
    """Every table and figure of the paper at the current scale, the diagnosis, the summary and the report."""
    input:
        ALL_TARGETS,
        DIAG_TARGETS,
        f"{R}/{layout.SUMMARY}",
        layout.report_dir(SCALE),


rule diagnosis:
    """The report's Diagnosis section: the scale file's `diagnosis.runs` taken apart (workflow/rules/diagnosis.smk)."""
    input:
        DIAG_TARGETS,
    localrule: True


rule samples:
    """Every sample set of the registry with its metrics (and the Figures 9-11 class grids)."""
    input:
        SAMPLE_TARGETS,


for _t in TABLES + FIGURES:

    rule:
        name:
            _t
        input:
            table_targets(_t) if _t in PLAN.tables else figure_targets(_t),
        localrule: True


rule fig7:
    """Figure 7a-c: CFG sweep, scaling in parameters, scaling in epochs."""
    input:
        [p for f in ("fig7a", "fig7b", "fig7c") if f in PLAN.figures for p in figure_targets(f)],
    localrule: True


# Spooled MLflow runs (tracking.mode: spool) reach the store when the workflow ends, whether it failed or not.
onsuccess:
    sync_tracking(log)


onerror:
    sync_tracking(log)
