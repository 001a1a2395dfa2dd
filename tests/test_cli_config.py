"""`--config FILE` of `iar2 refnet train`, `tokenize`, `vq eval` and `metrics` (iar2.cli.add_config_arguments): a
file value is used, a flag overrides it, an unknown key or a bad value is refused naming the key and what is
allowed, and every option keeps its range. The work itself is replaced by a recorder: these tests are about
which settings reach it."""
from __future__ import annotations

import argparse
import json

import pytest
import yaml

from iar2.cli import add_config_arguments, load_run_config, main, positive_float, positive_int, unit_float
from iar2.config import ConfigError

# (command words, module, function the command calls, the paths it needs)
COMMANDS = {
    "tokenize": (["tokenize"], "iar2.tokenize", "tokenize", ["--vq", "v", "--data", "d"]),
    "vq eval": (["vq", "eval"], "iar2.tokenizer.evaluate", "evaluate_reconstruction", ["--vq", "v", "--data", "d"]),
    "metrics": (["metrics"], "iar2.generation_metrics", "evaluate_samples", ["--samples", "s.npz", "--data", "d"]),
    "refnet train": (["refnet", "train"], "iar2.refnet", "train_refnet", ["--data", "d"]),
}
# per command: a file, the flags given with it, and the settings that must reach the work
CASES = {
    "tokenize": ({"batch_size": 8, "aug": "none", "max_images": 5}, ["--batch-size", "4"],
                 {"batch_size": 4, "aug": "none", "max_images": 5, "chunk_size": 1024}),
    "vq eval": ({"max_images": 9, "perceptual": "none", "bootstrap": 0}, ["--bootstrap", "3"],
                {"max_images": 9, "perceptual": "none", "bootstrap": 3, "split": "val"}),
    "metrics": ({"max_reference": 100, "extractor": "domain", "bootstrap": 5}, ["--bootstrap", "0"],
                {"max_reference": 100, "extractor": "domain", "bootstrap": 0, "split": "train"}),
    "refnet train": ({"steps": 7, "widths": [8, 16], "lr": 0.01}, ["--steps", "3"],
                     {"steps": 3, "widths": (8, 16), "lr": 0.01, "batch_size": 64}),
}
# positional arguments of the recorded functions, by name (the others are passed by keyword)
POSITIONAL = {"evaluate_samples": ["samples", "data_root", "split", "extractor", "domain_net", "weights_dir",
                                   "max_reference", "ref_npz", "report", "device", "batch_size", "cache_dir",
                                   "bootstrap", "bootstrap_seed"],
              "tokenize": ["vq_path", "data_root", "split", "out_dir"],
              "evaluate_reconstruction": ["vq_path", "data_root"], "train_refnet": ["data_root", "out"]}
FAKE_METRICS = {"fid": 1.0, "isc_mean": 1.0, "precision": 0.5, "recall": 0.5, "extractor": "domain"}


@pytest.fixture
def record(monkeypatch):
    """Replace each command's work by a recorder of the settings it was called with."""
    import importlib

    seen = {}

    def install(name):
        words, module, func, _ = COMMANDS[name]
        names = POSITIONAL[func]

        def fake(*args, **kwargs):
            seen.update(zip(names, args), **kwargs)
            return dict(FAKE_METRICS) if func == "evaluate_samples" else {}
        monkeypatch.setattr(importlib.import_module(module), func, fake)
        return seen
    return install


def _argv(name, tmp_path, *extra):
    words, _, _, paths = COMMANDS[name]
    out = tmp_path / ("o.safetensors" if name == "refnet train" else "out.json" if name != "tokenize" else "codes")
    return [*words, *paths, "--out", str(out), *extra]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_file_values_are_used_and_flags_override_them(name, fmt, record, tmp_path):
    data, flags, want = CASES[name]
    path = tmp_path / f"c.{fmt}"
    path.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    seen = record(name)
    assert main(_argv(name, tmp_path, "--config", str(path), *flags)) == 0
    assert {k: seen[k] for k in want} == want


@pytest.mark.parametrize("name", COMMANDS)
def test_without_a_file_the_defaults_are_those_of_before(name, record, tmp_path):
    seen = record(name)
    assert main(_argv(name, tmp_path)) == 0
    before = {"tokenize": {"split": "train", "aug": "flip", "crop_range": 1.1, "batch_size": 64, "chunk_size": 1024,
                           "image_size": None, "max_images": None, "num_workers": 0, "device": "auto"},
              "vq eval": {"split": "val", "extractor": "inception", "perceptual": "lpips_vgg", "max_images": None,
                          "batch_size": 32, "num_workers": 0, "device": "auto", "bootstrap": 200},
              "metrics": {"split": "train", "extractor": "inception", "max_reference": 50000, "batch_size": 64,
                          "bootstrap": 200, "bootstrap_seed": 0, "device": "auto"},
              "refnet train": {"steps": 2000, "seed": 0, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05,
                               "input_size": 64, "widths": (16, 32, 64, 128), "blocks": 1, "crop_min": 0.6,
                               "num_workers": 0}}[name]
    assert {k: seen[k] for k in before} == before


@pytest.mark.parametrize("name, data, needles", [
    ("tokenize", {"batch_sise": 8}, ["batch_sise", "allowed keys", "did you mean 'batch_size'"]),
    ("tokenize", {"vq": "x"}, ["unknown key(s) vq"]),  # paths are flags, not settings
    ("vq eval", {"perceptual": "vgg"}, ["perceptual", "'vgg' is not allowed", "'lpips_vgg'", "'none'"]),
    ("metrics", {"max_reference": 0}, ["max_reference", "out of range", "[1, inf]"]),
    ("tokenize", {"aug": "rotate"}, ["aug", "'rotate' is not allowed", "'tencrop'"]),
    ("refnet train", {"lr": 0}, ["lr", "out of range", "(0.0, inf]"]),
    ("refnet train", {"widths": [16, -2]}, ["widths[1]", "out of range"]),
    ("refnet train", {"crop_min": 1.5}, ["crop_min", "(0.0, 1.0]"]),
])
def test_bad_file_is_refused_naming_the_key_and_what_is_allowed(name, data, needles, record, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    seen = record(name)
    assert main(_argv(name, tmp_path, "--config", str(path))) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and all(n in err for n in needles), err
    assert seen == {}  # refused before any work


def test_missing_config_file_is_named(record, tmp_path, capsys):
    record("tokenize")
    assert main(_argv("tokenize", tmp_path, "--config", str(tmp_path / "nope.yaml"))) == 3
    assert "nope.yaml" in capsys.readouterr().err


def test_options_come_from_the_fields_with_their_ranges():
    from dataclasses import dataclass, field

    @dataclass
    class C:
        n: int = field(default=2, metadata={"min": 1, "help": "count"})
        lr: float = field(default=0.1, metadata={"gt": 0.0})
        frac: float = field(default=0.5, metadata={"gt": 0.0, "max": 1.0})
        sizes: tuple[int, ...] = field(default=(1, 2), metadata={"min": 1})
        mode: str = field(default="a", metadata={"choices": ("a", "b")})
        k: int | None = field(default=None, metadata={"min": 1, "max": 4})

    p = argparse.ArgumentParser()
    add_config_arguments(p, C)
    acts = {a.dest: a for a in p._actions}
    assert acts["n"].type is positive_int and acts["lr"].type is positive_float and acts["frac"].type is unit_float
    assert acts["sizes"].nargs == "+" and acts["mode"].choices == ["a", "b"] and "(default: 2)" in acts["n"].help
    assert load_run_config(C, p.parse_args(["--k", "3", "--sizes", "4", "5"])) == C(k=3, sizes=(4, 5))
    with pytest.raises(SystemExit):
        p.parse_args(["--k", "5"])  # int_range(1, 4)

    @dataclass
    class Bare:
        n: int = 1

    with pytest.raises(TypeError, match="needs a range"):  # every numeric option says what makes sense
        add_config_arguments(argparse.ArgumentParser(), Bare)


def test_range_check_names_an_excluded_bound():
    from dataclasses import dataclass, field

    from iar2.config import from_dict

    @dataclass
    class C:
        lr: float = field(default=0.1, metadata={"gt": 0.0, "max": 1.0})

    with pytest.raises(ConfigError, match=r"lr: 0.0 is out of range; allowed values: \(0.0, 1.0\]"):
        from_dict(C, {"lr": 0})
    assert from_dict(C, {"lr": 1}).lr == 1.0
