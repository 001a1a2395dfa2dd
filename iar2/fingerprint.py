"""The one rule for state a job keeps between its own runs: it carries a fingerprint of what it depends on.

Snakemake reruns a job when its inputs, params or rule code change (or on --forcerun), but state that lives
inside the job's folder (sample chunks, training checkpoints, tokenized rows, cached reference features)
bypasses it: a rerun that found such state would silently reuse old numbers. So every piece of such state is
stored with a fingerprint of everything its content depends on:

- `kind` and `version`: what the state is and its format version (bump FORMAT when a format changes);
- `config`: the effective config of the job (minus keys that provably do not change the result, such as
  logging intervals), as a plain dict;
- `inputs`: content digests (sha256) of every file the job read: weights, tokens, data-check reports, ...

`guard(state_dir, fp, what)` compares the stored fingerprint with the job's. Equal: the state is reused (a
killed job resumes). Different, or missing (state of an older version): the state is moved aside to
`<state_dir>.stale/` and recomputed, with one log line saying what changed. A job that finished marks its state
complete (`mark_complete`); when Snakemake runs that job again the state is not reused either, because a
finished job is rerun only after a change Snakemake saw or a --forcerun, both of which ask for a recomputation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from iar2.io import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or meaning of any in-job state changes
FILE = "FINGERPRINT.json"
_BLOCK = 1 << 20
_memo: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per process by path, size, mtime and inode)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _memo:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(_BLOCK):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def tree_digest(path: str | Path) -> str:
    """sha256 over the sorted relative paths and contents of every file in a folder. Hidden files (temporary
    siblings of atomic writes) and fingerprints of the folder's own in-job state are not content."""
    root = Path(path)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".stale"))
        for name in sorted(filenames):
            if name.startswith(".") or name == FILE:
                continue
            f = Path(dirpath) / name
            h.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def digest(path: str | Path) -> str:
    """Content digest of a file or a folder; a missing path names itself (so a later file changes the digest)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        return "tree:" + tree_digest(p)
    return f"missing:{p}"


def short_key(*parts) -> str:
    """Ten hex digits over paths' contents (files or folders, `digest`) and plain values (repr): a folder of a
    study beside the DAG named with it is never reused after a change to what it was computed from."""
    h = hashlib.sha256()
    for p in parts:
        h.update((digest(p) if isinstance(p, Path) else repr(p)).encode())
    return h.hexdigest()[:10]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def fingerprint(kind: str, config: dict, inputs: dict[str, str | Path | None] | None = None,
                ignore: set[str] | frozenset[str] = frozenset(), version: int = FORMAT) -> dict:
    """The fingerprint of one piece of in-job state. `inputs` maps a name to a path (hashed by content) or to a
    digest string already computed ("sha256:..."); None entries are skipped. Dotted config keys in `ignore` do
    not change the result (logging intervals, worker counts, input paths whose content is in `inputs`)."""
    flat = {k: v for k, v in _flatten(json.loads(json.dumps(config, default=str))).items() if k not in ignore}
    digests = {}
    for name, p in sorted((inputs or {}).items()):
        if p is None:
            continue
        digests[name] = p[len("sha256:"):] if isinstance(p, str) and p.startswith("sha256:") else digest(p)
    return {"kind": kind, "version": version, "config": flat, "inputs": digests}


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words: 'format version', 'input tokens', 'config train.lr'."""
    out = []
    if old.get("kind") != new.get("kind"):
        out.append("kind")
    if old.get("version") != new.get("version"):
        out.append(f"format version {old.get('version')} -> {new.get('version')}")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    out += [f"input {k}" for k in sorted(set(oi) | set(ni)) if oi.get(k) != ni.get(k)]
    oc, nc = old.get("config", {}), new.get("config", {})
    out += [f"config {k}" for k in sorted(set(oc) | set(nc)) if oc.get(k) != nc.get(k)]
    return out


def read(state_dir: str | Path) -> dict | None:
    p = Path(state_dir) / FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def set_aside(state_dir: Path) -> Path:
    """Move a state folder to `<name>.stale/` (replacing an older one), keeping it for inspection."""
    stale = state_dir.with_name(state_dir.name + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(state_dir, stale)
    return stale


def _has_state(state_dir: Path) -> bool:
    return state_dir.is_dir() and any(p.name != FILE for p in state_dir.iterdir())


def guard(state_dir: str | Path, fp: dict, what: str, write: bool = True) -> bool:
    """Make `state_dir` safe to use under fingerprint `fp`: True if its existing state may be reused, False if
    the job starts afresh (older state was moved aside, saying why, or there was none). `write`: store `fp` in
    the folder (only the process that owns the folder should)."""
    state_dir = Path(state_dir)
    old = read(state_dir)
    reuse = False
    if _has_state(state_dir):
        if old is None:
            why = "it has no fingerprint (written by an older version)"
        elif diff := changes(old, fp):
            why = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "") + " changed"
        elif old.get("complete"):
            why = "the job had finished, so Snakemake reran it for a change it tracks or a --forcerun"
        else:
            why, reuse = "", True
        if reuse:
            log.info("%s: reusing %s (same config and inputs)", what, state_dir)
        elif write:
            stale = set_aside(state_dir)
            log.warning("%s: %s; the old state is set aside in %s and recomputed", what, why, stale)
        else:
            log.warning("%s: %s; recomputing", what, why)
    if write and not reuse:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state_dir / FILE, fp)
    return reuse


def mark_complete(state_dir: str | Path) -> None:
    """Record that the job owning `state_dir` finished (see the module doc for why this matters)."""
    state_dir = Path(state_dir)
    fp = read(state_dir)
    if fp is not None:
        atomic_write_json(state_dir / FILE, {**fp, "complete": True})
