# Stage: VQ tokenizers (single, semantic-detail dual in two stages, unassociated dual) and their evaluation.

TRAINED_RE = _alternation(TRAINED)  # rearranged tokenizers come from rule rearrange


rule vq_train:
    """Train a tokenizer (single / unassociated dual, or stage 2 of the semantic-detail one: Eq. 9-10);
    a killed or preempted job resumes from its latest checkpoint."""
    wildcard_constraints:
        tok=TRAINED_RE,
    input:
        unpack(train_inputs),
    output:
        f"{R}/tokenizers/{{tok}}/vq.safetensors",
    params:
        out=lambda w: f"{R}/tokenizers/{w.tok}",
        cfg=lambda w: cfg_json(PLAN.tokenizer_config(w.tok, final_stage(w))),
        cfgfile=lambda w: f"{R}/configs/tokenizer/{w.tok}-{final_stage(w)}.yaml",
        launch=lambda w: launch("vq_train"),
        env=lambda w: tag("vq_train", f"tok/{w.tok}", ",".join(sorted(PLAN.used_tokenizers.get(w.tok, [])))),
    resources:
        **res("vq_train"),
    conda:
        ENV
    log:
        f"{R}/logs/vq_train/{{tok}}.log",
    shell:
        "mkdir -p \"$(dirname {params.cfgfile:q})\" && printf '%s\\n' {params.cfg:q} > {params.cfgfile:q}.tmp$$ && "
        "mv -f {params.cfgfile:q}.tmp$$ {params.cfgfile:q} && "
        "{params.env} {params.launch}iar2 vq train --config {params.cfgfile:q} --out {params.out:q} "
        "--resume auto > {log:q} 2>&1"


rule vq_train_stage1:
    """Stage 1 of the semantic-detail tokenizer: encoder, decoder and semantic codebook (Eq. 7-8)."""
    wildcard_constraints:
        tok=TRAINED_RE,
    input:
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",  # the config's data.check_report: its bad images are skipped
    output:
        f"{R}/tokenizers/{{tok}}/stage1/vq.safetensors",
    params:
        out=lambda w: f"{R}/tokenizers/{w.tok}/stage1",
        cfg=lambda w: cfg_json(PLAN.tokenizer_config(w.tok, "stage1")),
        cfgfile=lambda w: f"{R}/configs/tokenizer/{w.tok}-stage1.yaml",
        launch=lambda w: launch("vq_train_stage1"),
        env=lambda w: tag("vq_train_stage1", f"tok/{w.tok}/stage1"),
    resources:
        **res("vq_train_stage1"),
    conda:
        ENV
    log:
        f"{R}/logs/vq_train/{{tok}}-stage1.log",
    shell:
        "mkdir -p \"$(dirname {params.cfgfile:q})\" && printf '%s\\n' {params.cfg:q} > {params.cfgfile:q}.tmp$$ && "
        "mv -f {params.cfgfile:q}.tmp$$ {params.cfgfile:q} && "
        "{params.env} {params.launch}iar2 vq train --config {params.cfgfile:q} --out {params.out:q} "
        "--resume auto > {log:q} 2>&1"


ruleorder: vq_train_stage1 > vq_train


rule recon_eval:
    """Reconstruction metrics on the val split: rFID, PSNR, SSIM, LPIPS, codebook usage (Tables 1, 13; Fig. 4)."""
    wildcard_constraints:
        tok=TRAINED_RE,
    input:
        vq=f"{R}/tokenizers/{{tok}}/vq.safetensors",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        f"{R}/tokenizers/{{tok}}/recon.json",
    params:
        e=config["recon_eval"],
        env=lambda w: tag("recon_eval", f"tok/{w.tok}", ",".join(sorted(PLAN.used_tokenizers.get(w.tok, [])))),
    resources:
        **res("recon_eval"),
    conda:
        ENV
    log:
        f"{R}/logs/recon_eval/{{tok}}.log",
    shell:
        "{params.env} iar2 vq eval --vq {input.vq:q} --data {input.data:q} --split val --report {input.report:q} "
        "--extractor {params.e[extractor]:q} --perceptual {params.e[perceptual]:q} --domain-net {input.refnet:q} "
        "--max-images {params.e[max_images]:q} --out {output:q} > {log:q} 2>&1"
