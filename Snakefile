# iar2-repro: the reproduction DAG.
#   snakemake --cores all reproduce_all                       embedded default (params/default.yaml)
#   snakemake --cores all reproduce_all --config scale=ci     another scale (params/<scale>.yaml)
#   snakemake --cores all reproduce_all --configfile params/ci.yaml
# Stages mirror the rule files: data -> refnet -> tokenizer -> tokens/analysis -> ar (train, sample, metrics).

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/ar.smk"


rule reproduce_all:
    """Everything the current scale defines (today: tokenizers, analyses, AR models, samples and metrics)."""
    input:
        TOKENIZER_TARGETS,
        ANALYSIS_TARGETS,
        GENERATION_TARGETS,


rule tokenizers:
    """Every tokenizer variant trained and evaluated (Table 1, 7, 13; Figure 4 left)."""
    input:
        TOKENIZER_TARGETS,


rule samples:
    """Every model's samples and generation metrics."""
    input:
        GENERATION_TARGETS,
