"""Data parallelism: deterministic sharded data order, and 2 gloo processes = 1 process on the same global batch.

The equivalence runs have the discriminator off (disc_start beyond the run): its BatchNorm normalises each
process's half-batch on its own (as in LlamaGen's DDP training), so with the GAN on, two processes are not the
same computation as one. What DDP does guarantee for the discriminator, identical parameters on every process
after each update (gradients averaged), is tested separately.
"""
from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import helpers
from helpers import random_images
from iar2.checkpoint import load_weights, save_weights
from iar2.config import deep_merge, from_dict, to_dict
from iar2.distributed import DistInfo, StepSampler, mix_seed
from iar2.tokenizer.config import TokenizerRunConfig

# this module's runs, over helpers.make_cfg's tiny VQ at 16 px: 2 steps, each logged
RUN_BASE = {"loss": {"semantic_l2_weight": 1.0},
            # lr 1e-4: Adam turns gradients at float-noise level (e.g. attention key biases, whose true gradient
            # is 0) into steps of up to lr, so weight differences scale with lr (measured 5.7e-7 at lr 1e-4)
            "train": {"steps": 2, "lr": 5e-5, "log_every": 1, "ckpt_every": 100}}


def make_cfg(root, **sections) -> TokenizerRunConfig:
    return helpers.make_cfg(root, RUN_BASE, **sections)


def variants(root, stage1: str) -> dict[str, TokenizerRunConfig]:
    return {
        "single": make_cfg(root),
        # dual stage 2: three optimisers, a semantic-only step (step 3), unused parameters, grad accumulation
        "stage2_accum": make_cfg(root, model={"quantizer": "semantic_detail"},
                                 train={"stage": "stage2", "init_from": stage1, "steps": 3, "grad_accum": 2}),
    }


# ----------------------------------------------------------------------------- data order

def test_step_sampler_partitions_global_batches():
    n, B = 37, 12  # batches straddle epochs
    one = StepSampler(n, B, seed=5)
    for e in range(3):  # each epoch is a permutation
        assert sorted(one.permutation(e).tolist()) == list(range(n))
    assert not torch.equal(one.permutation(0), one.permutation(1))
    assert not torch.equal(StepSampler(n, B, seed=6).permutation(0), one.permutation(0))
    # positions s*B .. s*B+B-1 of the concatenated epochs
    flat = [(i, e) for e in range(4) for i in one.permutation(e).tolist()]
    for s in range(8):
        assert one.global_batch(s) == flat[s * B:(s + 1) * B]
    # rank shards and micro-batches tile each global batch, in order
    for world, accum in ((2, 1), (2, 3), (3, 2), (1, 4)):
        shards = [StepSampler(n, B, 5, rank=r, world_size=world, accum=accum) for r in range(world)]
        for s in range(5):
            per_rank = [sh.micro_batches(s) for sh in shards]
            tiled = [item for m in range(accum) for r in range(world) for item in per_rank[r][m]]
            assert tiled == one.global_batch(s)
            assert all(len(mb) == B // (world * accum) for pr in per_rank for mb in pr)
    # resuming at a step gives the tail of the uninterrupted order
    full = list(StepSampler(n, B, 5, accum=2, end_step=6))
    assert list(StepSampler(n, B, 5, accum=2, start_step=4, end_step=6)) == full[8:]
    assert len(StepSampler(n, B, 5, accum=2, start_step=4, end_step=6)) == 4
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(n, 10, 0, world_size=4)


def test_mix_seed_is_stable_and_spread():
    assert mix_seed(0, 0) == mix_seed(0, 0) and 0 <= mix_seed(0, 0) < 2 ** 63
    seeds = {mix_seed(s, e) for s in range(20) for e in range(20)}
    assert len(seeds) == 400


# ----------------------------------------------------------------------------- process equivalence

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch() -> torch.Tensor:
    return random_images(8, 16, seed=7)


def _worker(rank: int, world: int, port: int, root: str, stage1: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from iar2.distributed import cleanup, init_distributed
    from iar2.tokenizer.train import VQTrainer, train

    info = init_distributed("cpu")
    try:
        for name, cfg in variants(root, stage1).items():
            train(cfg, Path(out) / name, info=info)
        # gradients of one step on a fixed global batch of 8, 4 images per process
        trainer = VQTrainer(variants(root, stage1)["single"], info)
        trainer.train_step(0, [global_batch()[4 * rank:4 * (rank + 1)]])
        if rank == 0:
            save_weights(Path(out) / "grads.safetensors",
                         {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None})
        # discriminator: different data on each process, parameters must stay identical
        cfg = make_cfg(root, loss={"disc_start": 0})
        trainer = VQTrainer(cfg, info)
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(2):
            trainer.train_step(step, [torch.rand(4, 3, 16, 16, generator=g) * 2 - 1])
        params = {k: p.detach() for k, p in trainer.disc.named_parameters()}
        save_weights(Path(out) / f"disc_rank{rank}.safetensors", params)
    finally:
        cleanup()


@pytest.fixture(scope="module")
def stage1(tiny_data, tmp_path_factory) -> str:
    from iar2.tokenizer.train import train

    cfg = make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, train={"stage": "stage1", "steps": 2})
    return str(train(cfg, tmp_path_factory.mktemp("ddp_stage1"))["weights"])


def test_two_processes_match_one(tiny_data, stage1, tmp_path):
    from iar2.tokenizer.train import VQTrainer, train

    ddp_out = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_data), stage1, str(ddp_out)), nprocs=2, join=True)

    for name, cfg in variants(tiny_data, stage1).items():
        # one process, the same global batches, no accumulation
        single = from_dict(TokenizerRunConfig, deep_merge(to_dict(cfg), {"train": {"grad_accum": 1}}))
        train(single, tmp_path / "one" / name, info=DistInfo())
        a = load_weights(tmp_path / "one" / name / "vq.safetensors")
        b = load_weights(ddp_out / name / "vq.safetensors")
        init = load_weights(stage1) if name.startswith("stage2") else VQTrainer(cfg, DistInfo()).model.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
        moved = max((a[k] - init[k]).abs().max().item() for k in a if k in init)
        assert moved > 5e-5  # the updates are far larger than the tolerance
        # the logged losses (averaged over processes) agree too
        ra, rb = (list(csv.DictReader(open(d / name / "metrics.csv"))) for d in (tmp_path / "one", ddp_out))
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb):
            for k in x:
                if k not in ("steps_per_s",) and x[k]:
                    assert float(y[k]) == pytest.approx(float(x[k]), rel=1e-5, abs=1e-7), (name, k)

    trainer = VQTrainer(variants(tiny_data, stage1)["single"], DistInfo())
    trainer.train_step(0, [global_batch()])
    grads = load_weights(ddp_out / "grads.safetensors")
    assert grads.keys() == {k for k, p in trainer.model.named_parameters() if p.grad is not None}
    for k, p in trainer.model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"grad {k}: {m}")

    d0, d1 = (load_weights(ddp_out / f"disc_rank{r}.safetensors") for r in range(2))
    for k in d0:
        assert torch.equal(d0[k], d1[k]), k
