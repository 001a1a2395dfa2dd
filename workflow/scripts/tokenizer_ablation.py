"""Tokenizer ablations beside the DAG's tokenizers (issues 13 and 16): another straight-through estimator, more steps.

    python workflow/scripts/tokenizer_ablation.py [--results results/default] [--estimator legacy|paper]
        [--steps-factor F] [--batch-factor F] [--tokenizers vq-16384 sd-256-4096] [--ar-runs llamagen-B-16 iar2-B-16]

The DAG's tokenizers (results/<scale>/tokenizers/<tok>/recon.json, the paper's z + sg(c - z), the scale's steps)
are the reference. The variant retrains the same tokenizers from the same configs, seeds and data, changing only:
- --estimator legacy: the estimator commit 17e31dc replaced, c + (z - sg z), which lets the reconstruction (and
  perceptual, GAN) gradients reach the codebooks. It is swapped in by patching the one function in this process
  only; nothing in the package changes.
- --steps-factor F: every stage's train.steps times F (single and dual alike: equal compute stays equal).
- --batch-factor F: every stage's train.batch_size times F, the steps unchanged: whether the plateau is bound by
  optimiser steps (the codebooks move by about the learning rate per step) or by images seen, at a fraction of
  the compute.
It evaluates them with the recon_eval rule's settings. The DAG's own artifacts are only read.
Writes <out>/ablation.json and prints the table. Run it after the workflow has built the tokenizers.

With --ar-runs (e.g. llamagen-B-16 iar2-B-16) it also trains those AR runs, from their own configs, on tokens of
the legacy tokenizers and diagnoses them as rule diagnose_ar does (<results>/diagnose/ar-<run>.json is the "after"),
so the estimator's effect on generation is measured with everything else equal.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from iar2.fingerprint import short_key  # folders named by what they were computed from

METRICS = ("rfid", "psnr", "ssim", "lpips")


def _legacy_straight_through(z, c):
    # The estimator before 17e31dc: forward value c, gradient identity to z AND to the codebook rows in c.
    return (c + (z - z.detach())).permute(0, 3, 1, 2).contiguous()


def _run(argv: list[str]) -> None:
    from iar2.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"iar2 {' '.join(argv)} exited {rc}")


def _stages(results: Path, tok: str) -> list[str]:
    cfgs = results / "configs" / "tokenizer"
    if (cfgs / f"{tok}-stage2.yaml").is_file():
        return ["stage1", "stage2"]
    if (cfgs / f"{tok}-single.yaml").is_file():
        return ["single"]
    raise SystemExit(f"{cfgs}/{tok}-*.yaml not found: build the tokenizer first (snakemake {results}/tokenizers/"
                     f"{tok}/recon.json)")


def _tok_dir(results: Path, scale_file: Path, tok: str, out: Path, variant: str) -> Path:
    cfgs = [results / "configs" / "tokenizer" / f"{tok}-{st}.yaml" for st in _stages(results, tok)]
    key = short_key(variant, *cfgs, results / "data" / "check.json", results / "refnet" / "refnet.safetensors",
                    scale_file, Path(__file__))
    return out / f"{tok}-{key}"


def _retrain(results: Path, tok: str, out: Path, steps_factor: float, batch_factor: float = 1.0) -> Path:
    """Train tok's stages (the variant) under `out` (a folder keyed by their inputs); returns the final weights."""
    weights = None
    for stage in _stages(results, tok):
        run_dir = out / (stage if stage == "stage1" else "")
        cfg_file = results / "configs" / "tokenizer" / f"{tok}-{stage}.yaml"
        train = yaml.safe_load(cfg_file.read_text())["train"]
        steps = int(round(train["steps"] * steps_factor))
        batch = max(1, int(round(train["batch_size"] * batch_factor)))
        sets = ["--set", f"train.steps={steps}", "--set", f"train.batch_size={batch}"]
        if stage == "stage2":  # start from the variant's stage 1, not the DAG's
            sets.append(f"train.init_from={out / 'stage1' / 'vq.safetensors'}")
        if not (run_dir / "vq.safetensors").is_file():
            _run(["vq", "train", "--config", str(cfg_file), *sets, "--out", str(run_dir), "--resume", "auto"])
        weights = run_dir / "vq.safetensors"
    return weights


def _eval(results: Path, scale_cfg: dict, vq: Path, out: Path) -> dict:
    e = scale_cfg.get("recon_eval", {})
    if not out.is_file():
        argv = ["vq", "eval", "--vq", str(vq), "--data", scale_cfg["data"]["root"],
                "--report", str(results / "data" / "check.json"), "--out", str(out)]
        if e.get("extractor"):
            argv += ["--extractor", e["extractor"]]
        if e.get("perceptual"):
            argv += ["--perceptual", e["perceptual"]]
        if e.get("extractor") == "domain" or e.get("perceptual") == "domain":
            argv += ["--domain-net", str(results / "refnet" / "refnet.safetensors")]
        if e.get("max_images"):
            argv += ["--max-images", str(e["max_images"])]
        _run(argv)
    return json.loads(out.read_text())


def _pick(recon: dict) -> dict:
    return {k: recon.get(k) for k in METRICS}


def _ar_legacy(results: Path, scale_cfg: dict, run: str, vq: Path, out: Path) -> dict:
    """Tokens of the legacy tokenizer, the run trained on them with its own config, then `iar2 diagnose ar`."""
    cfg_file = results / "configs" / "ar" / f"{run}.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    # the same image size and augmentation as the DAG's tokens of this run
    dag_meta = Path(cfg["train"]["tokens"]) / "meta.json"
    dag_tokens = json.loads(dag_meta.read_text())
    out = out / f"{run}-{short_key(cfg_file, dag_meta, vq, Path(__file__))}"  # keyed: a changed input starts over
    size, aug = dag_tokens["image_size"], dag_tokens["aug"]
    data, report = scale_cfg["data"]["root"], str(results / "data" / "check.json")
    tok = out / "tokens"
    if not (tok / "meta.json").is_file():
        _run(["tokenize", "--vq", str(vq), "--data", data, "--split", "train", "--report", report,
              "--aug", aug, "--image-size", str(size), "--out", str(tok)])
    val = out / "tokens-val"
    if not (val / "meta.json").is_file():
        _run(["tokenize", "--vq", str(vq), "--data", data, "--split", "val", "--report", report, "--aug", "none",
              "--image-size", str(size), "--out", str(val)])
    ar = out / "ar"
    if not (ar / "model.safetensors").is_file():
        _run(["ar", "train", "--config", str(results / "configs" / "ar" / f"{run}.yaml"), "--set",
              f"train.tokens={tok}", f"name={out.name}-{out.parent.name}", "--out", str(ar), "--resume", "auto"])
    diag = out / "diagnose.json"
    if not diag.is_file():
        d = scale_cfg.get("diagnosis", {})
        _run(["diagnose", "ar", "--ar", str(ar / "model.safetensors"), "--vq", str(vq), "--tokens", str(tok),
              "--heldout", str(val), "--max-eval", str(d.get("max_images", 200)), "--domain-net",
              str(results / "refnet" / "refnet.safetensors"), "--data", data, "--report", report,
              "--cache-dir", str(results / "cache" / "reference"), "--per-class", str(d.get("per_class", 10)),
              "--scales", *[str(x) for x in d.get("scales", [2.0])], "--out", str(diag)])
    return json.loads(diag.read_text())


def _ar_summary(d: dict) -> dict:
    s = {f"fid {k}": v.get("fid") for k, v in d.get("samples", {}).items()}
    ho = d.get("teacher_forced", {}).get("heldout", {})
    s.update({f"held-out CE {lv}": ho.get(lv, {}).get("ce") for lv in d.get("levels", [])})
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results/default", help="the scale's results folder (built by the DAG)")
    ap.add_argument("--scale-file", default=None, help="params/<scale>.yaml (default: from the results folder name)")
    ap.add_argument("--tokenizers", nargs="+", default=["vq-16384", "sd-256-4096"], help="tokenizer ids")
    ap.add_argument("--estimator", choices=["legacy", "paper"], default="legacy",
                    help="legacy: c + (z - sg z) (before 17e31dc); paper: z + sg(c - z), as the DAG")
    ap.add_argument("--steps-factor", type=float, default=1.0, help="every tokenizer stage's steps times this")
    ap.add_argument("--batch-factor", type=float, default=1.0, help="every tokenizer stage's batch size times this")
    ap.add_argument("--out", default=None, help="output folder (default: <results>/diagnose/ablation/<variant>)")
    ap.add_argument("--ar-runs", nargs="*", default=[], help="AR runs to retrain on the legacy tokenizers' tokens")
    args = ap.parse_args(argv)
    results = Path(args.results)
    scale_file = Path(args.scale_file or f"params/{results.name}.yaml")
    scale_cfg = yaml.safe_load(scale_file.read_text())
    if args.steps_factor <= 0 or args.batch_factor <= 0:
        ap.error("--steps-factor and --batch-factor must be > 0")
    variant = f"{args.estimator}-x{args.steps_factor:g}" + (f"-b{args.batch_factor:g}" if args.batch_factor != 1 else "")
    if variant == "paper-x1":
        ap.error("that variant is the DAG's own tokenizers: change --estimator, --steps-factor or --batch-factor")
    out = Path(args.out or results / "diagnose" / "ablation" / variant)
    out.mkdir(parents=True, exist_ok=True)

    import iar2.tokenizer.semantic_detail_quantizer as sdq

    paper_st = sdq._straight_through
    rows = {}
    legacy_vq = {}
    for tok in args.tokenizers:
        after_file = results / "tokenizers" / tok / "recon.json"
        if not after_file.is_file():
            raise SystemExit(f"{after_file} not found: build it first (snakemake {after_file})")
        if args.estimator == "legacy":
            sdq._straight_through = _legacy_straight_through
        try:
            tok_dir = _tok_dir(results, scale_file, tok, out, variant)
            weights = _retrain(results, tok, tok_dir, args.steps_factor, args.batch_factor)
        finally:
            sdq._straight_through = paper_st
        legacy_vq[tok] = weights
        before = _eval(results, scale_cfg, weights, tok_dir / "recon.json")
        rows[tok] = {variant: _pick(before), "DAG (paper, x1)": _pick(json.loads(after_file.read_text()))}
    for run in args.ar_runs:
        cfg = yaml.safe_load((results / "configs" / "ar" / f"{run}.yaml").read_text())
        tok = Path(cfg["train"]["tokens"]).parent.name  # results/<scale>/tokens/<tok>/g<grid>
        if tok not in legacy_vq:
            raise SystemExit(f"--ar-runs {run}: its tokenizer {tok} is not among --tokenizers")
        after = results / "diagnose" / f"ar-{run}.json"
        if not after.is_file():
            raise SystemExit(f"{after} not found: build it first (snakemake --cores all diagnosis)")
        rows[run] = {variant: _ar_summary(_ar_legacy(results, scale_cfg, run, legacy_vq[tok], out)),
                     "DAG (paper, x1)": _ar_summary(json.loads(after.read_text()))}
    tmp = out / f"ablation.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(out / "ablation.json")
    for what, r in rows.items():
        for name, m in r.items():
            print(f"{what:<16} {name:<22} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} -"
                                                       for k, v in m.items()))
    print(f"written {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
