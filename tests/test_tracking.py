"""MLflow tracking: off unless configured; concurrent jobs on one SQLite store lose nothing."""
import multiprocessing as mp

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
