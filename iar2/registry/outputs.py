"""Small outputs of the DAG computed from the plan and the files its jobs wrote: Figure 8's loss curves and the
flat summary of headline numbers DVC tracks."""
from __future__ import annotations

import json
from pathlib import Path

from iar2 import layout
from iar2.io import atomic_write_json, atomic_write_text
from iar2.registry.index import tok_run_id
from iar2.registry.plan import Plan


def write_loss_curves(plan: Plan, runs: list[str], out: str | Path) -> None:
    """Figure 8's CSV: step, epoch, semantic and detail CE of each run's metrics.csv, labelled by size."""
    import pandas as pd  # slow to import; only this localrule needs it

    frames = []
    for rid in runs:
        df = pd.read_csv(Path(plan.results) / layout.train_metrics(rid))
        r = plan.runs[rid]
        df = df[[c for c in ("step", "epoch", "semantic_ce", "detail_ce", "loss") if c in df]]
        frames.append(df.assign(run=layout.run_dir(rid), label=f"{plan.families[r.family]['label']}-{r.size}"))
    atomic_write_text(out, pd.concat(frames).to_csv(index=False))


def write_summary(plan: Plan, out: str | Path) -> None:
    """results/<scale>/summary.json: headline numbers of every run, flat ("<run id>.<metric>"), for DVC."""
    res, flat = Path(plan.results), {}
    for tok in plan.trained_tokenizers():
        p = res / layout.recon(tok)
        if p.is_file():
            d = json.loads(p.read_text())
            flat.update({f"{tok_run_id(tok)}.{k}": d[k] for k in ("rfid", "psnr", "ssim") if k in d})
    for s in plan.samples.values():
        p = res / layout.gen_metrics(s.id)
        if not s.is_grid and p.is_file():
            d = json.loads(p.read_text())
            flat.update({f"{layout.sample_dir(s.id)}.{k}": d[k] for k in ("fid", "isc_mean", "precision", "recall")
                         if k in d})
    atomic_write_json(out, dict(sorted(flat.items())))
