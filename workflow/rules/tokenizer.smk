# Stage: VQ tokenizers (single, semantic-detail dual in two stages, unassociated dual) and their evaluation.
import re

TRAINED = "|".join(re.escape(n) for n in VARIANTS)  # rearranged tokenizers come from rule rearrange


rule tokenizer_config:
    wildcard_constraints:
        name=TRAINED,
    """Write one variant's resolved run config; it changes (and reruns training) only when the config does."""
    output:
        f"{R}/configs/tokenizer/{{name}}-{{stage}}.yaml",
    params:
        cfg=lambda w: json.dumps(tokenizer_config(w.name, w.stage), sort_keys=True),
    localrule: True
    run:
        from iar2.io import atomic_write_text

        atomic_write_text(output[0], yaml.safe_dump(json.loads(params.cfg), sort_keys=False))


def _stage_of(w):
    return "stage2" if is_dual_sd(w.name) else "single"


def _train_inputs(w):
    stage = _stage_of(w)
    inp = {"config": f"{R}/configs/tokenizer/{w.name}-{stage}.yaml",
           "refnet": f"{R}/refnet/refnet.safetensors", "data": DATA["root"]}
    if stage == "stage2":
        inp["init"] = f"{R}/tokenizers/{w.name}/stage1/vq.safetensors"
    return inp


rule vq_train:
    wildcard_constraints:
        name=TRAINED,
    """Train one tokenizer stage; a killed or preempted job resumes from its latest checkpoint."""
    input:
        unpack(_train_inputs),
    output:
        f"{R}/tokenizers/{{name}}/vq.safetensors",
    params:
        out=lambda w: run_dir(w.name, _stage_of(w)),
    log:
        f"{R}/logs/vq_train/{{name}}.log",
    shell:
        "iar2 vq train --config {input.config} --out {params.out} --resume auto > {log} 2>&1"


rule vq_train_stage1:
    wildcard_constraints:
        name=TRAINED,
    """Stage 1 of the semantic-detail tokenizer: encoder, decoder and semantic codebook (Eq. 7-8)."""
    input:
        config=f"{R}/configs/tokenizer/{{name}}-stage1.yaml",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
    output:
        f"{R}/tokenizers/{{name}}/stage1/vq.safetensors",
    params:
        out=lambda w: run_dir(w.name, "stage1"),
    log:
        f"{R}/logs/vq_train/{{name}}-stage1.log",
    shell:
        "iar2 vq train --config {input.config} --out {params.out} --resume auto > {log} 2>&1"


ruleorder: vq_train_stage1 > vq_train


rule recon_eval:
    wildcard_constraints:
        name=TRAINED,
    """Reconstruction metrics on the val split: rFID, PSNR, SSIM, LPIPS, codebook usage (Tables 1, 7, 13)."""
    input:
        vq=f"{R}/tokenizers/{{name}}/vq.safetensors",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        f"{R}/tokenizers/{{name}}/recon.json",
    params:
        e=config["recon_eval"],
    log:
        f"{R}/logs/recon_eval/{{name}}.log",
    shell:
        "iar2 vq eval --vq {input.vq} --data {input.data} --split val --report {input.report} "
        "--extractor {params.e[extractor]} --perceptual {params.e[perceptual]} --domain-net {input.refnet} "
        "--max-images {params.e[max_images]} --out {output} > {log} 2>&1"
