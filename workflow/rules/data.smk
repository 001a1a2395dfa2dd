# Stage: datasets and the domain reference network.

if DATA["source"] == "builtin":

    rule builtin_data:
        """Materialise the built-in photographic dataset (offline) as an ImageFolder with train/val."""
        output:
            directory(DATA["root"]),
        params:
            b=DATA["builtin"],
        conda:
            ENV
        log:
            f"{R}/{layout.log('builtin_data')}",
        localrule: True
        shell:
            "iar2 data builtin --out {output:q} --num-classes {params.b[num_classes]:q} "
            "--train-per-class {params.b[train_per_class]:q} --val-per-class {params.b[val_per_class]:q} "
            "--size {params.b[size]:q} --seed {params.b[seed]:q} > {log:q} 2>&1"

else:

    rule dataset_missing:
        """An ImageFolder the pipeline cannot make (ImageNet): say where it must be and how to get it."""
        output:
            directory(DATA["root"]),
        params:
            scale=SCALE,
        localrule: True
        shell:
            "printf 'Dataset %s is missing. Download ImageNet-1k (ILSVRC2012) from https://image-net.org "
            "(login required) and unpack it as %s/train/<wnid>/*.JPEG and %s/val/<wnid>/*.JPEG "
            "(val sorted into class folders), or set data.root in params/%s.yaml.\\n' "
            "{output:q} {output:q} {output:q} {params.scale:q} >&2; exit 1"


rule data_check:
    """Scan the dataset once: unreadable images are listed (and later skipped) with counts."""
    input:
        DATA["root"],
    output:
        f"{R}/{layout.data_check()}",
    resources:
        **res("data_check"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('data_check')}",
    shell:
        "iar2 data check --root {input:q} --out {output:q} > {log:q} 2>&1"


rule refnet:
    """Train the domain reference network on the train split (offline LPIPS backend and metric features)."""
    input:
        data=DATA["root"],
        report=f"{R}/{layout.data_check()}",
    output:
        f"{R}/{layout.refnet()}",
    params:
        r=config["refnet"],
    # Nothing else can run while it trains (every tokenizer's perceptual loss needs it): a scale may give it
    # more threads (refnet.threads; Snakemake caps them at --cores).
    threads: SCALE_CFG.refnet.threads
    resources:
        **res("refnet"),
    conda:
        ENV
    log:
        f"{R}/{layout.log('refnet')}",
    shell:
        "iar2 refnet train --data {input.data:q} --report {input.report:q} --out {output:q} "
        "--steps {params.r[steps]:q} --batch-size {params.r[batch_size]:q} --input-size {params.r[input_size]:q} "
        "--seed {params.r[seed]:q} > {log:q} 2>&1"
