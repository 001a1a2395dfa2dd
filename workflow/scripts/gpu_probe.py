"""Throughput probe of a GPU node, one JSON: training (DDP and FSDP wraps, bf16 autocast) and decode speed.

Run under torchrun with one process (gpu_check.sh does), so the trainers' process-group path is the one used:

    torchrun --standalone --nproc-per-node=1 workflow/scripts/gpu_probe.py --out results/gpu/probe.json

- training: GPT-B (LlamaGen-B) steps in bf16 autocast, wrapped in DDP and then in FSDP (the wrap
  iar2.ar.train uses: one unit per TransformerBlock, bf16 params, fp32 reduce); tokens/s and MFU
  (6 x params x tokens per step over the GPU's dense bf16 peak);
- decode: ms/step of LlamaGen-B and IAR2-B (batch 4 + 4 CFG rows, 16x16) against the weights-read bound
  (iar2 bench sample's measure, bf16 weights), eager and with the backbone step compiled on static caches
  (CUDA graphs), and the KV-cache speed-up estimated from 5 positions;
- peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def train_probe(wrap: str, steps: int, batch: int) -> dict:
    from iar2.ar.gpt import TransformerBlock
    from iar2.ar.model import ARModel, ARModelConfig
    from iar2.ar.train import peak_flops

    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cfg = ARModelConfig(size="B", paradigm="single", vocab_size=16384, grid=16, num_classes=1000)
    cfg.validate()
    torch.manual_seed(0)
    model = ARModel(cfg).to(dev)
    n = sum(p.numel() for p in model.parameters())
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index])
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        net = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({TransformerBlock}), device_id=dev,
                   mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 16384, (batch, 256), device=dev)
    labels = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(net(tokens, labels), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        loss = step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    tps = batch * 256 / best
    peak = peak_flops(dev)
    return {"wrap": wrap, "params_m": n / 1e6, "batch": batch, "ms_per_step_min": best * 1e3,
            "tokens_per_s": tps, "mfu": 6 * n * tps / peak if peak else None, "loss": float(loss),
            "finite": bool(torch.isfinite(loss))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from iar2.bench import sample as bench_sample
    from iar2.distributed import init_distributed

    info = init_distributed("cuda")
    if not dist.is_initialized():  # a world of one: join it anyway, so DDP and FSDP wrap as on a cluster
        dist.init_process_group("nccl", rank=0, world_size=1)
    report = {"device": torch.cuda.get_device_name(info.device), "torch": torch.__version__, "train": []}
    for wrap in ("ddp", "fsdp"):
        report["train"].append(train_probe(wrap, args.train_steps, args.batch))
        torch.cuda.empty_cache()
    sp = argparse.ArgumentParser()
    bench_sample.add_bench_arguments(sp)
    dec = bench_sample.measure(sp.parse_args(["--dtype", "bf16", "--repeats", str(args.repeats), "--kv-repeats", "0",
                                              "--kv-positions", "5", "--compile", "--device", "cuda"]))
    report["decode"] = dec["results"]
    report["commit"] = dec["commit"]
    report["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(bench_sample.report(dec))
    print(json.dumps(report["train"], indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
