"""The self-contained HTML report page (figures embedded as data URIs): it lays out what it is given."""
from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path
from typing import Any, Optional, Sequence

Table = tuple[Sequence[str], Sequence[Sequence[Any]]]  # header, rows
Figure = tuple[str, Path, str]  # title, PNG file, caption

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1280px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f2f2f2; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


def html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def report_page(run_dir: Path, results: Table, figures: Sequence[Figure], classes: Optional[Table] = None,
                notes: Sequence[str] = (), compare: bool = False) -> str:
    """The report: the results table, each figure with its caption, the per-class table and the notes."""
    parts = ["<h2>Results</h2>", html_table(results)]
    if compare:
        parts.append("<p>All methods start from the same dense checkpoint; the trained ones were fine-tuned with "
                     "the same schedule, Expedite-ViT is training-free.</p>")
    for title, path, caption in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><figure><img src=\"{png_uri(path)}\" alt=\"{html.escape(title)}\">"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if classes is not None:
        parts += ["<h2>Per-class IoU</h2>", html_table(classes)]
    parts += [f"<p class=\"note\">{html.escape(n)}</p>" for n in notes]
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dtop report: {html.escape(str(run_dir))}</title>
<style>{_STYLE}</style></head>
<body>
<h1>DToP report</h1>
<p>Run: <code>{html.escape(str(run_dir))}</code>; generated {stamp} by <code>dtop report</code>.</p>
{"".join(parts)}
</body></html>
"""
