"""HTML building blocks of ``lclsc report``: one self-contained page (inline CSS, images as data URIs, no script).

Pure string building: every piece of text that comes from data goes through ``html.escape``;
nothing here reads files or runs a model. ``figure_uri`` renders a matplotlib ``Figure`` with
the Agg canvas into a ``data:image/png;base64,...`` URI, so the page needs no other file and
no network.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["CSS", "columns", "esc", "figure_uri", "fmt", "img", "kv_table", "markdown", "page", "png_uri", "section",
           "table"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1b1f24;
background:#f6f7f9;line-height:1.45}
header{background:#123a5a;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px 0;font-size:1.5em}
header p{margin:2px 0;opacity:.9}
main{max-width:1200px;margin:0 auto;padding:8px 32px 48px}
nav{margin:12px 0;font-size:.92em}
nav a{margin-right:12px;color:#123a5a}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 20px;margin:16px 0}
h2{margin:4px 0 10px;font-size:1.2em;color:#123a5a}
h3{font-size:1.02em;margin:14px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #d0d5db;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.low td{background:#fdecea} tr.high td{background:#eaf6ec}
img{max-width:100%;height:auto;display:block;margin:6px 0}
figure{margin:8px 0} figcaption{font-size:.85em;color:#49525c}
.note{color:#49525c;font-size:.9em}
.missing{color:#8a5a00;background:#fff7e6;border-left:3px solid #e0a100;padding:4px 10px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{flex:1 1 420px}
.cols{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}
.cols>div{flex:0 1 auto}
code,pre{background:#f1f3f5;border-radius:3px;font-size:.88em}
pre{padding:8px;overflow-x:auto}
"""


def esc(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, ``–`` for None/NaN, other values as text."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def png_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(fig: Figure, dpi: int = 100) -> str:
    """Render a matplotlib ``Figure`` (Agg) to a PNG data URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return png_uri(buf.getvalue())


def img(uri: str, alt: str, caption: str | None = None) -> str:
    """An ``<img>`` of a data URI (only ``data:`` URIs are accepted: the page stays offline) in a ``<figure>``."""
    if not uri.startswith("data:image/"):
        raise ValueError("report images must be data: URIs")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_attrs: Sequence[Mapping[str, str]] | None = None,
          cls: str | None = None) -> str:
    """An HTML table; a cell is text, or ``(text, attrs)`` with attributes (e.g. ``data-value``) on its ``<td>``.

    Numbers (int/float) are right-aligned and formatted with ``fmt``; ``row_attrs[i]`` go on row ``i``'s ``<tr>``.
    """
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = row_attrs[i] if row_attrs else {}
        tr = "".join(f' {esc(k)}="{esc(v)}"' for k, v in attrs.items())
        cells = []
        for cell in row:
            extra: Mapping[str, Any] = {}
            if isinstance(cell, tuple):
                cell, extra = cell
            num = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            a = "".join(f' {esc(k)}="{esc(v)}"' for k, v in extra.items())
            cls_attr = ' class="num"' if num else ""
            cells.append(f"<td{cls_attr}{a}>{esc(fmt(cell))}</td>")
        body.append(f"<tr{tr}>{''.join(cells)}</tr>")
    c = f' class="{esc(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(items: Mapping[str, Any]) -> str:
    """A two-column key/value table (keys as row headers)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def columns(*parts: str) -> str:
    """HTML ``parts`` side by side (wrapping on narrow screens)."""
    return '<div class="cols">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


def section(anchor: str, title: str, body: str) -> str:
    """A ``<section id=anchor>`` with a heading; ``body`` is already HTML."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _md_inline(text: str) -> str:
    """Escaped text with ``code`` and **bold** spans."""
    t = esc(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _md_cells(line: str) -> list[str]:
    """The cells of a Markdown table row."""
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") else s
    return [c.strip() for c in s.split("|")]


def markdown(text: str) -> str:
    """A small Markdown subset as HTML: ``#`` headings (as h3), pipe tables, paragraphs; everything escaped."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_md_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            flush()
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_md_cells(r) for r in block if not _TABLE_SEP.match(r)]
            head = "".join(f"<th>{_md_inline(c)}</th>" for c in rows[0]) if rows else ""
            body = "".join("<tr>" + "".join(f"<td>{_md_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        if line.startswith("#"):
            flush()
            out.append(f"<h3>{_md_inline(line.lstrip('#').strip())}</h3>")
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "".join(out)


def page(title: str, subtitle_lines: Sequence[str], sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: header, a table of contents, then ``sections`` ``(anchor, title, body html)``."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    subs = "".join(f"<p>{esc(s)}</p>" for s in subtitle_lines)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1>{subs}</header><main><nav>{nav}</nav>{body}</main></body></html>\n")
