# Stage: AR models on the tokens (one run per registry run id), samples per (checkpoint, guidance), metrics.

TIMED = [rid for rid, r in PLAN.runs.items() if r.time_match]


rule time_match:
    """Seconds per step of an equal-time run and of its reference, measured on the same node: the run then gets
    the steps the reference's epochs take in the same time."""
    wildcard_constraints:
        run=_alternation(TIMED),
    input:
        tokens=lambda w: f"{R}/{tokens_of(w.run)}",
        ref_tokens=lambda w: f"{R}/{tokens_of(PLAN.runs[w.run].time_match)}",
    output:
        f"{R}/{layout.time_match('{run}')}",
    params:
        cfg=lambda w: cfg_json(PLAN.ar_config(w.run)),
        cfgfile=lambda w: f"{R}/{layout.job_config('time_match', w.run)}",
        ref=lambda w: cfg_json(PLAN.ar_config(PLAN.runs[w.run].time_match)),
        reffile=lambda w: f"{R}/{layout.job_config('time_match', f'{w.run}.reference')}",
    resources:
        **res("time_match"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('time_match', '{run}')}",
    shell:
        "mkdir -p \"$(dirname {params.cfgfile:q})\" && printf '%s\\n' {params.cfg:q} > {params.cfgfile:q}.tmp$$ && "
        "mv -f {params.cfgfile:q}.tmp$$ {params.cfgfile:q} && printf '%s\\n' {params.ref:q} > {params.reffile:q} && "
        "iar2 ar time-match --config {params.cfgfile:q} --reference {params.reffile:q} --out {output:q} > {log:q} 2>&1"


rule ar_train:
    """Train one AR run; exports the weights after each epoch the registry samples (model_eNNN.safetensors) and
    at the end (model.safetensors). A preempted or retried job resumes from its latest checkpoint."""
    input:
        tokens=lambda w: f"{R}/{tokens_of(w.run)}",
        budget=lambda w: [f"{R}/{layout.time_match(w.run)}"] if PLAN.runs[w.run].time_match else [],
    output:
        f"{R}/{layout.ar_weights('{run}')}",
    params:
        out=lambda w: f"{R}/{layout.run_dir(w.run)}",
        cfg=lambda w: cfg_json(PLAN.ar_config(w.run)),
        cfgfile=lambda w: f"{R}/{layout.job_config('ar', w.run)}",
        budget=lambda w: opt("--budget", f"{R}/{layout.time_match(w.run)}" if PLAN.runs[w.run].time_match else ""),
        launch=lambda w: launch("ar_train", w.run),
        env=lambda w: tag("ar_train", layout.run_dir(w.run), PLAN.tables_of_run(w.run)),
    resources:
        **res("ar_train"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('ar_train', '{run}')}",
    shell:
        "mkdir -p \"$(dirname {params.cfgfile:q})\" && printf '%s\\n' {params.cfg:q} > {params.cfgfile:q}.tmp$$ && "
        "mv -f {params.cfgfile:q}.tmp$$ {params.cfgfile:q} && "
        "{params.env} {params.launch}iar2 ar train --config {params.cfgfile:q} {params.budget} "
        "--out {params.out:q} --resume auto > {log:q} 2>&1"


rule sample:
    """Class-conditional samples of one checkpoint under one guidance config (ADM .npz + a class grid)."""
    input:
        unpack(sample_inputs),
    output:
        f"{R}/{layout.samples(SAMPLE)}",
        report(f"{R}/{layout.sample_grid(SAMPLE)}", caption="../report/samples.rst",
               category="Samples", subcategory="{run}", labels={"run": "{run}", "epoch": "{epoch}",
                                                              "guidance": "{guidance}"}),
    params:
        # written by the same ar_train job as input.ar (its per-epoch export), so input.ar stands for it
        weights=lambda w: f"{R}/{layout.ar_weights_at(w.run, w.epoch)}",
        # per set, not per guidance: sampling.per_class_by_table may give two sets of one guidance other sizes
        cfg=lambda w: cfg_json(PLAN.sample_config(w.guidance, sample_of(w))),
        cfgfile=lambda w: f"{R}/{layout.job_config('sampling', sample_of(w))}",
        launch=lambda w: launch("sample"),
        out=lambda w: f"{R}/{layout.sample_dir(sample_of(w))}",
        env=lambda w: tag("sample", layout.sample_dir(sample_of(w)),
                          ",".join(sorted(PLAN.samples[sample_of(w)].tables))),
    resources:
        **res("sample"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('sample', '{run}-e{epoch}-{guidance}')}",
    shell:
        "mkdir -p \"$(dirname {params.cfgfile:q})\" && printf '%s\\n' {params.cfg:q} > {params.cfgfile:q}.tmp$$ && "
        "mv -f {params.cfgfile:q}.tmp$$ {params.cfgfile:q} && "
        "{params.env} iar2 sample --ar {params.weights:q} --vq {input.vq:q} "
        "--config {params.cfgfile:q} --out {params.out:q} --grid 8 > {log:q} 2>&1"


rule gen_metrics:
    """FID / IS / precision / recall of one sample set (against ADM's reference batch at the paper scale)."""
    input:
        samples=f"{R}/{layout.samples(SAMPLE)}",
        refnet=f"{R}/{layout.refnet()}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        f"{R}/{layout.gen_metrics(SAMPLE)}",
    params:
        m=config["gen_metrics"],
        ref=opt("--ref-npz", SCALE_CFG.gen_metrics.ref_npz),
        boot=SCALE_CFG.gen_metrics.bootstrap,  # replicates for the claims' intervals
        cache=f"{R}/{layout.REFERENCE_CACHE}",
        env=lambda w: tag("gen_metrics", layout.sample_dir(sample_of(w)),
                          ",".join(sorted(PLAN.samples[sample_of(w)].tables))),
    resources:
        **res("gen_metrics"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('gen_metrics', '{run}-e{epoch}-{guidance}')}",
    shell:
        "{params.env} iar2 metrics --samples {input.samples:q} --data {input.data:q} --split train "
        "--report {input.report:q} --extractor {params.m[extractor]:q} --domain-net {input.refnet:q} "
        "--max-reference {params.m[max_reference]:q} {params.ref} --bootstrap {params.boot:q} "
        "--cache-dir {params.cache:q} --out {output:q} > {log:q} 2>&1"
