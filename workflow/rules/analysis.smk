# Stage: tokens for AR training, IAR codebook rearrangement, code-distance analysis (Figure 3).


rule tokenize:
    """Codes of the train split with LlamaGen's augmentations, memory-mapped; resumes after a kill."""
    input:
        vq=f"{R}/tokenizers/{{name}}/vq.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        f"{R}/tokens/{{name}}/train/meta.json",
    params:
        aug=config.get("tokenize", {}).get("aug", "flip"),
        out=lambda w: f"{R}/tokens/{w.name}/train",
    log:
        f"{R}/logs/tokenize/{{name}}.log",
    shell:
        "iar2 tokenize --vq {input.vq} --data {input.data} --split train --report {input.report} "
        "--aug {params.aug} --out {params.out} --resume > {log} 2>&1"


rule rearrange:
    """IAR codebook rearrangement: balanced k-means clusters, permutation, rearranged tokenizer."""
    input:
        vq=f"{R}/tokenizers/{{name}}/vq.safetensors",
    output:
        f"{R}/tokenizers/{{name}}-rearranged/summary.json",
        f"{R}/tokenizers/{{name}}-rearranged/vq.safetensors",
    params:
        r=config.get("rearrange", {}),
        out=lambda w: f"{R}/tokenizers/{w.name}-rearranged",
    log:
        f"{R}/logs/rearrange/{{name}}.log",
    shell:
        "iar2 rearrange --vq {input.vq} --clusters {params.r[clusters]} --seed {params.r[seed]} "
        "--out {params.out} > {log} 2>&1"


rule code_distance:
    """Figure 3: MSE and LPIPS of decodes whose codes are replaced at growing code distance."""
    input:
        vq=f"{R}/tokenizers/{{name}}/vq.safetensors",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
    output:
        f"{R}/analysis/code_distance/{{name}}.json",
    params:
        n=config.get("code_distance", {}).get("num_images", 32),
    log:
        f"{R}/logs/code_distance/{{name}}.log",
    shell:
        "iar2 code-distance --vq {input.vq} --data {input.data} --split val --num-images {params.n} "
        "--perceptual domain --domain-net {input.refnet} --out {output} > {log} 2>&1"
