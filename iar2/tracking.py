"""Run tracking: every training, sampling and metrics job can log one MLflow run.

Tracking is on when MLFLOW_TRACKING_URI is set (the Snakemake rules set it to a SQLite file under the
results folder, or a cluster points it at an `mlflow server`); otherwise `start_run` yields a no-op run,
so library calls and tests never create a store by accident. The experiment comes from
MLFLOW_EXPERIMENT_NAME (the pipeline uses one per scale). Tags: IAR2_RULE, IAR2_RUN_ID and IAR2_TABLES
from the environment, plus whatever the caller passes.

SQLite allows one writer at a time: writes are retried with backoff on "database is locked", and the
experiment is created race-free (a concurrent creator's experiment is reused).

Two modes (the scale file's `tracking.mode`):
- live: the job opens the store and logs as it goes (clusters, `mlflow server`: the run is visible while the
  job trains);
- spool: the job writes its run (params, metrics over steps, tags, artifacts, status and times) as one record
  under IAR2_MLFLOW_SPOOL, and `iar2 track sync` (run by the workflow when it ends) logs every record to the
  store in one process. On a laptop a job lasts seconds and importing MLflow and opening the store cost
  ~2.7 s of CPU per job; spooling pays that once per workflow. A record appears (atomic rename) only when its
  job ends, and a sync killed halfway is redone without duplicates (runs carry their record id).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from iar2.io import atomic_path, atomic_write_json, check_writable

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (locked past the retries, unreachable); the message names it."""


def _store() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "(no MLFLOW_TRACKING_URI)")


def _retry(fn, *args, attempts: int = 12, **kwargs):
    """Call an MLflow client function, retrying with backoff (about 15 s in all) while the store is busy."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlite "database is locked" surfaces as several exception types
            msg = str(e).lower()
            transient = any(s in msg for s in ("locked", "busy", "unique constraint", "already exists"))
            if not transient:
                raise
            if i == attempts - 1:
                raise TrackingError(f"MLflow store {_store()} stayed busy through {attempts} tries ({str(e)[:200]}); "
                                    "another process holds it: wait for it or stop it, then rerun") from None
            if i == 2:
                log.warning("MLflow store %s is busy; retrying with backoff", _store())
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


def _metric_rows(step: int, metrics: dict[str, float]) -> list:
    now = int(time.time() * 1000)
    return [[k, float(v), now, int(step)] for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class NullRun:
    """The run used when tracking is off: every call does nothing."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...


class MLflowRun(NullRun):
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            _retry(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.log_metric_rows(_metric_rows(step, metrics))

    def log_metric_rows(self, rows: list) -> None:
        """[key, value, timestamp ms, step] rows (a spooled run's history keeps its own timestamps)."""
        from mlflow.entities import Metric

        items = [Metric(k, v, t, s) for k, v, t, s in rows]
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            _retry(self.client.log_batch, self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if Path(path).exists():
            _retry(self.client.log_artifact, self.run_id, str(path), subdir)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            _retry(self.client.set_tag, self.run_id, k, str(v))


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job created it first
        exp = _retry(client.get_experiment_by_name, name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise first contact with a SQLite store: concurrent schema creation corrupts its migrations."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl  # POSIX only, and needed only for a SQLite store

    db = Path(uri[len("sqlite:///"):])
    check_writable(db.parent, "MLflow store folder")
    lock = db.with_name(db.name + ".lock")
    timeout = float(os.environ.get("IAR2_MLFLOW_LOCK_TIMEOUT", "120"))
    with open(lock, "a") as fh:
        t0, delay, said = time.monotonic(), 0.05, False
        while True:  # never block silently: a stuck holder is named after `timeout` seconds
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout:
                    raise TrackingError(f"MLflow store {uri} is locked by another process (lock file {lock}) for "
                                        f"over {timeout:.0f} s; stop that process or remove the stale lock holder, "
                                        "then rerun (IAR2_MLFLOW_LOCK_TIMEOUT sets the wait)") from None
                if not said:
                    log.warning("waiting for the MLflow store lock %s (held by another process)", lock)
                    said = True
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class SpooledRun(NullRun):
    """A run kept as a record in the spool folder until `sync` logs it (see the module docstring)."""

    def __init__(self, spool: Path, name: str, experiment: str, tags: dict):
        check_writable(spool, "MLflow spool folder (IAR2_MLFLOW_SPOOL)")  # now, not after the job's work
        self.spool = spool
        self.run_id = uuid.uuid4().hex
        self.files = spool / f"{self.run_id}.files"
        self.record = {"id": self.run_id, "name": name, "experiment": experiment, "tags": dict(tags),
                       "params": {}, "metrics": [], "artifacts": [], "status": "RUNNING",
                       "start_time": int(time.time() * 1000), "end_time": None}

    def log_params(self, params: dict) -> None:
        self.record["params"].update({k: str(v)[:6000] for k, v in flatten(params).items()})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.record["metrics"] += _metric_rows(step, metrics)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        # Copied now: the job's outputs may be rewritten by a later job before the sync.
        path = Path(path)
        if path.is_file():
            dest = self.files / str(len(self.record["artifacts"])) / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            self.record["artifacts"].append([str(dest.relative_to(self.spool)), subdir])

    def set_tags(self, tags: dict) -> None:
        self.record["tags"].update({k: str(v) for k, v in tags.items()})

    def close(self, status: str) -> None:
        self.record.update(status=status, end_time=int(time.time() * 1000))
        atomic_write_json(self.spool / f"{self.run_id}.json", self.record, indent=None)


def _env_tags() -> dict:
    return {k: os.environ[v] for k, v in (("rule", "IAR2_RULE"), ("run_id", "IAR2_RUN_ID"),
                                          ("tables", "IAR2_TABLES")) if os.environ.get(v)}


@contextlib.contextmanager
def start_run(name: str, params: dict | None = None, tags: dict | None = None,
              is_main: bool = True) -> Iterator[NullRun]:
    """One MLflow run around a job (rank 0 only); FINISHED on success, FAILED on an exception."""
    if not (enabled() and is_main):
        yield NullRun()
        return
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "iar2")
    if os.environ.get("IAR2_MLFLOW_SPOOL"):
        spooled = SpooledRun(Path(os.environ["IAR2_MLFLOW_SPOOL"]), name, experiment,
                             {**_env_tags(), **{k: str(v) for k, v in (tags or {}).items()}})
        log.info("MLflow run %s (%s) spooled for experiment %s", spooled.run_id, name, experiment)
        if params:
            spooled.log_params(params)
        status = "FAILED"
        try:
            yield spooled
            status = "FINISHED"
        finally:
            spooled.close(status)
        return
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    with _store_lock(uri):
        client = MlflowClient(uri)
        exp = _retry(_experiment_id, client, experiment)
    run = _retry(client.create_run, exp, run_name=name, tags={**_env_tags(), **(tags or {})})
    tracked = MLflowRun(client, run.info.run_id)
    log.info("MLflow run %s (%s) in experiment %s", run.info.run_id, name, exp)
    if params:
        tracked.log_params(params)
    status = "FAILED"
    try:
        yield tracked
        status = "FINISHED"
    finally:
        _retry(client.set_terminated, run.info.run_id, status)


def sync(spool: str | Path, uri: str | None = None) -> int:
    """Log every finished record in `spool` to the store at `uri` (default MLFLOW_TRACKING_URI), oldest first;
    each record is removed once its run is complete in the store. Returns the number of runs logged."""
    spool = Path(spool)
    records = sorted(spool.glob("*.json")) if spool.is_dir() else []
    if not records:
        return 0
    from mlflow.tracking import MlflowClient

    uri = uri or os.environ["MLFLOW_TRACKING_URI"]
    with _store_lock(uri):
        client = MlflowClient(uri)
    recs = sorted(((json.loads(p.read_text()), p) for p in records), key=lambda r: (r[0]["start_time"], r[0]["id"]))
    experiments: dict[str, str] = {}
    done = 0
    for rec, path in tqdm(recs, desc="mlflow sync", unit="run", disable=None):
        name = rec["experiment"]
        if name not in experiments:
            experiments[name] = _retry(_experiment_id, client, name)
        exp = experiments[name]
        # A sync killed after creating this record's run left it partial: replace it.
        for old in client.search_runs([exp], filter_string=f"tags.iar2_record = '{rec['id']}'"):
            _retry(client.delete_run, old.info.run_id)
        run = _retry(client.create_run, exp, start_time=rec["start_time"], run_name=rec["name"],
                     tags={**rec["tags"], "iar2_record": rec["id"]})
        rid = run.info.run_id
        tracked = MLflowRun(client, rid)
        tracked.log_params(rec["params"])
        tracked.log_metric_rows(rec["metrics"])
        for rel, subdir in rec["artifacts"]:
            tracked.log_artifact(path.parent / rel, subdir)
        _retry(client.set_terminated, rid, rec["status"], end_time=rec["end_time"])
        path.unlink()
        shutil.rmtree(path.parent / f"{rec['id']}.files", ignore_errors=True)
        done += 1
    log.info("MLflow: %d spooled run(s) logged", done)
    return done


# ----------------------------------------------------------------------------- `iar2 track sync`

def add_arguments(parser) -> None:
    parser.add_argument("--spool", default=os.environ.get("IAR2_MLFLOW_SPOOL"),
                        help="spool folder the jobs wrote their runs to (default: $IAR2_MLFLOW_SPOOL)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow store to log them to (default: $MLFLOW_TRACKING_URI)")


def run(args) -> int:
    if not args.spool or not args.tracking_uri:
        raise SystemExit("iar2 track sync: needs --spool and --tracking-uri (or IAR2_MLFLOW_SPOOL and "
                         "MLFLOW_TRACKING_URI)")
    sync(args.spool, args.tracking_uri)
    return 0


# ----------------------------------------------------------------------------- per-step CSV

class MetricsLogger:
    """`log(step, metrics)`: one row per call in a CSV (appended as training goes; the header grows
    when new metrics appear) and one line in the log. Subclass or wrap it to send rows elsewhere
    (e.g. MLflow). On resumption, rows past the resumed step (written after the last checkpoint of
    the interrupted run) are dropped, so the file reads as one uninterrupted run.
    sinks: more destinations, each with `log_metrics(step, metrics)` (e.g. iar2.tracking's runs)."""

    def __init__(self, path: str | Path, resume_step: int | None = None, sinks: list | None = None):
        self.path = Path(path)
        self.sinks = list(sinks or [])
        self.fields: list[str] = ["step"]
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.fields = list(reader.fieldnames or ["step"])
                for row in reader:
                    try:
                        if int(row["step"]) <= resume_step:
                            self.rows.append(row)
                    except (TypeError, ValueError):  # a partial last line of a killed run
                        continue
        self._rewrite()

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self.fields)
                w.writeheader()
                w.writerows(self.rows)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _fmt(v) for k, v in metrics.items()}}
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new:
            self.fields += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.fields).writerow(row)
        for sink in self.sinks:
            sink.log_metrics(step, metrics)
        log.info("step %d: %s", step, " ".join(f"{k}={row[k]}" for k in metrics))


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
