"""The report's "Diagnosis" section: the scale's IAR2 and LlamaGen runs taken apart (workflow/rules/diagnosis.smk).

Reads what `iar2 diagnose` wrote under results/<scale>/diagnose/ (tok-<tok>.json, ar-<run>.json, budget.json and
the PNGs) and renders four tables (tokenizers, teacher-forced fit, samples, budget) and a list of observations.
Every observation is computed from those files here, never typed: a reviewer can tell from them whether a gap at
a small scale comes from a defect (a flat decode, a class that does not reach the head, an unconverged loss) or
from scale. Nothing here is rendered when the scale file names no `diagnosis.runs`.
"""
from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from iar2 import layout


@dataclass
class Diagnosis:
    ar: dict[str, dict]  # run id -> ar-<run>.json
    tokenizers: dict[str, dict]  # tokenizer id -> tok-<tok>.json
    budget: dict = field(default_factory=dict)
    pngs: dict[str, Path] = field(default_factory=dict)  # label -> file


def load(results_root: str | Path) -> Diagnosis | None:
    """The diagnosis the workflow built, or None. budget.json (written last, by rule diagnose_budget) names the
    runs and tokenizers of the scale's current `diagnosis.runs`: only their files are read, so a file left over
    from an earlier choice of runs never reaches the report."""
    root = Path(results_root)
    budget_path = root / layout.diagnosis_budget()
    if not budget_path.is_file():
        return None
    budget = json.loads(budget_path.read_text())
    runs, toks = list(budget.get("ar") or {}), list(budget.get("tokenizers") or {})
    files = [layout.diagnosis_ar(r) for r in runs] + [layout.diagnosis_tokenizer(t) for t in toks]
    missing = [Path(f).name for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root / layout.DIAGNOSIS}: {', '.join(missing)} missing "
                                "(snakemake --cores all diagnosis builds them)")
    ar = {r: json.loads((root / layout.diagnosis_ar(r)).read_text()) for r in runs}
    tokenizers = {t: json.loads((root / layout.diagnosis_tokenizer(t)).read_text()) for t in toks}
    pngs = {p.stem: p for p in [root / layout.diagnosis_tokenizer(t, png=True) for t in toks]
            + [root / layout.diagnosis_ar(r, png=True) for r in runs] if p.is_file()}
    return Diagnosis(ar, tokenizers, budget, pngs)


LEVEL_ORDER = {"semantic": 0, "detail": 1, "single": 2}


def _levels(items):
    return sorted(items, key=lambda kv: LEVEL_ORDER.get(kv[0], 9))


def _f(v, nd=2) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:.{nd}f}"


def _pct(v) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{100 * v:.0f}%"


# ----------------------------------------------------------------------------- tables

def tokenizer_table(d: Diagnosis) -> tuple[list[str], list[list[str]]]:
    head = ["tokenizer", "level", "codes", "used", "perplexity", "entropy (nats)", "rFID full", "rFID semantic only",
            "PSNR full", "flat decodes (originals)"]
    rows = []
    for tok, t in d.tokenizers.items():
        full, sem = t.get("full_decode", {}), t.get("semantic_decode", {})
        for i, (level, s) in enumerate(_levels(t.get("levels", {}).items())):
            first = i == 0
            rows.append([tok if first else "", level, str(s.get("size", "–")), _pct(s.get("usage")),
                         _f(s.get("perplexity"), 1), _f(s.get("entropy")),
                         _f(full.get("rfid")) if first else "", _f(sem.get("rfid")) if first and sem else "",
                         _f(full.get("psnr")) if first else "",
                         f"{_pct(full.get('flat_fraction'))} ({_pct(t.get('original_flat_fraction'))})" if first
                         else ""])
    return head, rows


def fit_table(d: Diagnosis) -> tuple[list[str], list[list[str]]]:
    head = ["run", "level", "context-free CE: H(x | class)", "H(x | semantic)", "CE train", "CE held-out",
            "top-1 held-out",
            "KL(cond || uncond)", "KL at the first token", "cond/uncond top-1 agree"]
    rows = []
    for run, a in d.ar.items():
        tf = a.get("teacher_forced", {})
        for level in a.get("levels", []):
            ent = a.get("data_entropy", {}).get(level, {})
            tr, ho = tf.get("train", {}).get(level, {}), tf.get("heldout", {}).get(level, {})
            rows.append([run, level, _f(ent.get("entropy_given_class")), _f(ent.get("entropy_given_semantic")),
                         _f(tr.get("ce")), _f(ho.get("ce")), _pct(ho.get("acc")), _f(ho.get("kl_cond_uncond"), 3),
                         _f(ho.get("kl_first_token"), 3), _pct(ho.get("top1_agree"))])
    return head, rows


def sample_table(d: Diagnosis) -> tuple[list[str], list[list[str]]]:
    head = ["run", "sampling", "FID", "precision", "recall", "IS", "class accuracy", "flat samples"]
    rows = []
    for run, a in d.ar.items():
        for name, s in a.get("samples", {}).items():
            rows.append([run, name, _f(s.get("fid")), _f(s.get("precision")), _f(s.get("recall")),
                         _f(s.get("isc_mean")), _pct(s.get("class_accuracy")), _pct(s.get("flat_fraction"))])
    return head, rows


def budget_table(d: Diagnosis) -> tuple[list[str], list[list[str]]]:
    head = ["run", "steps", "batch", "passes over the data", "wall s", "s/step", "loss", "loss drop over the last half"]
    rows = []
    for run, b in (d.budget.get("ar") or {}).items():
        loss = b.get("loss") or {}
        for i, (k, tr) in enumerate(loss.items() or [("loss", None)]):
            first = i == 0
            rows.append([run if first else "", str(b.get("steps", "–")) if first else "",
                         str(b.get("batch_size", "–")) if first else "", _f(b.get("data_passes"), 1) if first else "",
                         _f(b.get("elapsed_s"), 0) if first else "", _f(b.get("seconds_per_step")) if first else "",
                         k, _pct((tr or {}).get("last_half_drop"))])
    for tok, stages in (d.budget.get("tokenizers") or {}).items():
        for i, (stage, s) in enumerate(stages.items()):
            drops = [f"{k} {_pct(v.get('last_half_drop'))}" for k, v in s.items() if isinstance(v, dict)]
            rows.append([f"tok {tok}" if i == 0 else "", str(s.get("steps", "–")), "", "", "", "",
                         stage, ", ".join(drops[:3])])
    return head, rows


# ----------------------------------------------------------------------------- observations

def _sample_fids(a: dict) -> dict[str, float]:
    return {k: s["fid"] for k, s in a.get("samples", {}).items() if isinstance(s.get("fid"), (int, float))}


def observations(d: Diagnosis) -> list[str]:
    """What the numbers say, one sentence each, computed from the files."""
    out = []
    fids = {run: _sample_fids(a) for run, a in d.ar.items()}
    common = set.intersection(*(set(f) for f in fids.values())) if fids else set()
    for name in sorted(common):
        best = min(fids, key=lambda r: fids[r][name])
        out.append(f"Samples `{name}`: FID " + ", ".join(f"{r} {fids[r][name]:.2f}" for r in fids)
                   + f" (lowest: {best}; one seed, same classes and count for each run).")
    for run, f in fids.items():
        unguided = next((v for k, v in f.items() if k.endswith("none")), None)
        guided = {k: v for k, v in f.items() if not k.endswith("none")}
        if unguided is not None and guided:
            k, v = min(guided.items(), key=lambda kv: kv[1])
            out.append(f"{run}: guidance moves FID from {unguided:.2f} (none) to {v:.2f} ({k}), "
                       f"{'better' if v < unguided else 'not better'}.")
    for run, a in d.ar.items():
        ho = a.get("teacher_forced", {}).get("heldout", {})
        tr = a.get("teacher_forced", {}).get("train", {})
        for level in a.get("levels", []):
            h, t = ho.get(level, {}), tr.get(level, {})
            ent = a.get("data_entropy", {}).get(level, {})
            floor = ent.get("entropy_given_semantic", ent.get("entropy_given_class"))
            if isinstance(h.get("ce"), (int, float)) and isinstance(floor, (int, float)):
                out.append(f"{run} {level}: held-out CE {h['ce']:.2f} nats (train {_f(t.get('ce'))}) against "
                           f"{floor:.2f} for a model that ignores the context "
                           f"({'H(x | semantic)' if 'entropy_given_semantic' in ent else 'H(x | class)'}); "
                           "the class moves its predictions by "
                           f"KL {_f(h.get('kl_cond_uncond'), 3)} per token, {_f(h.get('kl_first_token'), 3)} at the "
                           "first.")
    for tok, t in d.tokenizers.items():
        full, sem = t.get("full_decode", {}), t.get("semantic_decode")
        if sem and isinstance(full.get("rfid"), (int, float)) and isinstance(sem.get("rfid"), (int, float)):
            out.append(f"{tok}: the detail codes take rFID from {sem['rfid']:.2f} (semantic only) to "
                       f"{full['rfid']:.2f} (full decode).")
        flat, orig = full.get("flat_fraction"), t.get("original_flat_fraction")
        if isinstance(flat, (int, float)) and isinstance(orig, (int, float)):
            out.append(f"{tok}: {_pct(flat)} of its decodes are flat, {_pct(orig)} of the original images "
                       "(flat: pixel std below the threshold in `iar2 diagnose`).")
    for run, b in (d.budget.get("ar") or {}).items():
        drops = {k: v.get("last_half_drop") for k, v in (b.get("loss") or {}).items() if v}
        big = {k: v for k, v in drops.items() if isinstance(v, (int, float)) and v > 0.05}
        if big:
            out.append(f"{run} was still learning when its budget ended: " + ", ".join(
                f"{k} fell {_pct(v)}" for k, v in big.items()) + " over the last half of its steps.")
    return out


# ----------------------------------------------------------------------------- rendering

TABLES = (("Tokenizers", tokenizer_table), ("Teacher-forced fit and class signal", fit_table),
          ("Samples at T = 1, unguided and guided", sample_table), ("Budget", budget_table))
INTRO = ("The scale's IAR2 and LlamaGen runs at equal size, taken apart by `iar2 diagnose` "
         "(workflow/rules/diagnosis.smk; rerun: `snakemake --cores all diagnosis`). CE and entropy in nats; "
         "flat: a decode or sample with almost no pixel variation.")


def copy_images(d: Diagnosis, out_dir: Path) -> dict[str, str]:
    """PNGs into <report>/diagnosis/; returns label -> relative path."""
    dest = Path(out_dir) / "diagnosis"
    rel = {}
    for label, p in d.pngs.items():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest / p.name)
        rel[label] = f"diagnosis/{p.name}"
    return rel


def markdown(d: Diagnosis, images: dict[str, str] | None = None) -> str:
    out = [INTRO, ""] + [f"- {o}" for o in observations(d)] + [""]
    for title, fn in TABLES:
        head, rows = fn(d)
        if not rows:
            continue
        out += [f"### {title}", "", "| " + " | ".join(h.replace("|", "\\|") for h in head) + " |",
                "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
    out += [f"![{label}]({src})" for label, src in (images or {}).items()]
    return "\n".join(out) + "\n"


def html_section(d: Diagnosis, images: dict[str, str] | None = None) -> str:
    e = html.escape
    parts = [f'<p class="meta">{e(INTRO)}</p>', "<ul>" + "".join(f"<li>{e(o)}</li>" for o in observations(d))
             + "</ul>"]
    for title, fn in TABLES:
        head, rows = fn(d)
        if not rows:
            continue
        parts.append(f"<h3>{e(title)}</h3><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                     + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                                                       for r in rows) + "</tbody></table>")
    parts += [f'<figure><img src="{e(src)}" alt="{e(label)}"><figcaption>{e(label)}</figcaption></figure>'
              for label, src in (images or {}).items()]
    return "\n".join(parts)
