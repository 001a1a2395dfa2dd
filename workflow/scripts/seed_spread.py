"""How much of an FID difference is the training run's own noise? Retrain DAG runs with other seeds and compare.

    python workflow/scripts/seed_spread.py [--results results/default] [--runs iar2-B-24 llamagen-B-24]
        [--seeds 1 2] [--epochs 100 300]

The claims' intervals (iar2/bootstrap.py) resample the generated and reference images: they hold the trained
weights fixed, so they measure sampling noise only. Two runs of the same code on two machines gave IAR2-B-24's
300-epoch FID 8.9 and 28.2 (README, "Why IAR2 loses"): at this scale the weights a run ends on vary more than the
samples do. This script measures that spread. Each run is retrained from the DAG's own config
(<results>/configs/ar/<run>.yaml, the same tokens) with only train.seed changed, sampled at each epoch with the
DAG's sample config of that (run, epoch, guidance), and scored with the gen_metrics rule's settings (its bootstrap
replicates included). The DAG's seed-0 result is read from its metrics.json; with --set, seed 0 is
retrained too. Jobs run with one torch thread, as the DAG's do (`_run`), so seed k here is the DAG's seed copy
`<run>-seed<k>` (iar2/seeds.py) when the scale trains one. The DAG's artifacts are only read; everything is written under
<results>/diagnose/seeds/, in folders keyed by what they were computed from (a changed input starts over).

Prints, per (run, epoch), every seed's FID, their mean and standard deviation, and the seed-0 set's bootstrap
interval half-width beside it; writes <results>/diagnose/seeds/spread.json and spread.png (every study so far).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from iar2.fingerprint import short_key
from iar2.io import atomic_path


def _run(argv: list[str]) -> None:
    """`iar2 <argv>` in this process with one torch thread, as the DAG's jobs run (Snakemake sets OMP_NUM_THREADS
    to a rule's threads, 1 here): on a CPU the thread count changes the order of float reductions, and measured at
    the default scale 2 threads instead of 1 gave IAR2-B-24's seed-1 weights a max difference of 0.096 and its
    300-epoch FID 7.2 instead of 16.8. With one thread, seed k here is the DAG's `<run>-seed<k>` bit for bit."""
    import torch

    from iar2.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    if rc:
        raise SystemExit(f"iar2 {' '.join(argv)} exited {rc}")




def _guidance(results: Path, run: str, epochs: list[int], guidance: str | None) -> str:
    """The guidance folder to compare at every epoch: the one named, else the one the DAG sampled at all of them
    (the static one if several: Figure 7c's)."""
    common = None
    for e in epochs:
        base = results / "configs" / "sampling" / run / f"e{e}"
        names = {p.stem for p in base.glob("*.yaml")} if base.is_dir() else set()
        if guidance and guidance not in names:
            raise SystemExit(f"{base}/{guidance}.yaml not found; the DAG sampled {run} at epoch {e} with: "
                             f"{', '.join(sorted(names)) or 'nothing'}")
        common = names if common is None else common & names
    if guidance:
        return guidance
    if not common:
        raise SystemExit(f"the DAG has no sample set of {run} with one guidance at every epoch of {epochs} "
                         "(build them first, or name one with --guidance)")
    static = sorted(n for n in common if n.startswith("static-"))
    return (static or sorted(common))[0]


def half_width(metrics: dict) -> float | None:
    """Half the 95 % percentile interval of a sample set's bootstrap FID replicates (None without them)."""
    reps = (metrics.get("bootstrap") or {}).get("fid")
    if not reps or len(reps) < 2:
        return None
    from iar2.bootstrap import percentile_interval

    lo, hi = percentile_interval(reps)
    return (hi - lo) / 2


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """Welch's t interval of mean(a) - mean(b): the training runs of each side are the samples."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    d = statistics.fmean(a) - statistics.fmean(b)
    se = (va + vb) ** 0.5
    if se == 0:
        return d, d
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = stats.t.ppf(0.5 + level / 2, df)
    return d - t * se, d + t * se


def compare(table: dict, runs: list[str]) -> dict:
    """For each pair of runs sampled at the same epoch: the difference of their seed means and its interval."""
    out = {}
    keys = list(table)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            ra, ea = a.split("/")[:2]
            rb, eb = b.split("/")[:2]
            if ea != eb or ra == rb or a.partition(" [")[2] != b.partition(" [")[2]:  # same epoch and variant
                continue
            fa, fb = list(table[a]["fid_by_seed"].values()), list(table[b]["fid_by_seed"].values())
            if min(len(fa), len(fb)) < 2:
                continue
            out[(a, b)] = {"difference": statistics.fmean(fa) - statistics.fmean(fb),
                           "interval": welch_interval(fa, fb), "seeds": min(len(fa), len(fb))}
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def retrain_and_score(results: Path, scale_cfg: dict, run: str, seed: int, epochs: list[int],
                      guidance: dict[int, str], out_root: Path, overrides: list[str] = ()) -> dict[int, dict]:
    cfg_file = results / "configs" / "ar" / f"{run}.yaml"
    if not cfg_file.is_file():
        raise SystemExit(f"{cfg_file} not found: build the run first (snakemake {results}/ar/{run}/model.safetensors)")
    cfg = yaml.safe_load(cfg_file.read_text())
    tokens = Path(cfg["train"]["tokens"])
    tok = tokens.parent.name  # <results>/tokens/<tok>/g<grid>
    vq = results / "tokenizers" / tok / "vq.safetensors"
    sample_cfgs = {e: results / "configs" / "sampling" / run / f"e{e}" / f"{guidance[e]}.yaml" for e in epochs}
    # the tokens' contents (not only their meta), the tokenizer, the sample configs and this script
    key = short_key(cfg_file, tokens, vq, *sample_cfgs.values(), seed, sorted(overrides), Path(__file__))
    out = out_root / f"{run}-seed{seed}-{key}"
    ar = out / "ar"
    if not (ar / "model.safetensors").is_file():
        _run(["ar", "train", "--config", str(cfg_file), "--set", f"train.seed={seed}", f"name={run}-seed{seed}",
              *overrides, "--out", str(ar), "--resume", "auto"])
    m = scale_cfg.get("gen_metrics", {})
    boot = int(m.get("bootstrap", 200))  # the DAG's replicates: a retrained seed's interval is read the same way
    data, report = scale_cfg["data"]["root"], str(results / "data" / "check.json")
    refnet = results / "refnet" / "refnet.safetensors"
    # scores depend on the settings and on the feature network and reference images: a change to any rescores
    mkey = short_key(m.get("extractor", "domain"), m.get("max_reference", 1000), boot, refnet, Path(data),
                     Path(report))
    scores = {}
    for e in epochs:
        sdir = out / f"e{e}" / guidance[e]
        if not (sdir / "samples.npz").is_file():
            _run(["sample", "--ar", str(ar / f"model_e{e:03d}.safetensors"), "--vq", str(vq),
                  "--config", str(sample_cfgs[e]), "--out", str(sdir)])
        met = sdir / f"metrics-{mkey}.json"
        if not met.is_file():
            _run(["metrics", "--samples", str(sdir / "samples.npz"), "--data", data, "--split", "train",
                  "--report", report, "--extractor", m.get("extractor", "domain"),
                  "--domain-net", str(refnet),
                  "--max-reference", str(m.get("max_reference", 1000)), "--bootstrap", str(boot),
                  "--cache-dir", str(results / "cache" / "reference"), "--out", str(met)])
        scores[e] = json.loads(met.read_text())
    return scores


def plot(table: dict, path: Path) -> None:
    """One row per sample set: each seed's FID as a dot, the mean as a bar, the seed-0 bootstrap interval as a line
    (so the two kinds of noise are seen side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    for y, k in enumerate(names):
        v = table[k]
        fids = list(v["fid_by_seed"].values())
        ax.scatter(fids, [y] * len(fids), color="tab:blue", s=18, zorder=3, label="one seed" if y == 0 else None)
        ax.plot([v["mean"]] * 2, [y - 0.3, y + 0.3], color="black", lw=2, label="mean over seeds" if y == 0 else None)
        hw = v.get("bootstrap_half_width")
        if hw is not None:
            f0 = v["fid_by_seed"].get("0", v["mean"])
            ax.plot([f0 - hw, f0 + hw], [y - 0.15] * 2, color="tab:orange", lw=3,
                    label="seed 0: 95 % bootstrap interval" if y == 0 else None)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("FID")
    ax.set_title("Training-seed spread against sampling noise", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results/default"))
    p.add_argument("--scale-file", type=Path, help="the scale's params file (default: params/<results' name>.yaml)")
    p.add_argument("--runs", nargs="+", default=["iar2-B-24", "llamagen-B-24"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="seeds besides the DAG's (its train.seed)")
    p.add_argument("--epochs", nargs="+", type=int, default=[100, 300])
    p.add_argument("--guidance", help="guidance folder to sample with (default: the DAG's, static if several)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="AR config overrides for every retrained run, e.g. train.lr_schedule=cosine (then seed 0 "
                        "is retrained too, and the sets are named with them)")
    args = p.parse_args(argv)
    results = args.results
    scale_file = args.scale_file or Path("params") / f"{results.name}.yaml"
    scale_cfg = yaml.safe_load(scale_file.read_text())
    out_root = results / "diagnose" / "seeds"
    table = {}
    for run in args.runs:
        g = _guidance(results, run, args.epochs, args.guidance)
        guidance = {e: g for e in args.epochs}
        dag = {}
        for e in args.epochs:
            met = results / "ar" / run / f"e{e}" / guidance[e] / "metrics.json"
            if not met.is_file():
                raise SystemExit(f"{met} not found: build it first (snakemake {met})")
            dag[e] = json.loads(met.read_text())
        per_seed = {} if args.overrides else {0: dag}  # a variant's seed 0 is its own, retrained
        for s in ([0] if args.overrides else []) + [s for s in args.seeds if s or not args.overrides]:
            per_seed[s] = retrain_and_score(results, scale_cfg, run, s, args.epochs, guidance, out_root,
                                            args.overrides)
        variant = f" [{' '.join(args.overrides)}]" if args.overrides else ""
        for e in args.epochs:
            vals = [per_seed[s][e]["fid"] for s in per_seed]
            table[f"{run}/e{e}/{guidance[e]}{variant}"] = {
                "fid_by_seed": {str(s): per_seed[s][e]["fid"] for s in per_seed}, **spread(vals),
                "bootstrap_half_width": half_width(per_seed[0][e])}  # seed 0's (the DAG's, or the variant's)
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / "spread.json"  # one file for every study: a later call adds or replaces its own sets
    kept = json.loads(path.read_text()) if path.is_file() else {}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**kept, **table}, indent=1) + "\n")
    plot({**kept, **table}, out_root / "spread.png")
    print(f"{'sample set':44s} {'FID by seed':34s} {'mean':>6s} {'sd':>5s} {'boot +-':>7s}")
    for k, v in table.items():
        seeds = " ".join(f"{s}:{f:.2f}" for s, f in v["fid_by_seed"].items())
        sd = f"{v['sd']:.2f}" if v["sd"] is not None else "-"
        hw = f"{v['bootstrap_half_width']:.2f}" if v["bootstrap_half_width"] is not None else "-"
        print(f"{k:44s} {seeds:34s} {v['mean']:6.2f} {sd:>5s} {hw:>7s}")
    for (a, b), d in compare(table, args.runs).items():
        print(f"{a} - {b}: {d['difference']:+.2f} FID, 95 % interval over seeds "
              f"[{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}] ({d['seeds']} seeds each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
