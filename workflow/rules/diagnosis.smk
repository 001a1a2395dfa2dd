# Stage: the diagnosis of IAR2 against LlamaGen at this scale (issue 16), for the report's "Diagnosis" section.
# The scale file's `diagnosis.runs` names the AR runs to compare (e.g. llamagen-B-16, iar2-B-16); for each run and
# its tokenizer: `iar2 diagnose tokenizer` (usage, semantic-only vs full decode, what decodes to flat tiles),
# `iar2 diagnose ar` (per-level CE and accuracy against the tokens' entropy on training and held-out tokens, how far
# the conditional and unconditional predictions differ, samples at T = 1 unguided against guided), and the budget
# (optimiser steps, wall time, whether the loss still falls). No `diagnosis` key: nothing here runs.

DIAG = SCALE_CFG.diagnosis  # typed, with its defaults (iar2/scale.py); None: no diagnosis
DIAG_RUNS = list(DIAG.runs) if DIAG else []
_unknown = [r for r in DIAG_RUNS if r not in PLAN.runs]
if _unknown:
    raise ConfigError(f"diagnosis.runs: {', '.join(_unknown)} not among this scale's AR runs; allowed values: "
                      + ", ".join(sorted(PLAN.runs)))
DIAG_TOKS = sorted({PLAN.runs[r].tokenizer for r in DIAG_RUNS})
DIAG_TARGETS = (
    [f"{R}/{layout.diagnosis_tokenizer(t)}" for t in DIAG_TOKS]
    + [f"{R}/{layout.diagnosis_ar(r)}" for r in DIAG_RUNS]
    + [f"{R}/{layout.diagnosis_budget()}"]
    if DIAG_RUNS
    else []
)


rule diagnose_tokenizer:
    """Codebook usage and perplexity, rFID/PSNR of the semantic-only and the full decode, constant-code decodes."""
    wildcard_constraints:
        tok=_alternation(DIAG_TOKS),
    input:
        vq=f"{R}/{layout.vq('{tok}')}",
        refnet=f"{R}/{layout.refnet()}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        json=f"{R}/{layout.diagnosis_tokenizer('{tok}')}",
        png=f"{R}/{layout.diagnosis_tokenizer('{tok}', png=True)}",
    params:
        n=DIAG.max_images if DIAG else None,
    resources:
        **res("diagnose"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('diagnose', 'tok-{tok}')}",
    shell:
        "iar2 diagnose tokenizer --vq {input.vq:q} --data {input.data:q} --domain-net {input.refnet:q} "
        "--report {input.report:q} --max-images {params.n:q} --out {output.json:q} --png {output.png:q} > {log:q} 2>&1"


rule tokenize_heldout:
    """The val split's codes at a run's grid, without augmentation: held-out tokens for the AR diagnosis."""
    wildcard_constraints:
        tok=_alternation(DIAG_TOKS),
    input:
        vq=f"{R}/{layout.vq('{tok}')}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        f"{R}/{layout.heldout_tokens_meta('{tok}', '{grid}')}",
    params:
        size=lambda w: PLAN.image_size(int(w.grid)),
        out=lambda w: f"{R}/{layout.heldout_tokens_dir(w.tok, w.grid)}",
    resources:
        **res("tokenize"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('diagnose', 'tokens-val-{tok}-g{grid}')}",
    shell:
        "iar2 tokenize --vq {input.vq:q} --data {input.data:q} --split val --report {input.report:q} --aug none "
        "--image-size {params.size:q} --out {params.out:q} --resume > {log:q} 2>&1"


rule diagnose_ar:
    """Per-level CE/accuracy vs entropy, conditional vs unconditional KL, T = 1 unguided vs guided samples."""
    wildcard_constraints:
        run=_alternation(DIAG_RUNS),
    input:
        ar=f"{R}/{layout.ar_weights('{run}')}",
        vq=lambda w: f"{R}/{layout.vq(PLAN.runs[w.run].tokenizer)}",
        tokens=lambda w: f"{R}/{tokens_of(w.run)}",
        heldout=lambda w: f"{R}/{layout.heldout_tokens_meta(PLAN.runs[w.run].tokenizer, PLAN.runs[w.run].grid)}",
        refnet=f"{R}/{layout.refnet()}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        json=f"{R}/{layout.diagnosis_ar('{run}')}",
        png=f"{R}/{layout.diagnosis_ar('{run}', png=True)}",
    params:
        tokens=lambda w, input: os.path.dirname(input.tokens),
        heldout=lambda w, input: os.path.dirname(input.heldout),
        scales=" ".join(shlex.quote(str(s)) for s in DIAG.scales) if DIAG else "",
        per_class=DIAG.per_class if DIAG else None,
        n=DIAG.max_images if DIAG else None,
        cache=f"{R}/{layout.REFERENCE_CACHE}",
    resources:
        **res("diagnose"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('diagnose', 'ar-{run}')}",
    shell:
        "iar2 diagnose ar --ar {input.ar:q} --vq {input.vq:q} --tokens {params.tokens:q} "
        "--heldout {params.heldout:q} --max-eval {params.n:q} --domain-net {input.refnet:q} --data {input.data:q} "
        "--report {input.report:q} --cache-dir {params.cache:q} --per-class {params.per_class:q} "
        "--scales {params.scales} --out {output.json:q} --png {output.png:q} > {log:q} 2>&1"


rule diagnose_budget:
    """Each diagnosed run's and tokenizer's optimiser steps, wall time and loss trend (is it still learning?)."""
    input:
        ar=[f"{R}/{layout.ar_weights(r)}" for r in DIAG_RUNS],
        vq=[f"{R}/{layout.vq(t)}" for t in DIAG_TOKS],
    output:
        f"{R}/{layout.diagnosis_budget()}",
    params:
        # the results folder, from the output (a path prefix the linter wants derived, not spelled)
        results=lambda w, output: output[0][: -len(layout.diagnosis_budget()) - 1],
        runs=" ".join(shlex.quote(r) for r in DIAG_RUNS),
        toks=" ".join(shlex.quote(t) for t in DIAG_TOKS),
    localrule: True
    conda:
        ENV
    log:
        f"{R}/{layout.log('diagnose', 'budget')}",
    shell:
        "iar2 diagnose budget --results {params.results:q} --runs {params.runs} --tokenizers {params.toks} --out {output:q} "
        "> {log:q} 2>&1"
