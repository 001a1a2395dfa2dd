"""workflow/scripts/seed_spread.py: a run is retrained from the DAG's own config with only the seed changed,
sampled with the DAG's sample config at each epoch, the seeds' spread is reported beside the sampling interval,
and two runs are compared by an interval over seeds (Welch), not over samples."""
import json
import statistics
from pathlib import Path

import pytest
import yaml

from helpers import load_script

# FID of each (run, seed, epoch): seed 0 is the DAG's
FID = {("a", 0, 300): 10.0, ("a", 1, 300): 12.0, ("a", 2, 300): 11.0,
       ("b", 0, 300): 20.0, ("b", 1, 300): 21.0, ("b", 2, 300): 22.0}


def make_dag(tmp_path: Path) -> Path:
    results = tmp_path / "results" / "default"
    tokens = results / "tokens" / "vq-16" / "g16"
    tokens.mkdir(parents=True)
    (tokens / "meta.json").write_text("{}")
    (results / "tokenizers" / "vq-16").mkdir(parents=True)
    (results / "tokenizers" / "vq-16" / "vq.safetensors").write_bytes(b"vq")
    for run in ("a", "b"):
        cfgs = results / "configs" / "ar"
        cfgs.mkdir(parents=True, exist_ok=True)
        (cfgs / f"{run}.yaml").write_text(yaml.safe_dump({"name": run, "train": {"tokens": str(tokens), "seed": 0}}))
        for g in ("static-2.0", "pag-1.5-3.0"):  # two guidances at e300: the static one is compared
            s = results / "configs" / "sampling" / run / "e300"
            s.mkdir(parents=True, exist_ok=True)
            (s / f"{g}.yaml").write_text("{}")
        m = results / "ar" / run / "e300" / "static-2.0"
        m.mkdir(parents=True)
        (m / "metrics.json").write_text(json.dumps({"fid": FID[(run, 0, 300)],
                                                    "bootstrap": {"fid": [9.0, 10.0, 11.0] * 10}}))
    scale = tmp_path / "params" / "default.yaml"
    scale.parent.mkdir()
    scale.write_text(yaml.safe_dump({"data": {"root": "data/x"}, "gen_metrics": {"max_reference": 100}}))
    return results


@pytest.fixture
def dag(tmp_path, monkeypatch):
    results = make_dag(tmp_path)
    mod = load_script("seed_spread")
    calls = []

    def fake_run(argv):
        calls.append(argv)
        if argv[:2] == ["ar", "train"]:
            assert argv[argv.index("--config") + 1].endswith(".yaml")
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "model.safetensors").write_bytes(b"w")
        elif argv[0] == "sample":
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "samples.npz").write_bytes(b"s")
        elif argv[0] == "metrics":
            out = Path(argv[argv.index("--out") + 1])
            run_dir = out.parents[2].name  # <run>-seed<s>-<key>
            run, seed = run_dir.split("-seed")[0], int(run_dir.split("-seed")[1].split("-")[0])
            assert argv[argv.index("--bootstrap") + 1] == "200"  # the DAG's replicates, not none
            f = FID[(run, seed, 300)]
            out.write_text(json.dumps({"fid": f, "bootstrap": {"fid": [f - 2, f, f + 2] * 10}}))

    monkeypatch.setattr(mod, "_run", fake_run)
    return mod, results, calls


def test_retrains_with_only_the_seed_changed_and_compares_over_seeds(dag, tmp_path, capsys):
    mod, results, calls = dag
    argv = ["--results", str(results), "--scale-file", str(tmp_path / "params" / "default.yaml"),
            "--runs", "a", "b", "--seeds", "1", "2", "--epochs", "300"]
    assert mod.main(argv) == 0
    trains = [c for c in calls if c[:2] == ["ar", "train"]]
    # seed 0 is the DAG's own run: read, not retrained
    assert len(trains) == 4 and {c[c.index("--set") + 1] for c in trains} == {"train.seed=1", "train.seed=2"}
    samples = [c for c in calls if c[0] == "sample"]
    assert all(c[c.index("--config") + 1].endswith("e300/static-2.0.yaml") for c in samples)  # the DAG's config
    assert all(c[c.index("--ar") + 1].endswith("model_e300.safetensors") for c in samples)
    table = json.loads((results / "diagnose" / "seeds" / "spread.json").read_text())
    a = table["a/e300/static-2.0"]
    assert a["fid_by_seed"] == {"0": 10.0, "1": 12.0, "2": 11.0}
    assert a["sd"] == pytest.approx(statistics.stdev([10, 12, 11]))
    assert a["bootstrap_half_width"] == pytest.approx(1.0, abs=0.06)  # 2.5 / 97.5 % of {9, 10, 11}: [9, 11]
    out = capsys.readouterr().out
    assert "a/e300/static-2.0 - b/e300/static-2.0: -10.00 FID" in out
    assert (results / "diagnose" / "seeds" / "spread.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second study of other runs keeps this one's sets; a rerun of the same study retrains nothing
    calls.clear()
    assert mod.main(argv) == 0
    assert not [c for c in calls if c[:2] == ["ar", "train"]]


def test_welch_interval_contains_the_difference_and_narrows_with_agreement():
    mod = load_script("seed_spread")
    lo, hi = mod.welch_interval([10, 12, 11], [20, 21, 22])
    assert lo < -10 < hi < 0  # decided: every seed of a beats every seed of b by a wide margin
    lo2, hi2 = mod.welch_interval([5, 25, 11], [20, 21, 22])
    assert lo2 < 0 < hi2  # the same means' order, but one side's seeds disagree: not decided


def test_a_guidance_the_dag_did_not_sample_is_refused(dag, tmp_path):
    mod, results, _ = dag
    with pytest.raises(SystemExit, match="static-9.0.yaml not found; the DAG sampled a at epoch 300 with: "
                                         "pag-1.5-3.0, static-2.0"):
        mod.main(["--results", str(results), "--scale-file", str(tmp_path / "params" / "default.yaml"),
                  "--runs", "a", "--seeds", "1", "--epochs", "300", "--guidance", "static-9.0"])


def test_overrides_retrain_seed_zero_too_and_name_the_variant(dag, tmp_path):
    mod, results, calls = dag
    assert mod.main(["--results", str(results), "--scale-file", str(tmp_path / "params" / "default.yaml"),
                     "--runs", "a", "b", "--seeds", "1", "--epochs", "300",
                     "--set", "train.lr_schedule=cosine"]) == 0
    trains = [c for c in calls if c[:2] == ["ar", "train"]]
    # the DAG's seed-0 weights were trained without the override: the variant retrains seed 0 as well
    assert sorted(c[c.index("--set") + 1] for c in trains) == ["train.seed=0", "train.seed=0", "train.seed=1",
                                                                 "train.seed=1"]
    assert all("train.lr_schedule=cosine" in c for c in trains)
    table = json.loads((results / "diagnose" / "seeds" / "spread.json").read_text())
    assert set(table) == {"a/e300/static-2.0 [train.lr_schedule=cosine]",
                          "b/e300/static-2.0 [train.lr_schedule=cosine]"}
    # the interval shown is the variant's own seed 0's (+-2), not the DAG's (+-1)
    assert table["a/e300/static-2.0 [train.lr_schedule=cosine]"]["bootstrap_half_width"] == pytest.approx(2.0, abs=0.1)
    # the variant's folders are not the plain study's: a plain rerun retrains
    calls.clear()
    mod.main(["--results", str(results), "--scale-file", str(tmp_path / "params" / "default.yaml"),
              "--runs", "a", "--seeds", "1", "--epochs", "300"])
    assert [c for c in calls if c[:2] == ["ar", "train"]]


def test_a_changed_reference_network_rescores_without_retraining(dag, tmp_path):
    mod, results, calls = dag
    refnet = results / "refnet" / "refnet.safetensors"
    refnet.parent.mkdir(parents=True)
    refnet.write_bytes(b"net 1")
    argv = ["--results", str(results), "--scale-file", str(tmp_path / "params" / "default.yaml"),
            "--runs", "a", "--seeds", "1", "--epochs", "300"]
    assert mod.main(argv) == 0
    calls.clear()
    refnet.write_bytes(b"net 2, retrained")  # new features: stale scores; the weights and samples are not
    assert mod.main(argv) == 0
    assert [c[0] for c in calls] == ["metrics"]


def test_jobs_run_with_one_thread_as_the_dags_do(monkeypatch):
    """On a CPU the thread count changes float reductions, and with them the trained weights: the retrained seeds run
    with one thread, as the DAG's jobs (OMP_NUM_THREADS = the rule's 1 thread), and the caller's count comes back."""
    import torch

    import iar2.cli

    mod = load_script("seed_spread")
    seen = []
    monkeypatch.setattr(iar2.cli, "main", lambda argv: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mod._run(["ar", "train"])
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(iar2.cli, "main", lambda argv: 3)
        with pytest.raises(SystemExit, match="exited 3"):
            mod._run(["ar", "train"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
