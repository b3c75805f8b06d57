"""report.html: the tables and every run's figures on one static page.

Self-contained: the PNGs are embedded as base64 data URLs and the style is inline, so the file
opens from disk (or an e-mail attachment) with no server and nothing to fetch.
"""

from __future__ import annotations

import base64
import html
import pathlib
from collections.abc import Sequence
from typing import Any

from spcl_jax.report import tables

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.notes { font-size: 0.85em; color: #555; }
.run { margin: 1.5em 0; border-top: 1px solid #ddd; }
.run img { max-width: 100%; margin: 0.3em 0.5em 0.3em 0; vertical-align: top; }
"""


def _cell(cell: Any) -> str:
  return html.escape(tables._markdown_cell(cell).replace("\\|", "|"))  # pylint: disable=protected-access


def table_html(table: tables.Table) -> str:
  head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
  body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
                 for row in table.rows)
  notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
  return (f"<h2>{html.escape(table.title)}</h2>\n<table><thead><tr>{head}</tr></thead>"
          f"<tbody>{body}</tbody></table>\n<ul class=\"notes\">{notes}</ul>\n")


def image_html(path: pathlib.Path, alt: str) -> str:
  data = base64.b64encode(path.read_bytes()).decode("ascii")
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render(built: Sequence[tables.Table], runs: Sequence[dict[str, Any]],
           skipped: Sequence[str]) -> str:
  """`runs`: {"title", "results", "figures": {kind: PNG path}} per run, in table order."""
  parts = ["<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
           "<title>spcl-jax fine-tuning report</title>", f"<style>{_STYLE}</style></head><body>",
           "<h1>Fine-tuning report</h1>"]
  parts += [table_html(table) for table in built]
  parts.append("<h2>Runs</h2>")
  if not runs:
    parts.append("<p>No run found.</p>")
  for run in runs:
    images = "".join(image_html(path, f"{run['title']}: {kind}")
                     for kind, path in run["figures"].items())
    parts.append(f"<div class=\"run\"><h3>{html.escape(run['title'])}</h3>"
                 f"<p class=\"notes\">{html.escape(str(run['results']))}</p>{images}</div>")
  if skipped:
    items = "".join(f"<li>{html.escape(s)}</li>" for s in skipped)
    parts.append(f"<h3>Figures not drawn</h3><ul class=\"notes\">{items}</ul>")
  parts.append("</body></html>\n")
  return "\n".join(parts)
