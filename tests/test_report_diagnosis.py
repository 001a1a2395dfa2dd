"""The report's Diagnosis section (iar2/report/diagnosis.py): what it reads, and the observations it computes."""
import json

import pytest

from iar2.report import diagnosis as dg


def _ar(levels, fids, ce, floor, kl=0.03):
    ent = {lv: {"entropy_given_class": floor} for lv in levels}
    if "detail" in levels:
        ent["detail"]["entropy_given_semantic"] = floor - 1
    tf = {lv: {"ce": ce, "acc": 0.5, "kl_cond_uncond": kl, "kl_first_token": 1.0, "top1_agree": 0.9} for lv in levels}
    return {"levels": levels, "data_entropy": ent, "teacher_forced": {"train": tf, "heldout": tf},
            "samples": {k: {"fid": v, "precision": 0.5, "recall": 0.3, "isc_mean": 2.0, "class_accuracy": 0.4,
                            "flat_fraction": 0.1} for k, v in fids.items()}}


def _write(root, ar, toks, budget_runs=None, budget_toks=None):
    d = root / "diagnose"
    d.mkdir(parents=True)
    for r, a in ar.items():
        (d / f"ar-{r}.json").write_text(json.dumps(a))
    for t, v in toks.items():
        (d / f"tok-{t}.json").write_text(json.dumps(v))
    budget = {"ar": {r: {"steps": 100, "batch_size": 16, "elapsed_s": 50.0, "seconds_per_step": 0.5,
                         "data_passes": 1.6, "loss": {"loss": {"last_half_drop": 0.2 if r == "a" else 0.01}}}
                     for r in (budget_runs if budget_runs is not None else ar)},
              "tokenizers": {t: {"": {"steps": 10, "l2": {"last_half_drop": 0.0}}}
                             for t in (budget_toks if budget_toks is not None else toks)}}
    (d / "budget.json").write_text(json.dumps(budget))
    return d


TOK = {"full_decode": {"rfid": 3.0, "psnr": 20.0, "flat_fraction": 0.25}, "semantic_decode": {"rfid": 9.0},
       "original_flat_fraction": 0.2,
       "levels": {"detail": {"size": 256, "usage": 0.8, "perplexity": 40.0, "entropy": 3.7},
                  "semantic": {"size": 16, "usage": 1.0, "perplexity": 8.0, "entropy": 2.1}}}


def test_observations_follow_the_numbers(tmp_path):
    ar = {"a": _ar(["semantic", "detail"], {"T1-none": 14.0, "T1-static-2": 15.0}, ce=1.5, floor=2.5),
          "b": _ar(["single"], {"T1-none": 12.0, "T1-static-2": 11.0}, ce=3.0, floor=4.0)}
    _write(tmp_path, ar, {"sd": TOK})
    obs = dg.observations(dg.load(tmp_path))
    text = "\n".join(obs)
    assert "Samples `T1-static-2`: FID a 15.00, b 11.00 (lowest: b" in text
    assert "a: guidance moves FID from 14.00 (none) to 15.00 (T1-static-2), not better." in obs
    assert "b: guidance moves FID from 12.00 (none) to 11.00 (T1-static-2), better." in obs
    # the detail level is compared with H(detail | semantic), the others with H(x | class)
    assert any(o.startswith("a detail: held-out CE 1.50") and "1.50 for a model" in o for o in obs)
    assert any(o.startswith("b single: held-out CE 3.00") and "4.00 for a model" in o for o in obs)
    assert "sd: the detail codes take rFID from 9.00 (semantic only) to 3.00 (full decode)." in obs
    # only a loss that still fell > 5 % over the last half is called still learning
    assert any(o.startswith("a was still learning") for o in obs)
    assert not any(o.startswith("b was still learning") for o in obs)


def test_tables_order_levels_and_markdown_escapes_bars(tmp_path):
    _write(tmp_path, {"a": _ar(["semantic", "detail"], {"T1-none": 1.0}, 1.0, 2.0)}, {"sd": TOK})
    d = dg.load(tmp_path)
    _, rows = dg.tokenizer_table(d)
    assert [r[1] for r in rows] == ["semantic", "detail"] and rows[0][6] == "3.00" and rows[1][6] == ""
    md = dg.markdown(d)
    assert "H(x \\| class)" in md and "| a | semantic |" in md
    assert "<table>" in dg.html_section(d) and "H(x | class)" in dg.html_section(d)


def test_only_the_runs_the_budget_names_are_read(tmp_path):
    ar = {"a": _ar(["single"], {"T1-none": 1.0}, 1.0, 2.0), "old": _ar(["single"], {"T1-none": 9.0}, 1.0, 2.0)}
    _write(tmp_path, ar, {"sd": TOK}, budget_runs=["a"])
    assert list(dg.load(tmp_path).ar) == ["a"]  # a file left from an earlier diagnosis.runs is not shown


def test_missing_pieces(tmp_path):
    assert dg.load(tmp_path) is None  # nothing diagnosed: no section
    d = _write(tmp_path, {"a": _ar(["single"], {"T1-none": 1.0}, 1.0, 2.0)}, {"sd": TOK})
    (d / "tok-sd.json").unlink()
    with pytest.raises(FileNotFoundError, match="tok-sd.json missing"):
        dg.load(tmp_path)


def test_images_are_copied_beside_the_report(tmp_path):
    d = _write(tmp_path / "res", {"a": _ar(["single"], {"T1-none": 1.0}, 1.0, 2.0)}, {"sd": TOK})
    (d / "ar-a.png").write_bytes(b"\x89PNG")
    (d / "ar-stale.png").write_bytes(b"\x89PNG")
    rel = dg.copy_images(dg.load(tmp_path / "res"), tmp_path / "out")
    assert rel == {"ar-a": "diagnosis/ar-a.png"} and (tmp_path / "out" / "diagnosis" / "ar-a.png").is_file()
