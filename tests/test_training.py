"""The shared training loop (iar2/training.py) on a toy job: exact resume, checkpoint cadence, budgets, the
non-finite guard. The AR, tokenizer and reference-network tests run the same loop on the real trainers."""
from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch

from iar2 import fingerprint
from iar2.checkpoint import latest_checkpoint, load_checkpoint, load_weights, rng_state, save_weights, set_rng_state
from iar2.distributed import DistInfo
from iar2.training import Job, Loop, NonFiniteError, NonFiniteGuard, checkpoint_to_resume, grad_norm


class Toy(Job):
    """w <- Adam step on |w - x|^2 plus noise from the global RNG (as dropout draws), so an exact resume needs the
    weights, the optimiser moments and the RNG state. `nan_at`: 1-based steps whose loss is NaN; `blow_up_at`:
    a step after which the weights are set to Inf through finite gradients (as a huge learning rate does)."""

    def __init__(self, seed=0, budget=0, nan_at=(), blow_up_at=None):
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 1, bias=False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.guard = NonFiniteGuard(budget, what="toy train")
        self.nan_at, self.blow_up_at = set(nan_at), blow_up_at
        self.last, self.steps_run = math.nan, []

    def train_step(self, step, micro):
        self.steps_run.append(step)
        (x,) = micro
        w = self.model.weight[0]
        loss = ((w - x) ** 2).sum() + (torch.randn(3) * w).sum()
        if step + 1 in self.nan_at:
            loss = loss * math.nan
        loss.backward()
        if self.guard.allow(step + 1, float(loss.detach()), "loss") and \
                self.guard.allow(step + 1, grad_norm(self.model.parameters())):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if step + 1 == self.blow_up_at:
            with torch.no_grad():
                self.model.weight.fill_(math.inf)
        self.last = float(loss.detach())

    def pop_metrics(self, step, steps_per_s):
        return {"loss": self.last, "steps_per_s": steps_per_s}

    def checkpoint_state(self, step):
        return {"model": self.model}, {"opt": self.opt}, {"rng": rng_state()}

    def load(self, ckpt):
        meta = load_checkpoint(ckpt, {"model": self.model}, {"opt": self.opt})
        set_rng_state(meta["rng"])
        return meta

    def export(self, run_dir, step, elapsed):
        save_weights(run_dir / "toy.safetensors", self.model.state_dict(), {"step": step})


def batches(start):
    """Step-addressable data: the batch of step s is a function of s, wherever a run starts."""
    return (torch.full((3,), float(s % 5)) for s in itertools.count(start))


def run(run_dir, total=6, stop_after=None, resume=None, ckpt_every=2, max_seconds=None, config=None, **toy):
    job = Toy(**toy)
    fp = fingerprint.fingerprint("toy", config or {"total": total})
    ckpt = checkpoint_to_resume(run_dir, resume, fp, "toy train", True)
    loop = Loop(job, DistInfo(), run_dir, desc="toy", log_every=2, ckpt_every=ckpt_every, keep_last=10)
    loop.restore(ckpt, auto=resume == "auto")
    loop.open_log(config or {"total": total})
    end = total if stop_after is None else min(total, loop.start + stop_after)
    finished = loop.run(batches(loop.start), end, total, max_seconds=max_seconds)
    return job, loop, finished


def steps_on_disk(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, _, finished = run(tmp_path / "whole")
    assert finished and steps_on_disk(tmp_path / "whole") == ["step_0000002", "step_0000004", "step_0000006"]

    first, loop, finished = run(tmp_path / "cut", stop_after=3)  # a scheduler's limit after step 3
    assert not finished and loop.last_checkpoint.name == "step_0000003"
    assert not (tmp_path / "cut" / "toy.safetensors").exists()
    second, loop, finished = run(tmp_path / "cut", resume="auto")
    assert finished and loop.start == 3 and second.steps_run == [3, 4, 5]

    a, b = tmp_path / "whole", tmp_path / "cut"
    assert same_tensors(load_weights(a / "toy.safetensors"), load_weights(b / "toy.safetensors"))
    for f in ("model", "optim"):
        assert same_tensors(load_weights(a / "checkpoints/step_0000006" / f"{f}.safetensors"),
                            load_weights(b / "checkpoints/step_0000006" / f"{f}.safetensors"))
    # the log reads as one run: rows at the logging steps, the stop's row kept (its checkpoint is where it resumed)
    rows = list(csv.DictReader(open(b / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "3", "4", "6"]
    assert json.loads((b / "toy.json").read_text())["step"] == 6
    assert json.loads((b / "checkpoints" / "FINGERPRINT.json").read_text())["complete"]


def test_checkpoint_cadence_and_what_a_rerun_does(tmp_path):
    run(tmp_path / "r", total=7, ckpt_every=3)
    assert steps_on_disk(tmp_path / "r") == ["step_0000003", "step_0000006", "step_0000007"]  # and the last step
    meta = json.loads((tmp_path / "r" / "checkpoints" / "step_0000007" / "meta.json").read_text())
    assert meta["step"] == 7 and meta["nonfinite_skipped"] == 0 and meta["elapsed_s"] > 0
    # the run had finished: `--resume auto` sets its checkpoints aside and trains again, to the same weights
    before = load_weights(tmp_path / "r" / "toy.safetensors")
    job, loop, _ = run(tmp_path / "r", total=7, ckpt_every=3, resume="auto")
    assert loop.start == 0 and (tmp_path / "r" / "checkpoints.stale").is_dir()
    assert same_tensors(before, load_weights(tmp_path / "r" / "toy.safetensors"))
    # a changed config does not continue the old checkpoints either
    run(tmp_path / "c", stop_after=2)
    _, loop, _ = run(tmp_path / "c", resume="auto", config={"total": 6, "lr": 1})
    assert loop.start == 0 and (tmp_path / "c" / "checkpoints.stale" / "step_0000002").is_dir()


def test_a_non_finite_step_is_skipped_within_the_budget_and_stops_the_run_past_it(tmp_path):
    with pytest.raises(NonFiniteError, match=r"toy train: non-finite loss \(nan\) at step 5\b.*step_0000004"):
        run(tmp_path / "r", nan_at={5})
    assert latest_checkpoint(tmp_path / "r").name == "step_0000004"  # nothing written from the bad step

    # with one skip allowed the run resumes from step 4 and finishes; the skip is counted in its checkpoints
    job, loop, finished = run(tmp_path / "r", resume="auto", budget=1, nan_at={5})
    assert finished and loop.start == 4 and job.guard.skipped == 1
    meta = json.loads((tmp_path / "r" / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["nonfinite_skipped"] == 1
    # the count survives a resume: a second spike goes past the budget of 1
    run(tmp_path / "s", budget=1, nan_at={2}, stop_after=3)
    with pytest.raises(NonFiniteError, match=r"step 5\b.*1 earlier step\(s\) were skipped"):
        run(tmp_path / "s", resume="auto", budget=1, nan_at={5})


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(NonFiniteError, match=r"model weights after step 4: non-finite.*last good checkpoint: "
                                             r".*step_0000002"):
        run(tmp_path / "r", blow_up_at=4)
    assert steps_on_disk(tmp_path / "r") == ["step_0000002"]


def test_wall_clock_budget_ends_the_run_with_a_checkpoint_and_the_weights(tmp_path):
    job, loop, finished = run(tmp_path / "r", total=10 ** 12, max_seconds=0.0)
    assert finished and job.steps_run == [] and loop.last_checkpoint.name == "step_0000000"
    assert json.loads((tmp_path / "r" / "toy.json").read_text())["step"] == 0


def test_without_a_run_folder_the_loop_only_steps():
    job = Toy()
    assert Loop(job, DistInfo(), desc="toy", log_every=2).run(batches(0), 5)
    assert job.steps_run == [0, 1, 2, 3, 4]
    with pytest.raises(NonFiniteError, match="step 2"):
        Loop(Toy(nan_at={2}), DistInfo(), desc="toy", log_every=2).run(batches(0), 5)
