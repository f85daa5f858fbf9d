"""One self-contained HTML page of figures and tables (the ``.html`` an experiment result saves).

plotly.js is inlined once, so the page needs no network (no CDN, no MathJax). The figures come from
:mod:`moe_lite.viz`; this module only lays them out with the tables.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import plotly.graph_objects as go
from plotly.basedatatypes import BaseFigure
from plotly.offline import get_plotlyjs

from .viz import _check_records, _fmt, _ordered_keys

__all__ = ["figures_to_html"]


def _table_html(data: Any) -> str:
    """A simple HTML table from a list of dicts, a dict of scalars, or a dict of dicts (rows)."""
    if isinstance(data, Mapping):
        if data and all(isinstance(v, Mapping) for v in data.values()):
            rows = [{"": k, **v} for k, v in data.items()]
        else:
            rows = [{"metric": k, "value": v} for k, v in data.items()]
    else:
        rows = _check_records(data, "table")
    cols = _ordered_keys(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
section { margin-bottom: 2em; }
"""


def figures_to_html(figs: Union[Mapping[str, BaseFigure], Sequence[BaseFigure]], title: str = "moe_lite report",
                    tables: Optional[Mapping[str, Any]] = None, path: Union[str, Path, None] = None) -> str:
    """One self-contained HTML page: plotly.js inlined once, then metric tables and figures.

    Args:
        figs: ``name -> figure`` (section headings) or a list of figures (headed by their titles).
            ``FigureWidget`` objects are accepted too.
        title: page title and heading.
        tables: optional ``name -> table``; a table is a list of dicts (rows), a dict of scalars
            (metric, value), or a dict of dicts (one row per key, e.g. ``routing_stats``).
        path: if given, the page is also written there (parent folders created).

    Returns the HTML text. The page needs no network: no CDN, no MathJax.
    """
    if isinstance(figs, Mapping):
        items = [(str(k), f) for k, f in figs.items()]
    else:
        items = []
        for i, f in enumerate(figs):
            t = getattr(getattr(getattr(f, "layout", None), "title", None), "text", None)
            items.append((t or f"Figure {i + 1}", f))
    parts = []
    used: Dict[str, int] = {}
    for name, f in items:
        if not isinstance(f, BaseFigure):
            raise TypeError(f"figure {name!r} is a {type(f).__name__}, not a plotly figure")
        slug = _slug(name)
        used[slug] = used.get(slug, 0) + 1
        div_id = f"fig-{slug}" if used[slug] == 1 else f"fig-{slug}-{used[slug]}"
        fig_html = go.Figure(f).to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                                        div_id=div_id)
        parts.append(f'<section><h2>{html.escape(name)}</h2>\n{fig_html}\n</section>')
    table_parts = [f"<section><h2>{html.escape(str(k))}</h2>\n{_table_html(v)}\n</section>"
                   for k, v in (tables or {}).items()]
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_PAGE_STYLE}</style>",
        '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>',
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>", *table_parts, *parts, "</body>", "</html>",
    ])
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(page, encoding="utf-8")
    return page
