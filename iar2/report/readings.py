"""The "Readings and deviations" table (params/paper/readings.yaml) as HTML and Markdown.

One source for the report and README.md: `markdown_table` is what the README's section holds (a test compares them).
"""
from __future__ import annotations

import html
from pathlib import Path

import yaml

COLUMNS = (("topic", "topic"), ("paper", "the paper says"), ("code", "the released code"),
           ("ours", "we do, and why"), ("switch", "switch for the other choice"))


def load_readings(paper_dir: Path) -> list[dict]:
    path = Path(paper_dir) / "readings.yaml"
    if not path.is_file():
        return []
    rows = (yaml.safe_load(path.read_text()) or {}).get("readings") or []
    for r in rows:
        missing = [k for k, _ in COLUMNS if not str(r.get(k, "")).strip()]
        if missing:
            raise ValueError(f"{path}: reading {r.get('topic')!r} lacks {missing}")
    return rows


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f'<td class="t">{html.escape(str(r[k]))}</td>' for k, _ in COLUMNS) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
