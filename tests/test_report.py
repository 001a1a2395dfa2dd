"""`iar2 report`: a synthetic results folder with gaps (registry.json per the workflow's contract, metric JSONs,
configs, a loss CSV, a sample grid, an MLflow-shaped SQLite store, a dvc.lock) rendered to HTML + Markdown.

Checks: every table 1-13 and figure is in the page; paper values, our values and differences appear; gaps are
marked missing; the claims checklist decides what the numbers support; provenance is right; a page with no
registry still renders; and a headless Chromium loads the page with no broken image and no script error.
The browser screenshot is kept under $IAR2_TEST_ARTIFACTS (default: <pytest basetemp>/artifacts/) and its path
printed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from iar2.cli import main as cli_main
from iar2.report import render_report
from iar2.report.claims import Dataset, evaluate, load_claims
from iar2.report.render import SELFCHECK_JS
from iar2.report.sources import default_paper_dir, derive_columns, load_paper_table

PAPER = default_paper_dir()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
T5 = {"Alternating Prediction": ("alternating", 18.0, 4.5), "Grouped Sequential Prediction": ("grouped", 22.0, 4.2),
      "Fused Independent Prediction": ("fused_independent", 25.0, 4.0),
      "Fused Hierarchical Prediction (Ours)": ("fused_hierarchical", 20.0, 5.0)}
MLFLOW_T5_HIER = "f" * 32


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _gen(root: Path, rel: str, fid: float, isc: float, p: float = 0.5, r: float = 0.3) -> None:
    _json(root / rel, {"fid": fid, "isc_mean": isc, "precision": p, "recall": r, "extractor": "domain",
                       "extractor_name": "iar2-refnet", "num_generated": 100, "num_reference": 200, "image_size": 32})


def _src(file: str, field: str, run: str) -> dict:
    return {"file": file, "field": field, "run": run}


def _gen_values(sample_dir: str, run: str) -> dict:
    f = f"{sample_dir}/metrics.json"
    return {"fid": _src(f, "fid", run), "is": _src(f, "isc_mean", run),
            "precision": _src(f, "precision", run), "recall": _src(f, "recall", run)}


def build_results(repo: Path) -> Path:
    """A results folder of scale "ci" under repo/results/ci with some runs finished and some not."""
    root = repo / "results" / "ci"
    runs: dict[str, dict] = {}
    tables: dict[str, dict] = {}

    def tok(name: str, rfid: float | None, psnr=20.0, ssim=0.6):
        rid = f"tok/{name}"
        cfg = f"configs/tokenizer/{name}.yaml"
        runs[rid] = {"kind": "tokenizer", "dir": f"tokenizers/{name}", "config": cfg}
        (root / cfg).parent.mkdir(parents=True, exist_ok=True)
        (root / cfg).write_text(f"name: {name}\nmodel: {{codebook_size: 64}}\n")
        if rfid is not None:
            _json(root / f"tokenizers/{name}/recon.json", {"rfid": rfid, "psnr": psnr, "ssim": ssim, "lpips": 0.2,
                                                           "extractor": "domain", "num_images": 50, "image_size": 32})
        return rid

    def sample(run: str, guidance: str, fid: float | None, isc: float | None = None, cfg_text: str | None = None):
        rid = f"{run}/{guidance}"
        cfg = f"configs/sampling/{guidance}.yaml"
        runs[rid] = {"kind": "samples", "dir": rid, "config": cfg}
        (root / cfg).parent.mkdir(parents=True, exist_ok=True)
        (root / cfg).write_text(cfg_text or "per_class: 10\nsampling: {guidance: {mode: static, scale: 2.25}}\n")
        if fid is not None:
            _gen(root, f"{rid}/metrics.json", fid, isc if isc is not None else 100.0 / fid)
        return rid

    # Table 1: (512, 4096) and (256, 8192) not run yet
    rows = []
    for (s, d), val in {(128, 4096): (3.0, 10.0), (256, 4096): (2.5, 9.0), (512, 4096): None, (256, 2048): (2.8, 9.5),
                        (256, 8192): None}.items():
        t = tok(f"sd-{s}-{d}", val[0] if val else None)
        smp = sample(f"ar/iar2-B-24-sd{s}-{d}/e100", "static-2.25", val[1] if val else None)
        rows.append({"key": {"semantic_size": s, "detail_size": d},
                     "values": {"rfid": _src(f"tokenizers/sd-{s}-{d}/recon.json", "rfid", t),
                                "psnr": _src(f"tokenizers/sd-{s}-{d}/recon.json", "psnr", t),
                                "ssim": _src(f"tokenizers/sd-{s}-{d}/recon.json", "ssim", t),
                                "gfid": _src(f"{smp}/metrics.json", "fid", smp),
                                "is": _src(f"{smp}/metrics.json", "isc_mean", smp)}})
    tables["table1"] = {"title": "Table 1: codebook sizes", "paper_csv": "table01_codebook_size.csv",
                        "key": ["semantic_size", "detail_size"], "kind": "results", "rows": rows}

    # Table 2: two reproduced rows; every other method stays paper-only
    t2 = []
    for model, fid in (("IAR2-B", 12.5), ("LlamaGen-B", 15.0)):
        smp = sample(f"ar/{model.lower()}-16/e300", "main", fid)
        t2.append({"key": {"model": model, "reject_sampling": False}, "values": _gen_values(smp, smp)})
    tables["table2"] = {"title": "Table 2: ImageNet 256", "paper_csv": "table02_sota_imagenet256.csv",
                        "key": ["model", "reject_sampling"], "kind": "results", "rows": t2}

    # Table 3: 16x16, 50 epochs, sizes B and L; FID IAR2 < IAR < LlamaGen and falls with size
    t3 = []
    fids = {("LlamaGen", "B"): 30.0, ("IAR", "B"): 28.0, ("IAR2", "B"): 25.0,
            ("LlamaGen", "L"): 26.0, ("IAR", "L"): 24.0, ("IAR2", "L"): 20.0}
    for (method, size), fid in fids.items():
        smp = sample(f"ar/{method.lower()}-{size}-16/e50", "main", fid, isc=200.0 - fid)
        t3.append({"key": {"tokens": "16x16", "model": f"{method}-{size}", "epochs": 50}, "values": _gen_values(smp, smp)})
    tables["table3"] = {"title": "Table 3: scales", "paper_csv": "table03_scales_tokens_epochs.csv",
                        "key": ["tokens", "model", "epochs"], "kind": "results", "rows": t3}

    # Table 5: hierarchical beats independent but not alternating
    t5 = []
    for label, (par, fid, isc) in T5.items():
        smp = sample(f"ar/iar2-B-24-sd128-{par}/e100", "static-2.25", fid, isc)
        t5.append({"key": {"paradigm": label}, "values": _gen_values(smp, smp)})
    tables["table5"] = {"title": "Table 5: paradigms", "paper_csv": "table05_prediction_paradigms.csv",
                        "key": ["paradigm"], "kind": "results", "rows": t5}

    # Table 7: only the single codebook has finished
    t7 = []
    for method, fid in (("Single Codebook", 21.0), ("Unassociated Dual Codebook [19]", None),
                        ("Associated Dual Codebook (Ours)", None)):
        smp = sample(f"ar/t7-{len(t7)}/e100", "static-2.25", fid)
        t7.append({"key": {"method": method}, "values": _gen_values(smp, smp)})
    tables["table7"] = {"title": "Table 7", "paper_csv": "table07_codebook_architecture.csv", "key": ["method"],
                        "kind": "results", "rows": t7}

    # Table 9: all twelve rows registered, two finished
    t9 = []
    for i, (a, b) in enumerate([(1.5, 2.25), (1.5, 2.5), (1.5, 2.75), (1.5, 3.0), (1.75, 2.25), (1.75, 2.5),
                                (1.75, 2.75), (1.75, 3.0), (1.75, 3.5), (2.0, 2.5), (2.0, 2.75), (2.0, 3.0)]):
        smp = sample("ar/iar2-B-24/e300", f"pag-{a}-{b}", 11.0 + i if i < 2 else None)
        t9.append({"key": {"cfg_start": a, "cfg_end": b}, "values": _gen_values(smp, smp)})
    tables["table9"] = {"title": "Table 9", "paper_csv": "table09_cfg_range.csv", "key": ["cfg_start", "cfg_end"],
                        "kind": "results", "rows": t9}

    # Table 13: both of our tokenizers; IAR2's reconstructs best
    t13 = []
    for method, cb, name in (("LlamaGen", "16384", "vq-16384"), ("IAR2 (Ours)", "(256,4096)", "sd-256-4096")):
        rid = tok(name, 3.0 if method == "LlamaGen" else 2.5, psnr=19.0 if method == "LlamaGen" else 20.5,
                  ssim=0.5 if method == "LlamaGen" else 0.62)
        f = f"tokenizers/{name}/recon.json"
        t13.append({"key": {"method": method, "codebook_size": cb},
                    "values": {c: _src(f, c, rid) for c in ("rfid", "psnr", "ssim")}})
    tables["table13"] = {"title": "Table 13", "paper_csv": "table13_tokenizers.csv", "key": ["method", "codebook_size"],
                         "kind": "results", "rows": t13}

    # AR runs with resolved configs (Table 11) and a PAG sampling config (Table 12)
    for size, steps in (("B", 400), ("L", 300)):
        rid = f"ar/iar2-{size}-16"
        runs[rid] = {"kind": "ar", "dir": rid, "config": f"configs/ar/iar2-{size}-16.yaml"}
        if size == "L":
            continue  # config not written yet
        cfg = {"name": f"iar2-{size}-16",
               "model": {"size": "custom", "dim": 128, "n_layer": 4, "n_head": 4, "semantic_weight": 2.0,
                         "paradigm": "fused_hierarchical", "local_context": "compressed", "head_layers": 2},
               "train": {"batch_size": 32, "lr": 0.0005, "lr_schedule": "constant", "lr_end": 0.0,
                         "weight_decay": 0.05, "epochs": 300.0, "steps": steps, "fsdp": False, "betas": [0.9, 0.95]}}
        (root / "configs/ar").mkdir(parents=True, exist_ok=True)
        (root / f"configs/ar/iar2-{size}-16.yaml").write_text(yaml.safe_dump(cfg))
        _json(root / rid / "model.json", {"params": 2011872, "epoch": 12.8, "step": steps})
    pag = yaml.safe_dump({"per_class": 50, "reject": {"factor": 1},
                          "sampling": {"seed": 0, "top_k": [0, 0], "top_p": [1.0, 1.0], "temperature": [1.0, 1.0],
                                       "guidance": {"mode": "pag", "scale": 2.0, "semantic": [1.75, 2.5],
                                                    "detail": [1.75, 2.5]}}})
    s12 = sample("ar/iar2-B-16/e300", "pag-1.75-2.5", 9.5, cfg_text=pag)
    tables["table11"] = {"title": "Table 11", "paper_csv": "table11_training_settings.csv", "key": ["model", "tokens"],
                         "kind": "settings",
                         "rows": [{"key": {"model": "IAR2-B", "tokens": "16x16"}, "run": "ar/iar2-B-16",
                                   "config": "configs/ar/iar2-B-16.yaml"},
                                  {"key": {"model": "IAR2-L", "tokens": "16x16"}, "run": "ar/iar2-L-16",
                                   "config": "configs/ar/iar2-L-16.yaml"}]}
    tables["table12"] = {"title": "Table 12", "paper_csv": "table12_inference_settings.csv", "key": ["model", "tokens"],
                         "kind": "settings",
                         "rows": [{"key": {"model": "IAR2-B", "tokens": "16x16"}, "run": s12,
                                   "config": runs[s12]["config"]}]}

    # Figures
    figures: dict[str, dict] = {}
    series = []
    for name, slope in (("vq-1024", 1.0), ("sd-256-4096", 0.5)):
        rid = tok(name, 4.0) if name == "vq-1024" else "tok/sd-256-4096"
        f = f"analysis/code_distance/{name}.json"
        _json(root / f, {"results": [{"target": d, "achieved_mean": d,
                                      "mse_vs_source": {"mean": 0.02 + slope * d * d}, "lpips_vs_source": {"mean": 1 + slope * d},
                                      "mse_vs_recon": {"mean": slope * d * d}, "lpips_vs_recon": {"mean": slope * d}}
                                     for d in (0.0, 0.5, 1.0, 1.5)]})
        series.append({"label": name, "file": f, "run": rid})
    figures["fig3"] = {"title": "Figure 3", "kind": "code_distance", "series": series}
    pts = []
    for size, rfid, gfid in ((256, 5.0, 8.0), (1024, 4.0, 6.0), (4096, 3.0, 7.0)):
        t = tok(f"vq-{size}", rfid)
        smp = sample(f"ar/llamagen-B-16-vq{size}/e100", "main", gfid)
        pts.append({"x": size, "label": f"vq-{size}", "rfid": _src(f"tokenizers/vq-{size}/recon.json", "rfid", t),
                    "gfid": _src(f"{smp}/metrics.json", "fid", smp)})
    figures["fig4"] = {"title": "Figure 4", "kind": "codebook_sweep", "x": "codebook_size", "points": pts}
    static = []
    for x, fid in ((1.0, 30.0), (2.0, 22.0), (3.0, 26.0)):
        smp = sample("ar/iar2-B-24/e300", f"static-{x}", fid)
        static.append({"x": x, "fid": _src(f"{smp}/metrics.json", "fid", smp), "is": _src(f"{smp}/metrics.json", "isc_mean", smp)})
    pag_b = sample("ar/iar2-B-24/e300", "pag-1.75-3.0", 20.0)
    figures["fig7a"] = {"kind": "cfg_sweep", "series": [{"label": "IAR2-B", "static": static,
                        "pag": {"fid": _src(f"{pag_b}/metrics.json", "fid", pag_b),
                                "is": _src(f"{pag_b}/metrics.json", "isc_mean", pag_b)}}]}
    scaling = []
    for method in ("LlamaGen", "IAR2"):
        points = []
        for size in ("B", "L"):
            smp = f"ar/{method.lower()}-{size}-16/e50/main"
            points.append({"x": size, "params": 1000000, "fid": _src(f"{smp}/metrics.json", "fid", smp),
                           "is": _src(f"{smp}/metrics.json", "isc_mean", smp)})
        scaling.append({"label": method, "points": points})
    figures["fig7b"] = {"kind": "scaling", "series": scaling}
    epochs = []
    for label, vals in (("IAR2-B", {50: 15.0, 100: 12.0}), ("LlamaGen-B", {50: 18.0, 100: None})):
        points = []
        for ep, fid in vals.items():
            smp = sample(f"ar/{label.lower()}-24/e{ep}", "static-2.25", fid)
            points.append({"x": ep, "fid": _src(f"{smp}/metrics.json", "fid", smp),
                           "is": _src(f"{smp}/metrics.json", "isc_mean", smp)})
        epochs.append({"label": label, "points": points})
    figures["fig7c"] = {"kind": "epochs", "series": epochs}
    (root / "analysis").mkdir(parents=True, exist_ok=True)
    (root / "analysis/loss_curves.csv").write_text(
        "run,label,step,epoch,semantic_ce,detail_ce\n"
        + "".join(f"ar/iar2-B-16,IAR2-B,{s},{s / 100},{2.0 - s / 1000},{4.0 - s / 500}\n" for s in range(20, 420, 20)))
    (root / "ar/iar2-L-16").mkdir(parents=True, exist_ok=True)
    (root / "ar/iar2-L-16/metrics.csv").write_text(  # not in the CSV yet: read from the run's own log
        "step,loss,semantic_ce,detail_ce,grad_norm,lr,tokens_per_s,epoch\n"
        + "".join(f"{s},0,{1.8 - s / 1000},{3.5 - s / 500},1,0.0005,100,{s / 100}\n" for s in range(20, 320, 20)))
    figures["fig8"] = {"kind": "loss_curves", "file": "analysis/loss_curves.csv",
                       "series": [{"label": "IAR2-B", "run": "ar/iar2-B-16"}, {"label": "IAR2-L", "run": "ar/iar2-L-16"}]}
    grid = "ar/iar2-XL-24/e300/grid-pag-1.35-3.0/grid.png"
    (root / grid).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), (40, 120, 200)).save(root / grid)
    figures["fig9"] = {"kind": "grid", "images": [
        {"label": "IAR2-XL, PAG-CFG 1.35->3.0", "file": grid, "run": "ar/iar2-XL-24/e300/grid-pag-1.35-3.0"},
        {"label": "IAR2-B grid", "file": "ar/iar2-B-24/e300/grid/grid.png", "run": "ar/iar2-B-24/e300/grid"}]}

    registry = {"scale": "ci", "results": "results/ci", "git_commit": COMMIT,
                "protocol": {"dataset": "builtin: synthetic test data", "image_sizes": {"16": 16, "24": 24},
                             "extractor": "domain", "samples_per_set": 100, "reference": "train split, 200 images",
                             "recon_images": 50},
                "runs": runs, "tables": tables, "figures": figures}
    _json(root / "registry.json", registry)

    # MLflow-shaped store (the columns the report reads; MLflow's own schema has these names). One run id was
    # logged twice: the finished rerun must win over the failed first try.
    con = sqlite3.connect(root / "mlflow.db")
    con.executescript("""
        CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE runs (run_uuid TEXT PRIMARY KEY, experiment_id INTEGER, status TEXT, start_time INTEGER,
                           lifecycle_stage TEXT);
        CREATE TABLE tags (key TEXT, value TEXT, run_uuid TEXT);
        INSERT INTO experiments VALUES (1, 'iar2-ci');""")
    hier = "ar/iar2-B-24-sd128-fused_hierarchical/e100/static-2.25"
    for uuid, status, start in (("a" * 32, "FAILED", 1), (MLFLOW_T5_HIER, "FINISHED", 2)):
        con.execute("INSERT INTO runs VALUES (?, 1, ?, ?, 'active')", (uuid, status, start))
        con.execute("INSERT INTO tags VALUES ('run_id', ?, ?)", (hier, uuid))
    con.commit()
    con.close()
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"vq_train@sd-256-4096": {
        "cmd": "iar2 vq train", "outs": [{"path": "results/ci/tokenizers/sd-256-4096", "md5": "d" * 32 + ".dir"}]}}}))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    root = build_results(repo)
    out = repo / "reports" / "ci"
    summary = render_report(root, out, paper_dir=PAPER)
    return {"root": root, "out": out, "summary": summary, "html": (out / "index.html").read_text(),
            "md": (out / "report.md").read_text(), "prov": json.loads((out / "provenance.json").read_text())}


def _section(html: str, anchor: str) -> str:
    """The HTML from heading `anchor` to the next h3/h2."""
    start = html.index(f'id="{anchor}"')
    m = re.search(r"<h[23][ >]", html[start:])
    return html[start: start + m.start()] if m else html[start:]


def test_every_table_and_figure_is_present(report):
    html, md, out = report["html"], report["md"], report["out"]
    for i in range(1, 14):
        assert f'id="table{i}"' in html
        assert re.search(rf"^### .*Table {i}\b", md, re.M), f"table {i} missing from report.md"
    for fig in ("fig3", "fig4", "fig7a", "fig7b", "fig7c", "fig8"):
        assert f'id="{fig}"' in html
        png, svg = out / f"figures/{fig}.png", out / f"figures/{fig}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()[:1000]
        assert f'src="figures/{fig}.png"' in html and f"](figures/{fig}.png)" in md
    assert 'id="fig9"' in html and 'src="figures/fig9-0.png"' in html
    assert (out / "figures/fig9-0.png").is_file()
    assert "IAR2-B grid" in _section(html, "fig9") and "missing" in _section(html, "fig9")
    assert report["summary"]["figures"]["fig9"]["status"] == "partial"
    assert report["summary"]["figures"]["fig4"]["status"] == "ok"


def test_numbers_paper_values_and_differences(report):
    t5 = _section(report["html"], "table5")
    assert "6.88" in t5 and "175.70" in t5  # paper, as printed
    assert ">20.00<" in t5 and ">25.00<" in t5  # ours
    assert "+13.1" in t5  # 20.00 - 6.88
    assert "domain (iar2-refnet)" in t5 and "generated per set</b>: 100" in t5 and "synthetic test data" in t5
    t13 = _section(report["html"], "table13")
    assert "recon images</b>: 50" in t13 and ">1.05<" in t13 and ">2.50<" in t13
    md = report["md"]
    row = next(r for r in md.splitlines() if r.startswith("| Fused Hierarchical Prediction (Ours) | ours |"))
    assert "| 6.88 | 20.00 | +13.1 | 175.70 | 5.00 | -171 |" in row


def test_gaps_are_marked_missing(report):
    html, s = report["html"], report["summary"]["tables"]
    t9 = _section(html, "table9")
    # nine of twelve rows not run (two finished for Table 9, one for Figure 7a's PAG point), four columns each
    assert t9.count('class="ours missing"') == 9 * 4 and t9.count('<td class="k">missing</td>') == 9
    assert s["table9"]["ours"] == 12 and s["table9"]["missing"] == 36
    t4 = _section(html, "table4")
    assert "not in this scale&#x27;s registry" in t4 and "missing (not run at this scale)" in t4
    assert s["table4"]["in_registry"] is False and s["table4"]["ours"] == 0
    t2 = _section(html, "table2")
    biggan = re.search(r"<tr class=\"other\">.*?BigGAN.*?</tr>", t2).group(0)
    assert "not reproduced (other method)" in biggan and "6.95" in biggan
    assert "missing (not run at this scale)" in _section(html, "table2")  # e.g. IAR2-L: ours, but not at this scale
    t1 = _section(html, "table1")
    # finished rows (the paper prints (256, 4096) twice) lack precision/recall: partial; two unfinished: missing
    assert t1.count('<td class="k">partial</td>') == 4 and t1.count('<td class="k">missing</td>') == 2
    assert "no run for this cell in the registry" in t1


def test_settings_tables_from_resolved_configs(report):
    t11 = _section(report["html"], "table11")
    assert "AdamW" in t11 and "2.01M" in t11 and "0.0005" in t11 and "300 nominal; 400 steps = 12.8 epochs" in t11
    assert "dim 128" in t11 and "n_layer 4" in t11
    assert 'class="same">same<' in t11 and 'class="differs">differs<' in t11
    assert "config not written yet (configs/ar/iar2-L-16.yaml)" in t11
    assert ">0 (CPU)<" in t11  # GPUs: the scale's SLURM resources of the run (registry.json); none at this scale
    row = next(r for r in report["md"].splitlines() if r.startswith("| IAR2-B | 16x16 |") and "AdamW" in r)
    assert "| 256 | 32 | differs |" in row and "| 0.05 | 0.05 | same |" in row and "| 2.0 | 2 | same |" in row
    t12 = _section(report["html"], "table12")
    assert "1.75 (pag)" in t12 and "2.5 (pag)" in t12 and "guidance pag" in t12


def test_claims_checklist(report):
    res = {r["id"]: r for r in report["summary"]["claims"]["results"]}
    expect = {"C1": "reproduced", "C2": "reproduced", "C3": "reproduced", "C3b": "reproduced", "C4": "missing",
              "C6": "missing", "C7": "reproduced", "C8": "reproduced", "C9": "contradicted", "C10": "reproduced",
              "C11": "missing", "C13": "missing", "C13b": "reproduced", "C15": "missing", "C18": "reproduced",
              "C20": "reproduced", "C20b": "reproduced", "C22": "missing", "C23": "missing", "C24": "reproduced",
              "C25": "n/a", "C27": "missing"}
    assert {k: res[k]["status"] for k in expect} == expect
    assert "Alternating Prediction" in res["C9"]["detail"]
    tally = report["summary"]["claims"]["tally"]
    assert sum(tally.values()) == len(res) == len(load_claims(PAPER / "claims.yaml"))
    assert tally["reproduced"] == sum(r["status"] == "reproduced" for r in res.values())
    claims_md = (report["out"] / "claims.md").read_text()
    assert (f"**{tally['reproduced']} reproduced, {tally['contradicted']} contradicted, {tally['inconclusive']} "
            f"inconclusive, {tally['missing']} missing") in claims_md
    assert 'id="claim-C9"' in report["html"]


def test_provenance(report):
    root, prov = report["root"], report["prov"]
    hier = "ar/iar2-B-24-sd128-fused_hierarchical/e100/static-2.25"
    rec = next(p for p in prov if p.get("table") == "table5" and p["run"] == hier and p["column"] == "fid")
    cfg = root / "configs/sampling/static-2.25.yaml"
    assert rec["config_hash"] == hashlib.sha256(cfg.read_bytes()).hexdigest()[:12]
    assert rec["mlflow_run"] == MLFLOW_T5_HIER  # the finished rerun, not the failed first try
    assert rec["git_commit"] == COMMIT and rec["ours"] == 20.0 and rec["paper"] == "6.88"
    tok = next(p for p in prov if p.get("table") == "table13" and p["run"] == "tok/sd-256-4096")
    assert tok["file_dvc_md5"] == "d" * 32 + ".dir" and tok["dvc_md5"] == "d" * 32 + ".dir"
    assert all(p["mlflow_run"] is None for p in prov if p["run"] == "tok/vq-16384")
    t5 = _section(report["html"], "table5")
    assert rec["config_hash"] in t5 and MLFLOW_T5_HIER in t5 and COMMIT in t5
    assert "snakemake --cores all table5 --config scale=ci" in t5
    assert "snakemake --cores all fig7 --config scale=ci" in _section(report["html"], "fig7b")


def test_rules_hold_on_the_papers_own_numbers():
    """Each table-based rule is run on the paper's tables: the paper's own numbers must support its claims."""
    tables = {f"table{i}": load_paper_table(p, "") for i, p in
              ((int(p.name[5:7]), p) for p in sorted(PAPER.glob("table*.csv")))}
    data = Dataset({k: [derive_columns(r) for r in t.rows] for k, t in tables.items()}, paper=True)
    outcomes = {c.id: evaluate(c.rule, data).status for c in load_claims(PAPER / "claims.yaml")}
    table_claims = ["C4", "C5", "C6", "C7", "C8", "C9", "C10", "C11", "C12", "C14", "C15", "C16", "C17", "C18",
                    "C19", "C20", "C21", "C22", "C27", "C30", "C32", "C33", "C34"]
    assert {c: outcomes[c] for c in table_claims} == {c: "reproduced" for c in table_claims}
    # and a rule that is false on them is reported as such (IS does not rise B -> L -> XL -> XXL everywhere)
    bad = {"ordered": {"from": "table3", "col": "is", "group_by": ["tokens", "epochs", "method"], "by": "size",
                       "order": ["B", "L", "XL", "XXL"], "direction": "increasing"}}
    assert evaluate(bad, data).status == "contradicted"


def test_no_registry_renders_everything_missing(tmp_path):
    (tmp_path / "results" / "x").mkdir(parents=True)
    assert cli_main(["report", "--results", str(tmp_path / "results/x"), "--out", str(tmp_path / "out"),
                     "--paper", str(PAPER)]) == 0
    s = json.loads((tmp_path / "out/summary.json").read_text())
    assert all(t["ours"] == 0 for t in s["tables"].values()) and len(s["tables"]) == 13
    assert s["claims"]["tally"]["reproduced"] == 0 and s["claims"]["tally"]["contradicted"] == 0
    assert all(f["status"] == "missing" for f in s["figures"].values())
    assert (tmp_path / "out/figures/fig4.png").is_file()  # the paper's points still drawn


def test_unreadable_or_incomplete_metric_files_are_missing(tmp_path):
    from iar2.report.sources import Results

    (tmp_path / "a").mkdir()
    (tmp_path / "a/metrics.json").write_text('{"fid": 3.5')  # a job still writing (or killed mid-write)
    (tmp_path / "b.json").write_text('{"fid": 3.5, "nested": {"x": 1}}')
    r = Results.open(tmp_path)
    assert r.cell({"file": "a/metrics.json", "field": "fid"}).status == "missing"
    assert r.cell({"file": "b.json", "field": "isc_mean"}).status == "no-field"
    assert r.cell({"file": "b.json", "field": "nested.x"}).value == 1
    assert r.cell({"file": "absent.json", "field": "fid"}).status == "missing"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["report", "--help"])
    assert e.value.code == 0
    assert "--results" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "report" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real browser

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser(binary: str, page: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                           *extra, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)


def _selfcheck(dom: str) -> dict:
    m = re.search(r'<div id="selfcheck"([^>]*)>', dom)
    assert m, "no #selfcheck element in the dumped DOM"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))
    return {k: (json.loads(attrs[k].replace("&quot;", '"')) if k in ("data-broken", "data-errors") else attrs.get(k))
            for k in ("data-status", "data-images", "data-broken", "data-errors")}


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (Debian package `chromium`) on PATH")
def test_page_in_headless_chromium(report, tmp_path_factory):
    binary = _chromium()
    page = report["out"] / "index.html"
    res = _browser(binary, page, "--dump-dom", "--enable-logging=stderr", "--v=0")
    assert res.returncode == 0, res.stderr[-2000:]
    check = _selfcheck(res.stdout)
    assert check["data-status"] == "done"
    assert check["data-broken"] == [] and check["data-errors"] == []
    assert int(check["data-images"]) == 7  # six plotted figures + one sample grid
    assert "Uncaught" not in res.stderr and ":CONSOLE" not in res.stderr
    assert 'id="table13"' in res.stdout

    art = Path(os.environ.get("IAR2_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    art.mkdir(parents=True, exist_ok=True)
    shot = art / "report-ci.png"
    res = _browser(binary, page, f"--screenshot={shot}", "--window-size=1280,1800", "--hide-scrollbars")
    assert res.returncode == 0 and shot.is_file()
    with Image.open(shot) as im:
        assert im.size == (1280, 1800) and len(set(im.convert("L").resize((64, 64)).getdata())) > 8  # not blank
    print(f"\nreport screenshot: {shot}")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (Debian package `chromium`) on PATH")
def test_selfcheck_catches_broken_images_and_errors(tmp_path):
    """The in-page check must see a broken image and a script error (else a clean result means nothing)."""
    page = tmp_path / "bad.html"
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    page.write_text(f'<html><head><script>{SELFCHECK_JS}</script></head><body><img src="ok.png">'
                    '<img src="absent.png"><script>notDefinedAnywhere();</script>'
                    '<div id="selfcheck" data-status="pending" hidden></div></body></html>')
    check = _selfcheck(_browser(_chromium(), page, "--dump-dom").stdout)
    assert check["data-status"] == "done" and check["data-images"] == "2"
    assert check["data-broken"] == ["absent.png"]
    assert any("notDefinedAnywhere" in e for e in check["data-errors"])


def test_snakemake_report_captions_render():
    """The RST captions for Snakemake's report() render (Jinja, then docutils) without a warning."""
    import jinja2
    from docutils.core import publish_parts

    class Snakemake:
        config = {"scale": "ci"}

    captions = sorted((Path(__file__).resolve().parents[1] / "workflow" / "report").glob("*.rst"))
    assert {p.stem for p in captions} >= {"workflow", "report", "tables", "claims", "fig_tokenizer",
                                          "fig_guidance_scaling", "fig_training", "samples"}
    for p in captions:
        text = jinja2.Template(p.read_text()).render(snakemake=Snakemake)
        assert "``ci``" in text
        body = publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})["body"]
        assert "system-message" not in body and "<code" in body.replace("<tt", "<code"), p.name


def test_a_figure_panel_is_its_rows_of_the_sample_sheet(tmp_path):
    # Figures 9-11 come from one sheet (one row per class): a panel is rows [first, stop) of it
    import numpy as np
    from PIL import Image

    from iar2.report.figures import _copy_grid

    sheet = np.zeros((3 * 10, 20, 3), np.uint8)
    for r, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        sheet[r * 10:(r + 1) * 10] = colour
    Image.fromarray(sheet).save(tmp_path / "grid.png")
    _copy_grid(tmp_path / "grid.png", tmp_path / "p.png", [1, 3], 3)
    got = np.asarray(Image.open(tmp_path / "p.png"))
    assert got.shape == (20, 20, 3) and (got[:10] == (0, 255, 0)).all() and (got[10:] == (0, 0, 255)).all()
    _copy_grid(tmp_path / "grid.png", tmp_path / "all.png", None, None)
    assert (tmp_path / "all.png").read_bytes() == (tmp_path / "grid.png").read_bytes()


def test_a_panel_with_no_rows_left_is_not_drawn(tmp_path):
    # a scale with four grid classes fills Figure 9 only: Figures 10 and 11 are shown as absent, not cropped empty
    from iar2.grid_panels import grid_panels
    from iar2.report.figures import FigureView, _grid, render_figures
    from iar2.report.sources import Results

    (tmp_path / "res").mkdir()
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.new("RGB", (20, 40)).save(tmp_path / "res" / "grid.png")
    panels = [{"figure": f, "classes": {i: f"c{i}" for i in range(4 * k, 4 * k + 4)}} for k, f in enumerate((9, 10, 11))]
    reg = {"images": grid_panels(panels, [0, 1, 2, 3], "IAR2-XL", "grid.png", "ar/x")}
    assert [im["rows"] for im in reg["images"]] == [[0, 4], [4, 4], [4, 4]]
    results = Results(tmp_path / "res")
    v = FigureView(name="fig9", title="Figures 9-11", kind="grid")
    _grid(v, reg, results)
    assert [im["present"] for im in v.images] == [True, False, False]
    render_figures([v], results, tmp_path / "out")  # used to fail: "cannot write empty image"
    assert (tmp_path / "out" / "figures" / "fig9-0.png").is_file()


def test_readings_table_in_readme_and_report(report):
    from iar2.report.readings import COLUMNS, load_readings, markdown_table

    rows = load_readings(PAPER)
    topics = " ".join(r["topic"] for r in rows)
    for must in ("Local-context source", "Rotary", "PAG-CFG progress", "alternating and grouped", "LlamaGen and IAR",
                 "Figure 3", "Equal training time", "Table 1's (256, 4096)", "Table 13"):
        assert must in topics
    assert all(str(r[k]).strip() for r in rows for k, _ in COLUMNS)
    assert markdown_table(rows) in (Path(__file__).resolve().parents[1] / "README.md").read_text()  # README's copy equals the source
    assert 'id="readings"' in report["html"] and "context_source: token" in report["html"]
    assert "## Readings and deviations" in report["md"]
