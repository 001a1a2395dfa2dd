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
        f"{R}/{layout.vq('{tok}')}",
    params:
        out=lambda w: f"{R}/{layout.tokenizer_dir(w.tok)}",
        cfg=lambda w: cfg_json(PLAN.tokenizer_config(w.tok, final_stage(w))),
        cfgfile=lambda w: f"{R}/{layout.job_config('tokenizer', f'{w.tok}-{final_stage(w)}')}",
        launch=lambda w: launch("vq_train"),
        env=lambda w: tag("vq_train", tok_run_id(w.tok), ",".join(sorted(PLAN.used_tokenizers.get(w.tok, [])))),
    resources:
        **res("vq_train"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('vq_train', '{tok}')}",
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
        refnet=f"{R}/{layout.refnet()}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",  # the config's data.check_report: its bad images are skipped
    output:
        f"{R}/{layout.stage1_vq('{tok}')}",
    params:
        out=lambda w: f"{R}/{layout.stage1_dir(w.tok)}",
        cfg=lambda w: cfg_json(PLAN.tokenizer_config(w.tok, "stage1")),
        cfgfile=lambda w: f"{R}/{layout.job_config('tokenizer', f'{w.tok}-stage1')}",
        launch=lambda w: launch("vq_train_stage1"),
        env=lambda w: tag("vq_train_stage1", f"{tok_run_id(w.tok)}/stage1"),
    resources:
        **res("vq_train_stage1"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('vq_train', '{tok}-stage1')}",
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
        vq=f"{R}/{layout.vq('{tok}')}",
        refnet=f"{R}/{layout.refnet()}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        f"{R}/{layout.recon('{tok}')}",
    params:
        e=config["recon_eval"],
        env=lambda w: tag("recon_eval", tok_run_id(w.tok), ",".join(sorted(PLAN.used_tokenizers.get(w.tok, [])))),
    resources:
        **res("recon_eval"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('recon_eval', '{tok}')}",
    shell:
        "{params.env} iar2 vq eval --vq {input.vq:q} --data {input.data:q} --split val --report {input.report:q} "
        "--extractor {params.e[extractor]:q} --perceptual {params.e[perceptual]:q} --domain-net {input.refnet:q} "
        "--max-images {params.e[max_images]:q} --out {output:q} > {log:q} 2>&1"
