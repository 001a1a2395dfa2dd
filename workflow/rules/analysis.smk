# Stage: tokens for AR training, IAR codebook rearrangement, analyses (Figure 3 code distance, Figure 8 loss
# curves), and the index of everything the report reads.


rule tokenize:
    """Codes of the train split at one of the paper's grids (16x16 / 24x24 -> an image size per scale), with
    LlamaGen's augmentations, memory-mapped; resumes after a kill."""
    input:
        vq=f"{R}/tokenizers/{{tok}}/vq.safetensors",
        data=DATA["root"],
        report=f"{R}/data/check.json",
    output:
        f"{R}/tokens/{{tok}}/g{{grid}}/meta.json",
    params:
        aug=config.get("tokenize", {}).get("aug", "flip"),
        size=lambda w: PLAN.image_size(int(w.grid)),
        out=lambda w: f"{R}/tokens/{w.tok}/g{w.grid}",
    resources:
        **res("tokenize"),
    log:
        f"{R}/logs/tokenize/{{tok}}-g{{grid}}.log",
    shell:
        "iar2 tokenize --vq {input.vq} --data {input.data} --split train --report {input.report} "
        "--aug {params.aug} --image-size {params.size} --out {params.out} --resume > {log} 2>&1"


rule rearrange:
    """IAR codebook rearrangement: balanced k-means clusters, permutation, rearranged tokenizer."""
    input:
        vq=f"{R}/tokenizers/{{tok}}/vq.safetensors",
    output:
        f"{R}/tokenizers/{{tok}}-rearranged/summary.json",
        f"{R}/tokenizers/{{tok}}-rearranged/vq.safetensors",
    params:
        r=config["rearrange"],
        out=lambda w: f"{R}/tokenizers/{w.tok}-rearranged",
    resources:
        **res("rearrange"),
    log:
        f"{R}/logs/rearrange/{{tok}}.log",
    shell:
        "iar2 rearrange --vq {input.vq} --clusters {params.r[clusters]} --seed {params.r[seed]} "
        "--out {params.out} > {log} 2>&1"


rule code_distance:
    """Figure 3: MSE and LPIPS of decodes whose codes are replaced at growing code distance."""
    input:
        vq=f"{R}/tokenizers/{{tok}}/vq.safetensors",
        refnet=f"{R}/refnet/refnet.safetensors",
        data=DATA["root"],
    output:
        f"{R}/analysis/code_distance/{{tok}}.json",
    params:
        n=config.get("code_distance", {}).get("num_images", 32),
        perceptual=config["recon_eval"].get("perceptual", "domain"),
    resources:
        **res("code_distance"),
    log:
        f"{R}/logs/code_distance/{{tok}}.log",
    shell:
        "iar2 code-distance --vq {input.vq} --data {input.data} --split val --num-images {params.n} "
        "--perceptual {params.perceptual} --domain-net {input.refnet} --out {output} > {log} 2>&1"


LOSS_RUNS = [s["run"][len("ar/"):] for f in PLAN.figures.values() if f["kind"] == "loss_curves" for s in f["series"]]


rule loss_curves:
    """Figure 8: the semantic and detail cross-entropy of each IAR2 size over training, in one CSV."""
    input:
        [f"{R}/ar/{r}/model.safetensors" for r in LOSS_RUNS],
    output:
        f"{R}/analysis/loss_curves.csv",
    params:
        runs=LOSS_RUNS,
    localrule: True
    run:
        import pandas as pd

        from iar2.io import atomic_write_text

        frames = []
        for rid in params.runs:
            df = pd.read_csv(f"{R}/ar/{rid}/metrics.csv")
            r = PLAN.runs[rid]
            df = df[[c for c in ("step", "epoch", "semantic_ce", "detail_ce", "loss") if c in df]]
            frames.append(df.assign(run=f"ar/{rid}", label=f"{PLAN.families[r.family]['label']}-{r.size}"))
        atomic_write_text(output[0], pd.concat(frames).to_csv(index=False))


rule registry_index:
    """results/<scale>/registry.json: every table row and figure point -> the file and field holding our number
    (what the report reads; rewritten when the registry or the scale changes)."""
    output:
        f"{R}/registry.json",
    params:
        index=json.dumps(PLAN.index(), sort_keys=True),
    localrule: True
    run:
        import subprocess

        from iar2.io import atomic_write_json

        index = json.loads(params.index)
        try:
            index["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                 cwd=workflow.basedir, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            index["git_commit"] = "unknown"
        atomic_write_json(output[0], index)


rule summary:
    """results/<scale>/summary.json: the headline numbers of every run, flat (DVC metrics)."""
    input:
        ALL_TARGETS,
    output:
        f"{R}/summary.json",
    localrule: True
    run:
        from iar2.io import atomic_write_json

        flat = {}
        for tok in TRAINED:
            p = Path(f"{R}/tokenizers/{tok}/recon.json")
            if p.is_file():
                d = json.loads(p.read_text())
                flat.update({f"tok/{tok}.{k}": d[k] for k in ("rfid", "psnr", "ssim") if k in d})
        for s in PLAN.samples.values():
            p = Path(f"{R}/ar/{s.id}/metrics.json")
            if not s.is_grid and p.is_file():
                d = json.loads(p.read_text())
                flat.update({f"ar/{s.id}.{k}": d[k] for k in ("fid", "isc_mean", "precision", "recall") if k in d})
        atomic_write_json(output[0], dict(sorted(flat.items())))
