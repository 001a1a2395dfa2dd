"""The results layout (iar2/layout.py) is the one place a result path is spelled: the rules and the code call
it, and one function gives both a rule's wildcard pattern and the concrete path the registry writes."""
from __future__ import annotations

import inspect
import io
import tokenize
from pathlib import Path

import pytest

from iar2 import layout
from iar2.registry import load_plan, load_yaml

ROOT = Path(__file__).resolve().parent.parent
# Fragments of result paths: none may appear in a string of the code or the rules outside layout.py.
PATH_FRAGMENTS = ("tokenizers/", "refnet/", "tokens/{", "analysis/", "configs/", "logs/", "ar/{", "/e{", "data/check")
FILE_NAMES = {"registry.json", "mlflow.db", "mlflow-spool", "recon.json", "time_match.json", "model.json"}


def _strings(path: Path):
    """(line, text) of every string literal that is not a docstring or a block of prose (triple quotes)."""
    for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if t.type == tokenize.STRING and not t.string.lstrip("rbfuRBFU").startswith(('"""', "'''")):
            yield t.start[0], t.string


def test_no_result_path_is_spelled_outside_the_layout():
    files = [*(ROOT / "iar2").rglob("*.py"), *(ROOT / "workflow").rglob("*.smk"), ROOT / "Snakefile"]
    found = []
    for p in files:
        if p.name == "layout.py":
            continue
        for line, s in _strings(p):
            if any(f in s for f in PATH_FRAGMENTS) or s.strip("\"'") in FILE_NAMES:
                found.append(f"{p.relative_to(ROOT)}:{line}: {s}")
    assert not found, "result paths outside iar2/layout.py:\n" + "\n".join(found)


def _path_functions():
    for name, fn in vars(layout).items():
        if inspect.isfunction(fn) and fn.__module__ == layout.__name__ and name not in ("run_of", "ar_weights_at"):
            yield name, fn


@pytest.mark.parametrize("name", [n for n, _ in _path_functions()])
def test_a_wildcard_pattern_formats_to_the_concrete_path(name):
    """The rules call layout with Snakemake wildcards ('{tok}'); Snakemake fills them in. That must give the same
    path as calling layout with the values, else a rule's output and the registry's path would differ."""
    fn = getattr(layout, name)
    params = list(inspect.signature(fn).parameters)
    values = {p: f"v{i}-x" for i, p in enumerate(params)}
    pattern = fn(*(f"{{{p}}}" for p in params))
    assert pattern.format(**values) == fn(*values.values())


def test_the_plan_points_at_layout_paths():
    plan = load_plan(ROOT, load_yaml(ROOT / "params" / "ci.yaml"))
    idx = plan.index()
    s = next(s for s in plan.samples.values() if not s.is_grid)
    assert layout.sample_id(s.run, s.epoch, s.guidance) == s.id
    assert idx.runs[layout.sample_dir(s.id)].config == layout.job_config("sampling", s.id)
    row = next(r for r in idx.tables["table9"]["rows"])
    assert row["values"]["fid"]["file"] == layout.gen_metrics(row["sample"])
    tok = plan.trained_tokenizers()[0]
    assert plan.tokenizer_config(tok, plan.stages(tok)[-1])["data"]["check_report"] == \
        f"{plan.results}/{layout.data_check()}"
    rid = next(iter(plan.runs))
    assert layout.run_of(layout.run_dir(rid)) == rid
    with pytest.raises(ValueError, match="not an AR run's folder"):
        layout.run_of(layout.tokenizer_dir(tok))
