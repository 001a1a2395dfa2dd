"""Checkpoints: safetensors weights + JSON metadata, written atomically, resumable exactly.

Layout of a training checkpoint (a folder, renamed into place only when complete):

    <run>/checkpoints/step_0000100/
        model.safetensors          one file per module ("model", "disc", ...)
        optim.safetensors          every optimizer's tensors, flattened "<name>/<param>/<key>"
        meta.json                  config, step, epoch, RNG states, optimizer scalars, user fields
    <run>/checkpoints/latest       text file naming the newest complete folder

Nothing is pickled: tensors go to safetensors, everything else to JSON, so loading an
untrusted checkpoint cannot execute code.
"""
from __future__ import annotations

import base64
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from iar2 import fingerprint
from iar2.io import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone keeps tied weights valid
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write `path` (.safetensors) and, if meta is given, `path` with .json, both atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(_contiguous(state_dict), str(tmp), metadata={"format": "pt"})
    if meta is not None:
        atomic_write_json(path.with_suffix(".json"), meta)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); rerun the job that writes it") from None


def load_meta(path: str | Path) -> dict:
    p = Path(path)
    p = p / "meta.json" if p.is_dir() else p.with_suffix(".json")
    with open(p) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """All RNG states a training loop touches, JSON-ready (torch ByteTensors as base64)."""
    st = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": _np_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return st


def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in st["cuda"]])


def generator_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def set_generator_state(g: torch.Generator, s: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8))


# ----------------------------------------------------------------------------- optimizer state

def _flatten_optimizer(opt_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, pstate in opt_sd["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in rest["scalars"].items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": rest["param_groups"]}


# ----------------------------------------------------------------------------- training checkpoints

def save_checkpoint(run_dir: str | Path, step: int, modules: dict[str, torch.nn.Module | dict],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    meta: dict | None = None, name: str | None = None, keep_last: int | None = None) -> Path:
    """Write `run_dir/checkpoints/<name or step_XXXXXXX>/` atomically and point `latest` at it."""
    ckroot = Path(run_dir) / "checkpoints"
    name = name or f"step_{step:07d}"
    final = ckroot / name
    with atomic_path(final, is_dir=True) as tmp:
        for mname, m in modules.items():
            sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
            save_file(_contiguous(sd), str(tmp / f"{mname}.safetensors"))
        opt_meta = {}
        if optimizers:
            flat = {}
            for oname, opt in optimizers.items():
                t, rest = _flatten_optimizer(opt.state_dict())
                flat.update({f"{oname}/{k}": v for k, v in t.items()})
                opt_meta[oname] = rest
            save_file(_contiguous(flat), str(tmp / "optim.safetensors"))
        full_meta = {"step": step, "modules": sorted(modules), "optimizers": opt_meta, **(meta or {})}
        with open(tmp / "meta.json", "w") as fh:
            json.dump(full_meta, fh, indent=2, sort_keys=True, default=str)
    atomic_write_text(ckroot / "latest", name + "\n")
    if keep_last:
        _prune(ckroot, keep_last)
    log.info("saved checkpoint %s", final)
    return final


def _prune(ckroot: Path, keep_last: int) -> None:
    rolling = sorted(p for p in ckroot.glob("step_*") if p.is_dir())
    for p in rolling[:-keep_last]:
        for f in p.iterdir():
            f.unlink()
        p.rmdir()


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that cannot be used as it is; the message names the file."""


def _tmp_leftovers(ckroot: Path) -> list[Path]:
    """Temporary siblings of atomic writes (`.step_0000100.xxxx.tmp/`, `.latest.xxxx.tmp`) a kill left behind."""
    return [p for p in ckroot.glob(".*.tmp")] + [p for p in ckroot.glob(".*.old")] if ckroot.is_dir() else []


def remove_leftovers(run_dir: str | Path) -> int:
    """Delete what a killed save left behind in `run_dir/checkpoints` (never a complete checkpoint)."""
    gone = 0
    for p in _tmp_leftovers(Path(run_dir) / "checkpoints"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        gone += 1
    if gone:
        log.info("removed %d unfinished checkpoint write(s) left by a killed job in %s/checkpoints", gone, run_dir)
    return gone


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run (meta.json written last), newest first: the `latest` pointer's, then
    the others by step."""
    ckroot = Path(run_dir) / "checkpoints"
    if not ckroot.is_dir():
        return []

    def step_of(p: Path) -> int:
        try:
            return int(json.loads((p / "meta.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1  # unreadable metadata: tried last (and then refused by the loader)

    done = [p for p in ckroot.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file()]
    done.sort(key=lambda p: (step_of(p), p.name), reverse=True)
    ptr = ckroot / "latest"
    if ptr.is_file():
        first = ckroot / ptr.read_text().strip()
        if first in done:
            done.remove(first)
            done.insert(0, first)
    return done


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    c = checkpoint_candidates(run_dir)
    return c[0] if c else None


def auto_resume_checkpoint(run_dir: str | Path, fp: dict, what: str, is_main: bool = True) -> bool:
    """`--resume auto`: may the run's checkpoints be resumed? Only if they carry this job's fingerprint (same
    effective config, same input contents, same format: iar2/fingerprint.py) and the run had not finished.
    Otherwise they are moved to checkpoints.stale/ (one log line says what changed) and training starts over."""
    if is_main:
        remove_leftovers(run_dir)
    return fingerprint.guard(Path(run_dir) / "checkpoints", fp, what, write=is_main)


def load_newest_good(run_dir: str | Path, load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that loads (`load(folder) -> meta` raises on a bad one): a corrupt or unloadable
    latest checkpoint falls back to the previous complete one, saying so. None when the run has none."""
    tried = []
    for ck in checkpoint_candidates(run_dir):
        try:
            return ck, load(ck)
        except Exception as e:  # safetensors, JSON, shape and non-finite errors all mean "unusable"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.warning("checkpoint %s cannot be loaded (%s); falling back to the previous one", ck, reason)
            tried.append(f"{ck.name} ({reason})")
    if tried:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} can be loaded: {'; '.join(tried)}. "
                              "Move that folder away to start the run over")
    return None


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights with NaN or Inf: such a checkpoint would make every resume fail."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}: non-finite values in {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))


def safe_torch_load(path: str | Path, map_location: str = "cpu"):
    """torch.load of a released .pt/.pth/.bin file with weights_only=True (tensors and plain containers only).
    A file that needs more is refused with a clear message: unpickling it could run code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower() and "weights_only" not in ln]
        first = lines[0] if lines else "a non-tensor object"
        raise CheckpointError(f"{path}: refused: the file holds pickled Python objects beyond tensors ({first[:200]}), "
                              "and unpickling them could run code from the file. Use a tensors-only export (a "
                              "state_dict saved with torch.save, or .safetensors) from a source you trust") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_checkpoint(ckpt_dir: str | Path, modules: dict[str, torch.nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    map_location: str = "cpu", strict: bool = True) -> dict:
    """Load weights (and optimizer states) into the given objects; return the metadata."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no meta.json): {ckpt_dir}")
    meta = json.loads(meta_path.read_text())
    for mname, m in (modules or {}).items():
        sd = load_file(str(ckpt_dir / f"{mname}.safetensors"), device=map_location)
        check_finite(sd, f"{ckpt_dir}/{mname}.safetensors")
        m.load_state_dict(sd, strict=strict)
    if optimizers:
        flat = load_file(str(ckpt_dir / "optim.safetensors"), device=map_location)
        for oname, opt in optimizers.items():
            pre = f"{oname}/"
            t = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
            opt.load_state_dict(_unflatten_optimizer(t, meta["optimizers"][oname]))
    return meta
