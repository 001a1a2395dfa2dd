#!/usr/bin/env bash
# GPU readiness: the whole DAG at the `gpu` scale (every rule and model family, bf16 autocast on CUDA), then a
# throughput probe (GPT-B training under DDP and FSDP in a torchrun world of one, tokens/s and MFU; decode
# ms/step of LlamaGen-B and IAR2-B against the weights-read bound; peak memory). Writes one JSON:
#
#     bash workflow/scripts/gpu_check.sh [OUT.json]        (default results/gpu/gpu_check.json; budget 540 s)
#
# Exits non-zero when there is no GPU, the DAG fails, or either part runs past its time limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/gpu/gpu_check.json}
DAG_LIMIT=${DAG_LIMIT:-420}      # the DAG's share of the 540 s; the probe gets the rest
PROBE_LIMIT=${PROBE_LIMIT:-110}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
mkdir -p "$(dirname "$OUT")"
t0=$(date +%s)
timeout "$DAG_LIMIT" snakemake --cores "$(nproc)" reproduce_all --config scale=gpu > "$(dirname "$OUT")/dag.log" 2>&1 \
  || { echo "gpu_check: the gpu-scale DAG failed or exceeded ${DAG_LIMIT}s (see $(dirname "$OUT")/dag.log)"; tail -40 "$(dirname "$OUT")/dag.log"; exit 1; }
t1=$(date +%s)
timeout "$PROBE_LIMIT" torchrun --standalone --nproc-per-node=1 workflow/scripts/gpu_probe.py --out "$OUT.probe"
t2=$(date +%s)
python - "$OUT" "$((t1 - t0))" "$((t2 - t1))" <<'PY'
import json, sys
out, dag_s, probe_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
probe = json.load(open(out + ".probe"))
summary = json.load(open("results/gpu/summary.json"))
report = {"dag_seconds": dag_s, "probe_seconds": probe_s, "total_seconds": dag_s + probe_s,
          "dag_outputs": len(summary), **probe}
json.dump(report, open(out, "w"), indent=2)
print(f"gpu_check: DAG {dag_s} s, probe {probe_s} s -> {out}")
PY
