"""The report as one self-contained HTML page.

Everything the page shows is in the file: the styles inline, the plots as inline SVG
(``svg``), no script, no font, no image from anywhere. Its Content-Security-Policy forbids any
load at all (``default-src 'none'``), so a page that works from ``file://`` on a machine with
no network also cannot quietly try to reach one. Every piece of caller text is escaped; the
tables link to their CSV files beside the page.
"""

from __future__ import annotations

import html

from vmhost.reports import svg
from vmhost.reports.model import BarPlot, LinePlot, Table
from vmhost.reports.numbers import fmt

CSP = "default-src 'none'; style-src 'unsafe-inline'"
OPEN_ROWS = 40          # longer tables start folded (the CSV beside the page has them all)

STYLE = """
body { font-family: sans-serif; max-width: 980px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
.subtitle { color: #555; margin-top: 0; }
figure { margin: 1.5em 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
details { margin: 1em 0; }
summary { cursor: pointer; font-weight: bold; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin-top: 0.5em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; white-space: nowrap; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _is_number(v) -> bool:
    if hasattr(v, "item"):
        v = v.item()
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def table_html(t: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_e(fmt(v))}</td>' if _is_number(v) else f"<td>{_e(fmt(v))}</td>" for v in row)
        + "</tr>" for row in t.rows)
    rows = f"{len(t.rows)} row{'s' if len(t.rows) != 1 else ''}"
    return (f'<details class="table"{" open" if len(t.rows) <= OPEN_ROWS else ""}>'
            f'<summary>{_e(t.name)}: {rows} (<a href="{_e(t.name)}.csv">{_e(t.name)}.csv</a>)</summary>'
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
            f"</details>")


def plot_html(p: LinePlot | BarPlot) -> str:
    note = f"<figcaption>{_e(p.note)}</figcaption>" if p.note else ""
    return f'<figure class="plot">{svg.render(p)}{note}</figure>'


def render_page(title: str, subtitle: str, items: list) -> str:
    """The page: the title, then the items (text paragraphs, tables, plots) in order."""
    parts = []
    for it in items:
        if isinstance(it, str):
            parts.append(f"<p>{_e(it)}</p>")
        elif isinstance(it, Table):
            parts.append(table_html(it))
        else:
            parts.append(plot_html(it))
    sub = f'<p class="subtitle">{_e(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>"
            f"<h1>{_e(title)}</h1>{sub}\n" + "\n".join(parts) + "\n</body></html>\n")
