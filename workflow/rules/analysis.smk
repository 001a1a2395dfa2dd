# Stage: tokens for AR training, IAR codebook rearrangement, analyses (Figure 3 code distance, Figure 8 loss
# curves), and the index of everything the report reads.


rule tokenize:
    """Codes of the train split at one of the paper's grids (16x16 / 24x24 -> an image size per scale), with
    LlamaGen's augmentations, memory-mapped; resumes after a kill."""
    input:
        vq=f"{R}/{layout.vq('{tok}')}",
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        f"{R}/{layout.tokens_meta('{tok}', '{grid}')}",
    params:
        aug=SCALE_CFG.tokenize.aug,
        size=lambda w: PLAN.image_size(int(w.grid)),
        out=lambda w: f"{R}/{layout.tokens_dir(w.tok, w.grid)}",
    resources:
        **res("tokenize"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('tokenize', '{tok}-g{grid}')}",
    shell:
        "iar2 tokenize --vq {input.vq:q} --data {input.data:q} --split train --report {input.report:q} "
        "--aug {params.aug:q} --image-size {params.size:q} --out {params.out:q} --resume > {log:q} 2>&1"


rule rearrange:
    """IAR codebook rearrangement: balanced k-means clusters, permutation, rearranged tokenizer."""
    input:
        vq=f"{R}/{layout.vq('{tok}')}",
    output:
        f"{R}/{layout.rearrange_summary(layout.rearranged('{tok}'))}",
        f"{R}/{layout.vq(layout.rearranged('{tok}'))}",
    params:
        r=config["rearrange"],
        out=lambda w: f"{R}/{layout.tokenizer_dir(layout.rearranged(w.tok))}",
    resources:
        **res("rearrange"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('rearrange', '{tok}')}",
    shell:
        "iar2 rearrange --vq {input.vq:q} --clusters {params.r[clusters]:q} --seed {params.r[seed]:q} "
        "--out {params.out:q} > {log:q} 2>&1"


rule code_distance:
    """Figure 3: MSE and LPIPS of decodes whose codes are replaced at growing code distance."""
    input:
        vq=f"{R}/{layout.vq('{tok}')}",
        refnet=f"{R}/{layout.refnet()}",
        data=DATA["root"],
        # `iar2 code-distance` has no --report yet: declared so the scan of the images it decodes comes first
        report=f"{R}/{layout.data_check()}",
    output:
        f"{R}/{layout.code_distance('{tok}')}",
    params:
        n=SCALE_CFG.code_distance.num_images,
        perceptual=SCALE_CFG.recon_eval.perceptual,
    resources:
        **res("code_distance"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('code_distance', '{tok}')}",
    shell:
        "iar2 code-distance --vq {input.vq:q} --data {input.data:q} --split val --num-images {params.n:q} "
        "--perceptual {params.perceptual:q} --domain-net {input.refnet:q} --out {output:q} > {log:q} 2>&1"


rule loss_curves:
    """Figure 8: the semantic and detail cross-entropy of each IAR2 size over training, in one CSV."""
    input:
        [f"{R}/{layout.ar_weights(r)}" for r in LOSS_RUNS],
    output:
        f"{R}/{layout.LOSS_CURVES}",
    log:
        f"{R}/{layout.log('loss_curves')}",
    localrule: True
    run:
        write_loss_curves(PLAN, LOSS_RUNS, output[0])


rule registry_index:
    """results/<scale>/registry.json: every table row and figure point -> the file and field holding our number
    (what the report reads; rewritten when the registry or the scale changes)."""
    output:
        f"{R}/{layout.REGISTRY_INDEX}",
    params:
        index=json.dumps(PLAN.index().to_dict(), sort_keys=True),  # a registry or scale change rewrites it
    log:
        f"{R}/{layout.log('registry_index')}",
    localrule: True
    run:
        write_index(PLAN, output[0], workflow.basedir)


rule summary:
    """results/<scale>/summary.json: the headline numbers of every run, flat (DVC metrics)."""
    input:
        ALL_TARGETS,
    output:
        f"{R}/{layout.SUMMARY}",
    log:
        f"{R}/{layout.log('summary')}",
    localrule: True
    run:
        write_summary(PLAN, output[0])
