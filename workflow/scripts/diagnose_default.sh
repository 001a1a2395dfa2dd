#!/usr/bin/env bash
# Issue 16: the diagnosis of IAR2-B vs LlamaGen-B at a laptop scale, rerunnable end to end.
#   bash workflow/scripts/diagnose_default.sh [SCALE]        (default: default; writes results/SCALE/diagnose/)
# Builds only what it reads (reference network, the two tokenizers, their tokens, LlamaGen-B-16 and IAR2-B-16 at
# e300), then: tokenizer diagnostics, AR diagnostics on training and held-out (val) tokens, the budget, and the
# side-by-side LlamaGen-B-16 trained with the same config and steps on IAR2's tokens (joint vocabulary k*V_d+j).
# One thread, niced: the machine is shared.
set -euo pipefail
SCALE=${1:-default}
R=results/$SCALE
D=$R/diagnose
export OMP_NUM_THREADS=1
run() { echo "+ $*" >&2; nice -n 10 "$@"; }

DATA=$(python -c "import yaml; print(yaml.safe_load(open('params/$SCALE.yaml'))['data']['root'])")
run snakemake --cores 1 --config scale="$SCALE" -- \
    "$R/ar/llamagen-B-16/model.safetensors" "$R/ar/iar2-B-16/model.safetensors" \
    "$R/tokens/vq-16384/g16/meta.json" "$R/tokens/sd-256-4096/g16/meta.json"
COMMON=(--domain-net "$R/refnet/refnet.safetensors" --report "$R/data/check.json")
mkdir -p "$D"

for TOK in vq-16384 sd-256-4096; do
    VQ=$R/tokenizers/$TOK/vq.safetensors
    [ -f "$D/tok-$TOK.json" ] || run iar2 diagnose tokenizer --vq "$VQ" --data "$DATA" "${COMMON[@]}" \
        --out "$D/tok-$TOK.json" --png "$D/tok-$TOK-const.png"
    [ -f "$D/tokens-val/$TOK/meta.json" ] || run iar2 tokenize --vq "$VQ" --data "$DATA" --split val --aug none \
        --report "$R/data/check.json" --out "$D/tokens-val/$TOK"
done

# LlamaGen-B-16's own config and step budget, on IAR2's tokens
[ -f "$D/tokens/sd-joint/meta.json" ] || run iar2 diagnose joint-tokens --tokens "$R/tokens/sd-256-4096/g16" \
    --out "$D/tokens/sd-joint"
[ -f "$D/tokens-val/sd-joint/meta.json" ] || run iar2 diagnose joint-tokens \
    --tokens "$D/tokens-val/sd-256-4096" --out "$D/tokens-val/sd-joint"
JOINT_V=$(python -c "import json; print(json.load(open('$D/tokens/sd-joint/meta.json'))['vocab_sizes'][0])")
[ -f "$D/ar/llamagen-B-16-sdjoint/model.safetensors" ] || run iar2 ar train --config "$R/configs/ar/llamagen-B-16.yaml" \
    --set train.tokens="$D/tokens/sd-joint" model.vocab_size="$JOINT_V" name=llamagen-B-16-sdjoint \
    --out "$D/ar/llamagen-B-16-sdjoint" --resume auto

ar_diag() {  # NAME WEIGHTS VQ TRAIN_TOKENS VAL_TOKENS
    [ -f "$D/ar-$1.json" ] || run iar2 diagnose ar --ar "$2" --vq "$3" --tokens "$4" --heldout "$5" \
        "${COMMON[@]}" --data "$DATA" --cache-dir "$R/cache/reference" --scales 1.5 2.0 3.0 \
        --out "$D/ar-$1.json" --png "$D/ar-$1.png"
}
ar_diag llamagen-B-16 "$R/ar/llamagen-B-16/model_e300.safetensors" "$R/tokenizers/vq-16384/vq.safetensors" \
    "$R/tokens/vq-16384/g16" "$D/tokens-val/vq-16384"
ar_diag iar2-B-16 "$R/ar/iar2-B-16/model_e300.safetensors" "$R/tokenizers/sd-256-4096/vq.safetensors" \
    "$R/tokens/sd-256-4096/g16" "$D/tokens-val/sd-256-4096"
ar_diag llamagen-B-16-sdjoint "$D/ar/llamagen-B-16-sdjoint/model.safetensors" \
    "$R/tokenizers/sd-256-4096/vq.safetensors" "$D/tokens/sd-joint" "$D/tokens-val/sd-joint"

run iar2 diagnose budget --results "$R" --runs llamagen-B-16 iar2-B-16 --tokenizers vq-16384 sd-256-4096 \
    --out "$D/budget.json"
echo "diagnosis in $D" >&2
