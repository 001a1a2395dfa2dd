"""Data-parallel training helpers shared by the tokenizer and AR trainers.

A process learns its place from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); without it, it is a world of one and nothing is initialised.
The backend is NCCL on CUDA and gloo on CPU.

Data order is *step-addressable*: the samples of global step s are a pure function of
(seed, s), so a resumed run, or a run on a different number of processes, sees exactly the
same global batches. Epoch e visits the dataset in the permutation drawn from a generator
seeded with (seed, e); the global batch of step s takes the positions s*B .. s*B+B-1 of the
concatenated epochs. Each global batch splits into `accum` micro-batches, and each micro-batch
into `world` equal, contiguous rank shards, so summing over ranks and micro-batches always
covers the same B samples.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 chain), stable across runs and machines."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1  # torch seeds must fit in a signed 64-bit integer


# ----------------------------------------------------------------------------- process group

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (checkpoints, logs, exports)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> the GPU when CUDA is available, else the CPU; anything else as torch names it ('cuda:1').
    For one-process jobs (tokenize, evaluation); trainers place each rank with `resolve_device`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU when CUDA is available, else the CPU."""
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use device: auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment names one; return this process's place."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        log.info("process group: rank %d of %d (%s, %s)", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- collectives

def all_reduce_(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'mean', 'min', 'max'); a no-op in a world of one."""
    if info.distributed:
        red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
               "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(t, op=red)
        if op == "mean":
            t.div_(info.world_size)
    return t


def average_gradients(params, info: DistInfo) -> None:
    """Average .grad over processes, as DDP does, for modules not wrapped in DDP.

    All gradients travel in one flat buffer (one collective per call)."""
    if not info.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, info, "mean")
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def wrap_ddp(module: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel in a multi-process world, the module itself otherwise."""
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers (its state_dict has no prefixes)."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def no_sync(module: torch.nn.Module, skip: bool):
    """DDP's no_sync() (skip the gradient all-reduce of a non-final micro-batch) when it applies."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- data order

class StepSampler:
    """Deterministic, step-addressable, sharded batch sampler (see the module docstring).

    Iterating yields this rank's micro-batches from `start_step` to `end_step` (exclusive),
    `accum` per step; each item of a micro-batch is (index, epoch), so a dataset can derive
    per-sample augmentation randomness from (seed, epoch, index).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 accum: int = 1, shuffle: bool = True, start_step: int = 0, end_step: int | None = None):
        if n < 1:
            raise ValueError("StepSampler: the dataset is empty")
        if global_batch % (world_size * accum):
            raise ValueError(f"global batch {global_batch} is not divisible by world_size*grad_accum "
                             f"= {world_size}*{accum}")
        self.n, self.B, self.seed = n, global_batch, seed
        self.rank, self.world, self.accum, self.shuffle = rank, world_size, accum, shuffle
        self.start_step, self.end_step = start_step, end_step
        self.local = global_batch // (world_size * accum)
        self._perm: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            if len(self._perm) > 2:  # batches only ever straddle two consecutive epochs
                self._perm.pop(min(self._perm))
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                self._perm[epoch] = torch.randperm(self.n, generator=g)
            else:
                self._perm[epoch] = torch.arange(self.n)
        return self._perm[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """All B (index, epoch) pairs of a global step, in order."""
        pos = torch.arange(step * self.B, (step + 1) * self.B)
        epochs, offsets = pos // self.n, pos % self.n
        out = []
        for e in epochs.unique().tolist():
            sel = epochs == e
            idx = self.permutation(e)[offsets[sel]]
            out.extend((i, e) for i in idx.tolist())
        return out

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's `accum` micro-batches of a global step."""
        items = self.global_batch(step)
        per_micro = self.B // self.accum
        out = []
        for m in range(self.accum):
            lo = m * per_micro + self.rank * self.local
            out.append(items[lo:lo + self.local])
        return out

    def epoch_of(self, step: int) -> int:
        return step * self.B // self.n

    def __iter__(self):
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            yield from self.micro_batches(step)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless StepSampler has no length")
        return (self.end_step - self.start_step) * self.accum


class StepSeededDataset(torch.utils.data.Dataset):
    """Takes (index, epoch) keys from StepSampler and hands the epoch to the base dataset's
    per-sample augmentation generator (seeded by (seed, epoch, index)), so augmentation does not
    depend on workers, ranks or where a run was resumed."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key
        self.base.set_epoch(epoch)  # one process reads one sample at a time: safe
        return self.base[index]
