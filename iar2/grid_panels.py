"""Figures 9-11 (App. E): which rows of the class-grid sample sheet make which figure, and their captions.

App. E shows IAR2-XL samples of twelve ImageNet classes, four per figure. The paper scale samples exactly those
classes, in App. E's order (params/paper.yaml, sampling.grid.classes), and `iar2 sample` writes one grid row per
class in that order, so Figure 9 is rows 0-3 of the sheet, Figure 10 rows 4-7 and Figure 11 rows 8-11. A smaller
scale has other classes (the built-in dataset's): its grid classes stand in, four per figure in their order, and
the caption says which.
"""
from __future__ import annotations


def grid_panels(panels: list[dict], scale_classes: list[int], label: str, file: str, run: str) -> list[dict]:
    """One image entry per figure: {label (the caption), file, run, rows: [first, stop), of: rows in the sheet}.

    panels: the registry's App. E list, [{figure: 9, classes: {417: balloon, ...}}, ...] (ImageNet id -> name);
    scale_classes: the classes this scale's grid samples, in sheet order."""
    out, start = [], 0
    for p in panels:
        paper = {int(k): str(v) for k, v in (p.get("classes") or {}).items()}
        ours = scale_classes[start:start + len(paper)]
        named = ", ".join(f"{name} ({cid})" for cid, name in paper.items())
        if ours == list(paper):
            caption = f"Figure {p['figure']}: {named}; {label}"
        elif ours:
            caption = (f"Figure {p['figure']} (App. E: {named}); at this scale classes "
                       f"{', '.join(map(str, ours))} of its dataset stand in; {label}")
        else:
            caption = f"Figure {p['figure']} (App. E: {named}): this scale's grid has no class left for it"
        out.append({"label": caption, "file": file, "run": run, "rows": [start, start + len(ours)],
                    "of": len(scale_classes)})
        start += len(ours)
    return out
