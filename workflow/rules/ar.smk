# Stage: AR models on the tokens, samples per guidance config, generation metrics.


rule ar_config:
    """Write one AR variant's resolved run config; it changes (and reruns training) only when the config does."""
    output:
        f"{R}/configs/ar/{{name}}.yaml",
    params:
        cfg=lambda w: json.dumps(ar_config(w.name), sort_keys=True),
    localrule: True
    run:
        from iar2.io import atomic_write_text

        atomic_write_text(output[0], yaml.safe_dump(json.loads(params.cfg), sort_keys=False))


rule ar_train:
    """Train one AR variant (LlamaGen, IAR, IAR2, ...); resumes from its latest checkpoint when retried."""
    input:
        config=f"{R}/configs/ar/{{name}}.yaml",
        tokens=lambda w: f"{R}/tokens/{ar_tokenizer(w.name)}/train/meta.json",
    output:
        f"{R}/ar/{{name}}/model.safetensors",
    params:
        out=lambda w: f"{R}/ar/{w.name}",
    log:
        f"{R}/logs/ar_train/{{name}}.log",
    shell:
        "IAR2_RULE=ar_train IAR2_RUN_ID=ar/{wildcards.name} "
        "iar2 ar train --config {input.config} --out {params.out} --resume auto > {log} 2>&1"


rule sample_config:
    output:
        f"{R}/configs/sampling/{{guidance}}.yaml",
    params:
        cfg=lambda w: json.dumps(sample_config(w.guidance), sort_keys=True),
    localrule: True
    run:
        from iar2.io import atomic_write_text

        atomic_write_text(output[0], yaml.safe_dump(json.loads(params.cfg), sort_keys=False))


rule sample:
    """Class-conditional samples of one model under one guidance config (ADM .npz + a class grid)."""
    input:
        ar=f"{R}/ar/{{name}}/model.safetensors",
        vq=lambda w: f"{R}/tokenizers/{ar_tokenizer(w.name)}/vq.safetensors",
        config=f"{R}/configs/sampling/{{guidance}}.yaml",
    output:
        f"{R}/ar/{{name}}/samples/{{guidance}}/samples.npz",
    params:
        out=lambda w: f"{R}/ar/{w.name}/samples/{w.guidance}",
    log:
        f"{R}/logs/sample/{{name}}-{{guidance}}.log",
    shell:
        "iar2 sample --ar {input.ar} --vq {input.vq} --config {input.config} --out {params.out} --grid 8 "
        "> {log} 2>&1"


rule gen_metrics:
    """FID / IS / precision / recall of one sample set against the train split."""
    input:
        samples=f"{R}/ar/{{name}}/samples/{{guidance}}/samples.npz",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        f"{R}/ar/{{name}}/samples/{{guidance}}/metrics.json",
    params:
        m=config.get("gen_metrics", {}),
        cache=f"{R}/cache/reference",
    log:
        f"{R}/logs/gen_metrics/{{name}}-{{guidance}}.log",
    shell:
        "iar2 metrics --samples {input.samples} --data {input.data} --split train --report {input.report} "
        "--extractor {params.m[extractor]} --domain-net {input.refnet} --max-reference {params.m[max_reference]} "
        "--cache-dir {params.cache} --out {output} > {log} 2>&1"
