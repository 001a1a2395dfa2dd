"""Provenance of every result: the configuration a job runs with is checked before any job starts, the shell
commands cannot be changed by a path, and each job declares what it reads.

Sections are independent (each keeps its helpers local)."""
from __future__ import annotations

import argparse
import importlib
import subprocess
from pathlib import Path

import pytest
import yaml

from iar2.config import ConfigError
from iar2.registry import load_plan, load_yaml

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
