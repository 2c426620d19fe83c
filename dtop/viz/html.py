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
table.provenance th { text-align: left; background: #f2f2f2; }
table.provenance td { text-align: left; }
.alert { border-left: 4px solid #d7301f; background: #fdf0ee; padding: 0.5em 0.8em; }
"""


def fixed(value: float, digits: int = 1, signed: bool = False, suffix: str = "") -> str:
    """``value`` with ``digits`` decimals, never a negative zero: anything that rounds to 0 is ``0.0``
    (``fixed(-0.04) == "0.0"``, not ``"-0.0"``); ``signed``: ``+`` before positive values."""
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if float(text) == 0:
        text = f"{0.0:.{digits}f}"
    return text + suffix


def percent(value: float, digits: int = 1, signed: bool = False) -> str:
    """A value already in percent as text: ``percent(31.25) == "31.2%"``, ``percent(-0.01) == "0.0%"``."""
    return fixed(value, digits, signed, "%")


def html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def provenance_table(rows: Sequence[tuple[str, str]]) -> str:
    """What the report was made from (checkpoint, dataset, images, dtop version): one row per (name, value)."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"provenance\"><tbody>{body}</tbody></table>" if rows else ""


def report_page(run_dir: Path, results: Table, figures: Sequence[Figure], classes: Optional[Table] = None,
                notes: Sequence[str] = (), compare: bool = False, provenance: Sequence[tuple[str, str]] = (),
                alerts: Sequence[str] = ()) -> str:
    """The report: where it comes from (``provenance``: (name, value) rows), the ``alerts`` (what the reader
    must know before reading the figures), the results table, each figure with its caption, the per-class
    table and the notes."""
    parts = [provenance_table(provenance)]
    parts += [f"<p class=\"alert\">{html.escape(a)}</p>" for a in alerts]
    parts += ["<h2>Results</h2>", html_table(results)]
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
