"""MLflow tracking: off unless configured; concurrent jobs on one SQLite store lose nothing."""
import json
import multiprocessing as mp
import shutil

import pytest

from iar2 import tracking


def test_tracking_is_off_without_a_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with tracking.start_run("x", params={"a": 1}) as run:
        run.log_metrics(0, {"loss": 1.0})
    assert run.run_id is None and not list(tmp_path.iterdir())


def _job(uri, i, steps):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "concurrency"
    with tracking.start_run(f"job{i}", params={"job": i, "cfg": {"lr": 0.1 * i}}, tags={"n": i}) as run:
        for s in range(steps):
            run.log_metrics(s, {"loss": float(i * 1000 + s)})


@pytest.mark.slow
def test_concurrent_jobs_on_sqlite_lose_no_records(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_job, args=(uri, i, 40)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]
    for r in runs:
        assert r.info.status == "FINISHED"
        hist = client.get_metric_history(r.info.run_id, "loss")
        i = int(r.data.params["job"])
        assert sorted(m.step for m in hist) == list(range(40))
        assert sorted(m.value for m in hist) == [float(i * 1000 + s) for s in range(40)]
        assert r.data.params["cfg.lr"] == str(0.1 * i)


def _spooled_job(uri, spool, i, steps, artifact):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["IAR2_MLFLOW_SPOOL"] = spool
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "spooled"
    os.environ["IAR2_RULE"] = "ar_train"
    with tracking.start_run(f"job{i}", params={"job": i, "cfg": {"lr": 0.1 * i}}, tags={"n": i}) as run:
        for s in range(steps):
            run.log_metrics(s, {"loss": float(i * 1000 + s)})
        run.log_artifact(artifact, "files")
    import sys

    # The job's own process never imported MLflow: that is the point of spooling.
    assert "mlflow" not in sys.modules


def _failing_spooled_job(uri, spool):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["IAR2_MLFLOW_SPOOL"] = spool
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "spooled"
    try:
        with tracking.start_run("broken") as run:
            run.log_metrics(0, {"loss": 1.0})
            raise RuntimeError("boom")
    except RuntimeError:
        pass


@pytest.mark.slow
def test_spooled_runs_reach_the_store_once_each(tmp_path):
    """Concurrent jobs spool their runs; one sync logs each exactly once (params, metric history, tags, artifacts,
    status); a second sync, or one after a sync killed midway, adds nothing twice."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spool = tmp_path / "spool"
    artifact = tmp_path / "metrics.json"
    artifact.write_text('{"fid": 1.5}')
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spooled_job, args=(uri, str(spool), i, 30, str(artifact))) for i in range(4)]
    procs.append(ctx.Process(target=_failing_spooled_job, args=(uri, str(spool))))
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    artifact.write_text('{"fid": 99}')  # a later job rewrites the output: the run keeps what its job saw
    assert not (tmp_path / "mlflow.db").exists()  # nothing touched the store yet
    records = sorted(spool.glob("*.json"))
    assert len(records) == 5

    # A sync that dies after logging the runs but before removing their records: the next sync replaces them.
    shutil.copytree(spool, tmp_path / "spool.before")
    assert tracking.sync(spool, uri) == 5
    shutil.rmtree(spool)  # put every record back as if the sync had died before removing them
    shutil.copytree(tmp_path / "spool.before", spool)
    assert tracking.sync(spool, uri) == 5
    assert tracking.sync(spool, uri) == 0 and not list(spool.glob("*.json")) and not list(spool.glob("*.files"))

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("spooled")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["broken"] + [f"job{i}" for i in range(4)]
    for r in runs:
        if r.info.run_name == "broken":
            assert r.info.status == "FAILED"
            continue
        assert r.info.status == "FINISHED" and r.data.tags["rule"] == "ar_train"
        i = int(r.data.params["job"])
        assert r.data.tags["n"] == str(i) and r.data.params["cfg.lr"] == str(0.1 * i)
        hist = client.get_metric_history(r.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in hist) == [(s, float(i * 1000 + s)) for s in range(30)]
        assert r.info.end_time >= r.info.start_time
        local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="files/metrics.json",
                                                    dst_path=str(tmp_path / "dl" / str(i)), tracking_uri=uri)
        assert json.loads(open(local).read()) == {"fid": 1.5}


def test_bad_tracking_mode_is_rejected_naming_the_values():
    from pathlib import Path

    from iar2.config import ConfigError, load_yaml
    from iar2.registry import load_plan

    root = Path(__file__).resolve().parents[1]
    cfg = load_yaml(root / "params" / "ci.yaml")
    cfg["tracking"] = {"mode": "offline"}
    with pytest.raises(ConfigError, match=r"tracking\.mode.*live.*spool"):
        load_plan(root, cfg)
