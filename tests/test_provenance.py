"""Provenance of every result. The configuration a job runs with is checked before any job starts, shell commands
cannot be changed by a path, each job declares what it reads; state a job keeps between its runs (sample chunks,
checkpoints, tokenized rows, cached features) is reused only under the same config and input contents
(iar2/fingerprint.py); non-finite training and broken files end in clear messages. Each scenario fails on a version
that keyed such state by file name or config, or that pasted paths into shell commands.

Sections are independent (each keeps its helpers local)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from iar2 import fingerprint
from iar2.ar.model import ARModel, ARModelConfig
from iar2.ar.train import train
from iar2.checkpoint import save_weights
from iar2.config import ConfigError, from_dict, load_config, to_dict
from iar2.registry import load_plan, load_yaml
from iar2.sample import sample_run
from iar2.sample_config import SampleRunConfig
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.vq_model import VQModel
from iar2.training import NonFiniteError

from helpers import make_tokens, run_config

ROOT = Path(__file__).resolve().parent.parent


# ============================================================================================================
# Scale-file schema, shell quoting, CLI ranges (issue 12, items 3 and 4)
# ============================================================================================================

def _schema_smk(*args, cwd, timeout=600):
    """Snakemake on the repository's Snakefile, run from `cwd` (results land there)."""
    return subprocess.run(["snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _scale(name: str) -> dict:
    return load_yaml(ROOT / "params" / f"{name}.yaml")


@pytest.mark.parametrize("overlay, args, needles", [
    # a misspelt top-level key used to be ignored: the ci DAG then kept every sweep (320 jobs instead of 132)
    ("scale: ci\nrestirct: {size: [B]}\n", [],
     ["restirct: unknown key", "allowed keys:", "restrict, results", "did you mean 'restrict'?"]),
    # a restrict name that is no sweep variable would silently keep the whole sweep
    ("scale: ci\nrestrict: {sizes: [B]}\n", [],
     ["restrict.sizes: not a sweep variable", "allowed keys:", "size, start", "did you mean 'size'?"]),
    # a restrict value that is not in the sweep
    ("scale: ci\nrestrict: {size: [B, XXXL]}\n", [],
     ["restrict.size: 'XXXL' not in the registry's sweep", "allowed values: B, L, XL, XXL"]),
    # --config overrides are merged before the check: a misspelt one is refused too
    (None, ["--config", "scale=ci", "scael=default"], ["scael: unknown key", "did you mean 'scale'?"]),
])
def test_bad_scale_keys_are_refused_before_any_job(tmp_path, overlay, args, needles):
    if overlay is not None:
        (tmp_path / "overlay.yaml").write_text(overlay)
        args = ["--configfile", str(tmp_path / "overlay.yaml"), *args]
    r = _schema_smk("-n", "reproduce_all", *args, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    for n in needles:
        assert n in out, (n, out[-2000:])
    assert "Job stats" not in out and not (tmp_path / "results").exists()


def test_every_scale_file_fits_the_schema():
    from iar2.scale_schema import schema_errors

    for name in ("ci", "default", "paper"):
        assert schema_errors(_scale(name)) == [], name


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["refnet"].update(steps=-3), "refnet.steps: -3 is out of range; allowed values: >= 1"),
    (lambda s: s["refnet"].update(lr=0.1), "refnet.lr: unknown key; allowed keys: batch_size, input_size, seed, "
                                           "steps, threads"),
    (lambda s: s["gen_metrics"].update(max_refrence=10), "did you mean 'max_reference'?"),
    (lambda s: s["gen_metrics"].update(extractor="vgg"), "gen_metrics.extractor: 'vgg' is not allowed; "
                                                          "allowed values: inception, domain"),
    (lambda s: s["tracking"].update(mode="off"), "tracking.mode: 'off' is not allowed; allowed values: live, spool"),
    (lambda s: s["ar"].update(epoch_steps=0), "ar.epoch_steps: 0 is out of range; allowed values: > 0"),
    (lambda s: s["ar"]["sizes"].update(XXXL={}), "ar.sizes: key 'XXXL' is not allowed"),
    (lambda s: s["grids"].update({"24": 48}), "grids: key '24' is not allowed"),  # a string, not the paper's 24
    (lambda s: s["data"]["builtin"].pop("seed"), "data.builtin.seed: required key is missing"),
    (lambda s: s.update(results="results/{scale}"), "results: 'results/{scale}' is not allowed"),  # a wildcard
    (lambda s: s.update(resources={"vq_trian": {"gpu": 1}}), "did you mean 'vq_train'?"),
    (lambda s: s.pop("codebooks"), "codebooks: required key is missing"),
    # run-config sections: their dataclasses name the key (and the scale section) the same way
    (lambda s: s["tokenizer"]["base"]["model"].update(chh=8), "tokenizer.model: unknown key(s) chh; allowed keys: "),
    (lambda s: s["sampling"]["base"].update(per_clas=2), "did you mean 'per_class'?"),
])
def test_schema_names_the_key_and_what_is_allowed(edit, message):
    s = _scale("default")
    edit(s)
    with pytest.raises(ConfigError) as e:
        load_plan(ROOT, s)
    assert message in str(e.value)


def test_restrict_is_checked_against_the_merged_registry():
    """Values a scale's own `experiments:` overlay adds to a sweep may be kept by its `restrict:`."""
    s = _scale("ci")
    s["restrict"]["s"] = [1, 2, 4]
    with pytest.raises(ConfigError, match=r"restrict\.s: 4 not in the registry's sweep of s; allowed values: "
                                          r"0\.5, 1, 2, 3, 5"):
        load_plan(ROOT, s)
    rows = load_yaml(ROOT / "params" / "experiments.yaml")["tables"]["table10"]["rows"]
    rows[0]["for"]["s"] = [1, 2, 4]
    s["experiments"] = {"tables": {"table10": {"rows": rows}}}
    assert {r["key"]["s"] for r in load_plan(ROOT, s).tables["table10"]["rows"]} == {1, 2, 4}


def test_tokenizer_jobs_read_the_data_check_report_they_declare():
    plan = load_plan(ROOT, _scale("ci"))
    for tok in plan.trained_tokenizers():
        for stage in plan.stages(tok):
            assert plan.tokenizer_config(tok, stage)["data"]["check_report"] == "results/ci/data/check.json"


@pytest.mark.slow
def test_results_folder_with_space_quote_and_shell_syntax_runs(tmp_path):
    """A results folder named with a space, a quote and a command substitution: the data check and the reference
    network run at the ci scale with their outputs in that folder, and the substitution never runs."""
    name = "results/ci with space 'q' $(touch PWNED)"
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump({"results": name}))
    target = f"{name}/refnet/refnet.safetensors"
    r = _schema_smk(target, "--config", "scale=ci", "--configfile", str(tmp_path / "overlay.yaml"), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = tmp_path / name
    report = yaml.safe_load((res / "data" / "check.json").read_text())  # JSON is YAML
    assert report and (res / "refnet" / "refnet.safetensors").is_file()
    assert (res / "logs" / "refnet.log").is_file() and (res / "logs" / "data_check.log").is_file()
    assert not list(tmp_path.rglob("PWNED"))


def _cli_parser(words: tuple[str, ...], module: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iar2 " + " ".join(words), exit_on_error=True)
    mod = importlib.import_module(module)
    (mod.add_arguments_for(words, p) if hasattr(mod, "add_arguments_for") else mod.add_arguments(p))
    return p


def _cli_numeric_options():
    """(command words, module, option) for every numeric option of every `iar2` command."""
    from iar2.cli import COMMANDS

    out = []
    for words, module, _ in COMMANDS:
        for a in _cli_parser(words, module)._actions:
            if a.option_strings and getattr(a.type, "__module__", None) == "iar2.cli":  # the ranged types
                out.append((words, module, a.option_strings[-1]))
    return out


def test_every_numeric_cli_option_has_a_range():
    """No numeric option takes a bare int or float: each says which values make sense (iar2/cli.py)."""
    from iar2.cli import COMMANDS

    bare = [(" ".join(w), a.option_strings[-1]) for w, m, _ in COMMANDS for a in _cli_parser(w, m)._actions
            if a.type in (int, float)]
    assert bare == []
    assert len(_cli_numeric_options()) > 60


@pytest.mark.parametrize("words, module, option", _cli_numeric_options(),
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_negative_cli_numbers_are_refused_with_a_message(words, module, option, capsys):
    p = _cli_parser(words, module)
    required = []
    for a in p._actions:
        if a.required and a.option_strings:
            required += [a.option_strings[-1], "x"]
        elif not a.option_strings and a.nargs not in ("?", "*", argparse.REMAINDER):
            required.append("x")
    with pytest.raises(SystemExit) as e:
        p.parse_args([*required, option, "-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "expected" in err and "got -3" in err


def test_refnet_steps_refused_from_the_command_line():
    r = subprocess.run(["iar2", "refnet", "train", "--data", "d", "--out", "o.safetensors", "--steps", "-3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "argument --steps: expected a positive integer (>= 1), got -3" in r.stderr


def test_ranged_types_refuse_the_boundary_and_accept_the_range():
    from iar2.cli import float_min, int_range, nonneg_float, nonneg_int, positive_float, positive_int, unit_float

    cases = [(positive_int, ["1", "7"], ["0", "1.5", "x"]), (nonneg_int, ["0", "3"], ["-1"]),
             (positive_float, ["1e-4", "2"], ["0", "-1", "nan", "inf"]), (nonneg_float, ["0", "0.5"], ["-0.1"]),
             (unit_float, ["0.05", "1"], ["0", "1.01"]), (int_range(2, 15), ["2", "15"], ["1", "16"]),
             (float_min(1.0), ["1", "1.1"], ["0.99"])]
    for parse, good, bad in cases:
        for v in good:
            assert parse(v) == float(v)
        for v in bad:
            with pytest.raises(argparse.ArgumentTypeError, match="expected"):
                parse(v)


def test_launcher_counts_are_range_checked():
    from iar2.launch import main

    for args in (["--nodes", "0"], ["--gpus", "-1"]):
        with pytest.raises(SystemExit) as e:
            main([*args, "--dry-run", "--", "true"])
        assert e.value.code == 2


# ============================================================================================================
# In-job state keyed by what it depends on; non-finite training; broken files (issue 12, items 1, 2, 5, 6)
# ============================================================================================================

# ----------------------------------------------------------------------------- sampling


def _save_ar(path, seed):
    acfg = from_dict(ARModelConfig, dict(dim=32, n_layer=2, n_head=2, paradigm="fused_hierarchical", semantic_size=16,
                                         detail_size=64, head_layers=1, grid=4, num_classes=3))
    torch.manual_seed(seed)
    ar = ARModel(acfg)
    for p in ar.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_weights(path, ar.state_dict(), {"model_config": to_dict(acfg)})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov_models")
    vcfg = VQModelConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=8, norm_groups=4,
                         quantizer="semantic_detail", semantic_size=16, detail_size=64)
    torch.manual_seed(0)
    save_weights(root / "vq.safetensors", VQModel(vcfg).state_dict(), {"model_config": to_dict(vcfg)})
    return {"a": _save_ar(root / "a.safetensors", 0), "b": _save_ar(root / "b.safetensors", 1),
            "vq": root / "vq.safetensors"}


def scfg(**sampling):
    return load_config(SampleRunConfig, data={"per_class": 3, "batch_size": 2, "chunk_size": 4,
                                              "sampling": {"seed": 7, "guidance": {"mode": "static", "scale": 2.0},
                                                           **sampling}})


def _killed(ar, vq, out, cfg):
    """A sampling job killed after some chunks: job 0 of 2 writes chunks 0 and 2 and stops."""
    assert sample_run(ar, vq, out, cfg, job=0, jobs=2) is None
    assert (out / "chunks" / "chunk_00000.npz").is_file()


def test_changed_sampling_config_gives_new_samples(models, tmp_path, caplog):
    out = tmp_path / "s"
    _killed(models["a"], models["vq"], out, scfg())
    new = scfg(temperature=[0.5, 0.5])
    with caplog.at_level(logging.WARNING):
        got = np.load(sample_run(models["a"], models["vq"], out, new))["arr_0"]
    fresh = np.load(sample_run(models["a"], models["vq"], tmp_path / "fresh", new))["arr_0"]
    old = np.load(sample_run(models["a"], models["vq"], tmp_path / "old", scfg()))["arr_0"]
    assert np.array_equal(got, fresh) and not np.array_equal(got, old)
    assert "config sampling.temperature changed" in caplog.text and (tmp_path / "s" / "chunks.stale").is_dir()


def test_changed_weights_same_config_gives_new_samples(models, tmp_path, caplog):
    out, ar = tmp_path / "s", tmp_path / "model.safetensors"
    shutil.copy(models["a"], ar)
    shutil.copy(models["a"].with_suffix(".json"), ar.with_suffix(".json"))
    _killed(ar, models["vq"], out, scfg())
    shutil.copy(models["b"], ar)  # the AR job reran: same path, same sampling config, new weights
    with caplog.at_level(logging.WARNING):
        got = np.load(sample_run(ar, models["vq"], out, scfg()))["arr_0"]
    fresh = np.load(sample_run(models["b"], models["vq"], tmp_path / "fresh", scfg()))["arr_0"]
    assert np.array_equal(got, fresh)
    assert "input ar changed" in caplog.text


def test_killed_sampling_resumes_from_its_chunks_bitwise(models, tmp_path, monkeypatch):
    whole = np.load(sample_run(models["a"], models["vq"], tmp_path / "whole", scfg()))
    out = tmp_path / "s"
    _killed(models["a"], models["vq"], out, scfg())
    import iar2.sample as sample_mod

    drawn, real = [], sample_mod.generate
    monkeypatch.setattr(sample_mod, "generate", lambda m, lab, idx, sc: drawn.extend(idx.tolist()) or real(m, lab, idx, sc))
    again = np.load(sample_run(models["a"], models["vq"], out, scfg()))
    assert sorted(drawn) == [4, 5, 6, 7]  # only the missing chunk was sampled
    assert np.array_equal(whole["arr_0"], again["arr_0"]) and np.array_equal(whole["arr_1"], again["arr_1"])
    assert (tmp_path / "whole" / "samples.npz").read_bytes() == (out / "samples.npz").read_bytes()


# ----------------------------------------------------------------------------- training


def _weights(run):
    from iar2.checkpoint import load_weights

    return load_weights(run / "model.safetensors")


def test_changed_tokens_same_config_restarts_training(tmp_path, caplog):
    tok = make_tokens(tmp_path / "tok", seed=0)
    cfg = run_config(tok, steps=6, ckpt_every=2)
    train(cfg, tmp_path / "run", resume="auto", stop_after=4)  # killed after 4 of 6 steps
    make_tokens(tmp_path / "tok", seed=1)  # the tokenizer changed: new tokens, same path, same AR config
    with caplog.at_level(logging.WARNING):
        train(cfg, tmp_path / "run", resume="auto")
    assert "input tokens changed" in caplog.text and (tmp_path / "run" / "checkpoints.stale").is_dir()
    make_tokens(tmp_path / "tok2", seed=1)
    train(run_config(tmp_path / "tok2", steps=6, ckpt_every=2), tmp_path / "fresh")
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same as training on the new tokens from scratch


def test_finished_run_is_recomputed_when_rerun(tmp_path, caplog):
    """`snakemake --forcerun ar_train` reruns a finished job: it trains again instead of re-exporting."""
    tok = make_tokens(tmp_path / "tok")
    cfg = run_config(tok, steps=4, ckpt_every=2)
    train(cfg, tmp_path / "run", resume="auto")
    first = _weights(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()  # Snakemake removes a job's outputs before it runs
    with caplog.at_level(logging.WARNING):
        train(cfg, tmp_path / "run", resume="auto")
    assert "had finished" in caplog.text
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4"]  # logged anew from step 1 (log_every 4): a new run
    again = _weights(tmp_path / "run")
    assert all(torch.equal(first[k], again[k]) for k in first)  # deterministic: the same weights


def test_non_finite_gradients_stop_clearly_and_resume_after_the_fix(tmp_path, monkeypatch):
    tok = make_tokens(tmp_path / "tok")
    cfg = run_config(tok, steps=8, ckpt_every=2)
    from iar2.ar import train as train_mod

    real = train_mod.grad_norm
    calls = {"n": 0}

    def spiky(params, clip=0.0):  # step 5's gradients are NaN (a transient spike)
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 5:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return real(params, clip)

    monkeypatch.setattr(train_mod, "grad_norm", spiky)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at step 5\b.*step_0000004"):
        train(cfg, tmp_path / "run", resume="auto")
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_0000002", "step_0000004"]  # nothing after the spike
    from iar2.checkpoint import load_weights

    assert all(torch.isfinite(v).all() for v in load_weights(ck / "step_0000004" / "model.safetensors").values())
    # the fix: allow one skipped step; the run resumes from step 4 (not from scratch) and finishes
    calls["n"] = 4  # the spike comes back on the first resumed step (step 5 sees the same data)
    train(run_config(tok, steps=8, ckpt_every=2, nonfinite_skips=1), tmp_path / "run", resume="auto")
    assert calls["n"] == 8  # steps 5..8 only: resumed, not restarted
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["step"] == 8
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())


def test_absurd_learning_rate_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: 1e\+38 is out of range; allowed values: \[0.0, 1.0\]"):
        run_config(make_tokens(tmp_path / "tok"), lr=1e38)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    tok = make_tokens(tmp_path / "tok")
    cfg = run_config(tok, steps=8, ckpt_every=2, keep_last=3)
    train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "run", resume="auto", stop_after=6)  # killed after step 6
    ck = tmp_path / "run" / "checkpoints"
    latest = ck / (ck / "latest").read_text().strip()
    assert latest.name == "step_0000006"
    blob = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # a disk that lost half the file
    (ck / ".step_0000008.abc.tmp").mkdir()  # and a save the kill interrupted
    with caplog.at_level(logging.WARNING):
        train(cfg, tmp_path / "run", resume="auto")
    assert "step_0000006 cannot be loaded" in caplog.text and "falling back" in caplog.text
    assert not (ck / ".step_0000008.abc.tmp").exists()
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 4: the same weights as never killed


# ----------------------------------------------------------------------------- cached features, files, folders


def test_reference_feature_cache_is_keyed_by_extractor_weights(tiny_data, tmp_path, caplog):
    from iar2.generation_metrics import evaluate_samples
    from iar2.refnet import RefNet, RefNetConfig

    def refnet(seed):
        rcfg = RefNetConfig(num_classes=10, input_size=16, widths=(8, 16), blocks=1, norm_groups=4)
        torch.manual_seed(seed)
        save_weights(tmp_path / "refnet.safetensors", RefNet(rcfg).state_dict(), {"model_config": to_dict(rcfg)})
        return tmp_path / "refnet.safetensors"

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "g.npz", arr_0=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             arr_1=np.arange(20) % 10)
    kw = dict(extractor="domain", cache_dir=tmp_path / "cache", max_reference=40)
    a = evaluate_samples(tmp_path / "g.npz", tiny_data, domain_net=refnet(0), **kw)
    with caplog.at_level(logging.WARNING):
        b = evaluate_samples(tmp_path / "g.npz", tiny_data, domain_net=refnet(1), **kw)  # same path, new weights
    fresh = evaluate_samples(tmp_path / "g.npz", tiny_data, domain_net=refnet(1), extractor="domain",
                             max_reference=40)
    assert "input extractor_weights changed" in caplog.text
    assert b["fid"] == pytest.approx(fresh["fid"], rel=1e-9) and b["fid"] != pytest.approx(a["fid"], rel=1e-6)


def test_fingerprint_names_what_changed():
    a = fingerprint.fingerprint("x", {"train": {"lr": 1, "log_every": 5}}, {"w": "sha256:aa"}, ignore={"train.log_every"})
    b = fingerprint.fingerprint("x", {"train": {"lr": 2, "log_every": 9}}, {"w": "sha256:bb"}, ignore={"train.log_every"})
    assert fingerprint.changes(a, b) == ["input w", "config train.lr"]
    assert fingerprint.changes(a, {**a, "version": a["version"] + 1})[0].startswith("format version")


def test_malformed_data_check_report_is_one_clear_line(tiny_data, tmp_path, capsys):
    from iar2.cli import main

    bad = tmp_path / "check.json"
    bad.write_text('{"splits": {"train": {}}}')
    rc = main(["refnet", "train", "--data", str(tiny_data), "--report", str(bad), "--steps", "2",
               "--out", str(tmp_path / "r.safetensors")])
    err = capsys.readouterr().err
    assert rc == 4 and "malformed" in err and str(bad) in err and "Traceback" not in err
    bad.write_text("{not json")
    assert main(["refnet", "train", "--data", str(tiny_data), "--report", str(bad), "--steps", "2",
                 "--out", str(tmp_path / "r.safetensors")]) == 4
    assert "unreadable" in capsys.readouterr().err


def test_unwritable_spool_fails_when_the_job_starts(tmp_path, monkeypatch, capsys):
    from iar2.cli import main

    tok = make_tokens(tmp_path / "tok")
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool folder should be")  # (root passes chmod checks; this it cannot)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("IAR2_MLFLOW_SPOOL", str(blocker))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(to_dict(run_config(tok, steps=4))))
    rc = main(["ar", "train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 4 and "spool" in err and "not writable" in err
    assert not (tmp_path / "run" / "checkpoints" / "step_0000004").exists()  # failed before any training


def test_locked_mlflow_store_is_named_not_waited_on_forever(tmp_path, monkeypatch):
    import fcntl

    from iar2 import tracking

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("IAR2_MLFLOW_SPOOL", raising=False)
    monkeypatch.setenv("IAR2_MLFLOW_LOCK_TIMEOUT", "0.5")
    with open(tmp_path / "mlflow.db.lock", "a") as held:  # another process's lock (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(tracking.TrackingError, match=r"locked by another process \(lock file .*mlflow.db.lock"):
            with tracking.start_run("x"):
                pass


# ----------------------------------------------------------------------------- end to end: one changed Table 9 cell


def _sections(md: str) -> dict[str, str]:
    """report.md's table sections by heading (provenance and rerun lines included)."""
    body = md.split("## Tables", 1)[1].split("## Figures", 1)[0]
    return {part.split("\n", 1)[0]: part for part in body.split("\n### ")[1:]}


def _table_rows(section: str) -> list[str]:
    return [ln for ln in section.splitlines() if ln.startswith("|") and not ln.startswith("|---")]


@pytest.mark.slow
def test_one_changed_table9_value_reruns_only_that_cell(ci_workspace_root, tmp_path):
    """On a finished ci run, moving one Table 9 cell (PAG end 2.5 -> 2.25) plans only that cell's sampling and
    metrics (plus the index, summary and report), and afterwards only that cell of the report differs."""
    import subprocess
    from collections import Counter

    import yaml

    from test_workflow import job_counts

    ws = shutil.copytree(ci_workspace_root, tmp_path / "ws", symlinks=True)
    before = (ws / "reports" / "ci" / "report.md").read_text()
    x = yaml.safe_load((ws / "params" / "experiments.yaml").read_text())
    cells = x["tables"]["table9"]["rows"][0]["for"]["start,end"]
    cells[cells.index([1.75, 2.5])] = [1.75, 2.25]
    overlay = tmp_path / "t9.yaml"
    overlay.write_text(yaml.safe_dump({"experiments": {"tables": {"table9": {"rows": x["tables"]["table9"]["rows"]}}},
                                       "restrict": {"end": [2.25, 3.0]}}))

    def smk(*args):
        return subprocess.run(["snakemake", "--cores", "2", "reproduce_all", "--config", "scale=ci", "--configfile",
                               str(overlay), *args], cwd=ws, capture_output=True, text=True, timeout=1500)

    plan = smk("-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout)
    assert counts == Counter({"sample": 1, "gen_metrics": 1, "registry_index": 1, "summary": 1, "report": 1,
                              "reproduce_all": 1}), counts
    cells = [ln.strip() for ln in plan.stdout.splitlines() if "guidance=" in ln]
    assert cells == ["wildcards: run=iar2-B-24, epoch=300, guidance=pag-1.75-2.25"] * 2, cells
    run = smk()
    assert run.returncode == 0, run.stderr[-3000:]
    after = (ws / "reports" / "ci" / "report.md").read_text()
    a, b = _sections(before), _sections(after)
    assert a.keys() == b.keys()
    changed = [k for k in a if a[k] != b[k]]
    assert len(changed) == 1 and changed[0].startswith("Table 9"), changed
    gone = set(_table_rows(a[changed[0]])) - set(_table_rows(b[changed[0]]))
    new = set(_table_rows(b[changed[0]])) - set(_table_rows(a[changed[0]]))
    values = lambda rows: [r for r in rows if not r.startswith("| `")]  # noqa: E731 (provenance rows name a run)
    # the two rows of the moved cell trade places: (1.75, 2.5) is no longer run here, (1.75, 2.25) now is
    assert all(r.startswith(("| 1.75 | 2.5 |", "| 1.75 | 2.25 |")) for r in values(gone) + values(new))
    assert any(r.startswith("| 1.75 | 2.5 | ours") for r in gone) and any(r.startswith("| 1.75 | 2.25 | ours")
                                                                         for r in new)
    # the provenance lines that changed are that cell's sample and metrics runs, nothing else
    assert all("pag-1.75-2.5" in r for r in gone - set(values(gone)))
    assert all("pag-1.75-2.25" in r for r in new - set(values(new)))


def test_short_key_follows_contents_of_files_and_folders(tmp_path):
    """The name of a study's folder beside the DAG (workflow/scripts): a changed file anywhere in a folder it
    read, or a file that appears where none was, gives another key; the same contents give the same key."""
    from iar2.fingerprint import short_key

    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "shard0.npy").write_bytes(b"a")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seed: 0")
    missing = tmp_path / "refnet.safetensors"
    k = short_key(cfg, tokens, missing, 3)
    assert len(k) == 10 and k == short_key(cfg, tokens, missing, 3)
    (tokens / "shard0.npy").write_bytes(b"bb")  # another size: the digest memo keys on (size, mtime)
    k2 = short_key(cfg, tokens, missing, 3)
    missing.write_bytes(b"net")
    k3 = short_key(cfg, tokens, missing, 3)
    assert len({k, k2, k3, short_key(cfg, tokens, missing, 4)}) == 4
