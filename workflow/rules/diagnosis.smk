# Stage: the diagnosis of IAR2 against LlamaGen at this scale (issue 16), for the report's "Diagnosis" section.
# The scale file's `diagnosis.runs` names the AR runs to compare (e.g. llamagen-B-16, iar2-B-16); for each run and
# its tokenizer: `iar2 diagnose tokenizer` (usage, semantic-only vs full decode, what decodes to flat tiles),
# `iar2 diagnose ar` (per-level CE and accuracy against the tokens' entropy on training and held-out tokens, how far
# the conditional and unconditional predictions differ, samples at T = 1 unguided against guided), and the budget
# (optimiser steps, wall time, whether the loss still falls). No `diagnosis` key: nothing here runs.

DIAG = config.get("diagnosis") or {}
DIAG_RUNS = list(DIAG.get("runs", []))
_unknown = [r for r in DIAG_RUNS if r not in PLAN.runs]
if _unknown:
    raise ConfigError(f"diagnosis.runs: {', '.join(_unknown)} not among this scale's AR runs; allowed values: "
                      + ", ".join(sorted(PLAN.runs)))
DIAG_TOKS = sorted({PLAN.runs[r].tokenizer for r in DIAG_RUNS})
D = f"{R}/diagnose"
DIAG_TARGETS = (
    [f"{D}/tok-{t}.json" for t in DIAG_TOKS] + [f"{D}/ar-{r}.json" for r in DIAG_RUNS] + [f"{D}/budget.json"]
    if DIAG_RUNS
    else []
)


rule diagnose_tokenizer:
    """Codebook usage and perplexity, rFID/PSNR of the semantic-only and the full decode, constant-code decodes."""
    wildcard_constraints:
        tok=_alternation(DIAG_TOKS),
    input:
        vq=f"{R}/tokenizers/{{tok}}/vq.safetensors",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        json=f"{D}/tok-{{tok}}.json",
        png=f"{D}/tok-{{tok}}-const.png",
    params:
        n=DIAG.get("max_images", 200),
    resources:
        **res("diagnose"),
    conda:
        ENV
    log:
        f"{R}/logs/diagnose/tok-{{tok}}.log",
    shell:
        "iar2 diagnose tokenizer --vq {input.vq:q} --data {input.data:q} --domain-net {input.refnet:q} "
        "--report {input.report:q} --max-images {params.n:q} --out {output.json:q} --png {output.png:q} > {log:q} 2>&1"


rule tokenize_heldout:
    """The val split's codes at a run's grid, without augmentation: held-out tokens for the AR diagnosis."""
    wildcard_constraints:
        tok=_alternation(DIAG_TOKS),
    input:
        vq=f"{R}/tokenizers/{{tok}}/vq.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        f"{D}/tokens-val/{{tok}}/g{{grid}}/meta.json",
    params:
        size=lambda w: PLAN.image_size(int(w.grid)),
        out=lambda w: f"{D}/tokens-val/{w.tok}/g{w.grid}",
    resources:
        **res("tokenize"),
    conda:
        ENV
    log:
        f"{R}/logs/diagnose/tokens-val-{{tok}}-g{{grid}}.log",
    shell:
        "iar2 tokenize --vq {input.vq:q} --data {input.data:q} --split val --report {input.report:q} --aug none "
        "--image-size {params.size:q} --out {params.out:q} --resume > {log:q} 2>&1"


rule diagnose_ar:
    """Per-level CE/accuracy vs entropy, conditional vs unconditional KL, T = 1 unguided vs guided samples."""
    wildcard_constraints:
        run=_alternation(DIAG_RUNS),
    input:
        ar=f"{R}/ar/{{run}}/model.safetensors",
        vq=lambda w: f"{R}/tokenizers/{PLAN.runs[w.run].tokenizer}/vq.safetensors",
        tokens=lambda w: f"{R}/tokens/{PLAN.runs[w.run].tokenizer}/g{PLAN.runs[w.run].grid}/meta.json",
        heldout=lambda w: f"{D}/tokens-val/{PLAN.runs[w.run].tokenizer}/g{PLAN.runs[w.run].grid}/meta.json",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        json=f"{D}/ar-{{run}}.json",
        png=f"{D}/ar-{{run}}.png",
    params:
        tokens=lambda w, input: os.path.dirname(input.tokens),
        heldout=lambda w, input: os.path.dirname(input.heldout),
        scales=" ".join(shlex.quote(str(s)) for s in DIAG.get("scales", [2.0])),
        per_class=DIAG.get("per_class", 10),
        n=DIAG.get("max_images", 200),
        cache=f"{R}/cache/reference",
    resources:
        **res("diagnose"),
    conda:
        ENV
    log:
        f"{R}/logs/diagnose/ar-{{run}}.log",
    shell:
        "iar2 diagnose ar --ar {input.ar:q} --vq {input.vq:q} --tokens {params.tokens:q} "
        "--heldout {params.heldout:q} --max-eval {params.n:q} --domain-net {input.refnet:q} --data {input.data:q} "
        "--report {input.report:q} --cache-dir {params.cache:q} --per-class {params.per_class:q} "
        "--scales {params.scales} --out {output.json:q} --png {output.png:q} > {log:q} 2>&1"


rule diagnose_budget:
    """Each diagnosed run's and tokenizer's optimiser steps, wall time and loss trend (is it still learning?)."""
    input:
        ar=[f"{R}/ar/{r}/model.safetensors" for r in DIAG_RUNS],
        vq=[f"{R}/tokenizers/{t}/vq.safetensors" for t in DIAG_TOKS],
    output:
        f"{D}/budget.json",
    params:
        results=lambda w, output: os.path.dirname(os.path.dirname(output[0])),  # <results>/diagnose/budget.json
        runs=" ".join(shlex.quote(r) for r in DIAG_RUNS),
        toks=" ".join(shlex.quote(t) for t in DIAG_TOKS),
    localrule: True
    conda:
        ENV
    log:
        f"{R}/logs/diagnose/budget.log",
    shell:
        "iar2 diagnose budget --results {params.results:q} --runs {params.runs} --tokenizers {params.toks} --out {output:q} "
        "> {log:q} 2>&1"
