"""Plots drawn as inline SVG, by our own code.

The report must open from a file on a machine with no network, so a plot cannot come from a
JavaScript library or a CDN: it is SVG markup written here, which any browser draws with no
script at all. The drawing is deliberately plain: a frame with round-number ticks
(``numbers.nice_ticks``), lines or grouped bars in distinct colours, a legend under the plot,
and a ``<title>`` on every point and bar, which browsers show as a tooltip. Every element that
draws data has class ``mark``, and the plot area class ``frame``, so that a test can find what
was drawn and where.

The y axis always includes zero: these plots compare amounts, and a cut axis would make small
differences look large. Missing values (None, NaN) break a line or leave out a bar; a point with no neighbour still
gets a marker, so a single point is visible; a plot with nothing to draw says "no data".
"""

from __future__ import annotations

import colorsys
import html
import math

from vmhost.reports.model import BarPlot, LinePlot, missing
from vmhost.reports.numbers import fmt, nice_ticks, tick_labels

WIDTH = 760
PLOT_HEIGHT = 260
TOP = 44                 # below the title
RIGHT = 24
FONT = 11
CHAR_W = 6.6             # average width of a FONT-px sans-serif character
HEADROOM = 0.04         # of the y range, above the highest value of a line plot
LINE_WIDTHS = (2.0, 7.0)  # the last (or only) series' line and the first's
MAX_MARKERS = 120        # more points than this in a series: the line alone (markers would hide it)
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
HLINE_COLOUR = "#333333"


def colour(i: int) -> str:
    """The i-th series colour: Tableau's ten, then hues a golden angle apart (all distinct)."""
    if i < len(PALETTE):
        return PALETTE[i]
    r, g, b = colorsys.hls_to_rgb(((i - len(PALETTE)) * 0.381966) % 1.0, 0.45, 0.6)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def render(plot: LinePlot | BarPlot) -> str:
    """The plot as an ``<svg>`` element (no XML namespace needed inline in HTML)."""
    if isinstance(plot, LinePlot):
        return _line(plot)
    if isinstance(plot, BarPlot):
        return _bars(plot)
    raise TypeError(f"not a plot: {type(plot).__name__}")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _n(v: float) -> str:
    """A coordinate: one decimal is finer than a pixel."""
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _text_w(text: str) -> float:
    return len(text) * CHAR_W


class _Frame:
    """The plot area and the mapping of data values into it."""

    def __init__(self, left: float, xt: list[float] | None, yt: list[float]):
        self.left, self.top = left, TOP
        self.w, self.h = WIDTH - left - RIGHT, PLOT_HEIGHT
        self.xt, self.yt = xt, yt

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return self.left + (v - lo) / (hi - lo) * self.w

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return self.top + self.h - (v - lo) / (hi - lo) * self.h


def _svg(title: str, height: float, body: list[str]) -> str:
    return (f'<svg class="plot" width="{WIDTH}" height="{_n(height)}" viewBox="0 0 {WIDTH} {_n(height)}" '
            f'role="img" aria-label="{_e(title)}" font-family="sans-serif" font-size="{FONT}">'
            f'<title>{_e(title)}</title>'
            f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{_e(title)}</text>'
            + "".join(body) + "</svg>")


def _empty(title: str) -> str:
    return _svg(title, TOP + 80, [
        f'<rect x="1" y="{TOP}" width="{WIDTH - 2}" height="60" fill="none" stroke="#ccc"/>',
        f'<text class="no-data" x="{WIDTH / 2}" y="{TOP + 35}" text-anchor="middle" fill="#666">no data</text>'])


def _y_axis(f: _Frame, label: str) -> list[str]:
    out = []
    for t, s in zip(f.yt, tick_labels(f.yt)):
        y = _n(f.y(t))
        out.append(f'<line x1="{_n(f.left)}" x2="{_n(f.left + f.w)}" y1="{y}" y2="{y}" stroke="#e4e4e4"/>'
                   f'<text x="{_n(f.left - 6)}" y="{y}" dy="0.32em" text-anchor="end">{_e(s)}</text>')
    cy = _n(f.top + f.h / 2)
    out.append(f'<text x="14" y="{cy}" transform="rotate(-90 14 {cy})" text-anchor="middle">{_e(label)}</text>')
    return out


def _frame_box(f: _Frame) -> str:
    return (f'<rect class="frame" x="{_n(f.left)}" y="{_n(f.top)}" width="{_n(f.w)}" height="{_n(f.h)}" '
            f'fill="none" stroke="#888"/>')


def _left_margin(yt: list[float]) -> float:
    return 30 + max(_text_w(s) for s in tick_labels(yt))


def _legend(items: list[tuple[str, str, str]], top: float) -> tuple[list[str], float]:
    """Legend entries (name, colour, kind: line, bar or dash) in rows from ``top``; returns the
    markup and the y below it."""
    out, x, y = [], 40.0, top
    for name, col, kind in items:
        w = 28 + _text_w(name) + 18
        if x + w > WIDTH - RIGHT and x > 40:
            x, y = 40.0, y + 18
        if kind == "bar":
            sw = f'<rect x="{_n(x)}" y="{_n(y - 9)}" width="18" height="10" fill="{col}"/>'
        else:
            dash = ' stroke-dasharray="6 4"' if kind == "dash" else ""
            sw = f'<line x1="{_n(x)}" x2="{_n(x + 20)}" y1="{_n(y - 4)}" y2="{_n(y - 4)}" stroke="{col}" stroke-width="2.5"{dash}/>'
        out.append(f'<g class="legend-item">{sw}<text x="{_n(x + 26)}" y="{_n(y)}">{_e(name)}</text></g>')
        x += w
    return out, y + 10


def _segments(points: list[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive present points; a missing point ends a run."""
    runs, cur = [], []
    for p in points:
        if p is None:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(p)
    if cur:
        runs.append(cur)
    return runs


def _path(f: _Frame, run: list[tuple[float, float]], step: bool) -> str:
    x0, y0 = run[0]
    d = [f"M{_n(f.x(x0))} {_n(f.y(y0))}"]
    for x, y in run[1:]:
        d.append(f"H{_n(f.x(x))}V{_n(f.y(y))}" if step else f"L{_n(f.x(x))} {_n(f.y(y))}")
    return "".join(d)


def _line(p: LinePlot) -> str:
    runs = [_segments(s.points()) for s in p.series]
    pts = [q for rs in runs for r in rs for q in r]
    if not pts:
        return _empty(p.title)
    xs = [x for x, _ in pts]
    ys = [y for _, y in pts] + [float(y) for _, y in p.hlines] + [0.0]
    xt = nice_ticks(min(xs), max(xs), integer=all(x.is_integer() for x in xs))
    # a little room above the highest line, so that it is not drawn on the frame
    lo, hi = min(ys), max(ys)
    yt = nice_ticks(lo, hi + (hi - lo) * HEADROOM, integer=all(y.is_integer() for y in ys))
    f = _Frame(_left_margin(yt), xt, yt)
    body = _y_axis(f, p.y_label)
    for t, s in zip(xt, tick_labels(xt)):
        x = _n(f.x(t))
        body.append(f'<line x1="{x}" x2="{x}" y1="{_n(f.top)}" y2="{_n(f.top + f.h)}" stroke="#f0f0f0"/>'
                    f'<text x="{x}" y="{_n(f.top + f.h + 16)}" text-anchor="middle">{_e(s)}</text>')
    body.append(_frame_box(f))
    bottom = f.top + f.h + 36
    body.append(f'<text x="{_n(f.left + f.w / 2)}" y="{_n(bottom)}" text-anchor="middle">{_e(p.x_label)}</text>')
    items = []
    for label, yv in p.hlines:
        y = _n(f.y(float(yv)))
        body.append(f'<g class="hline"><title>{_e(label)}: {_e(fmt(yv))}</title>'
                    f'<line x1="{_n(f.left)}" x2="{_n(f.left + f.w)}" y1="{y}" y2="{y}" '
                    f'stroke="{HLINE_COLOUR}" stroke-width="1.5" stroke-dasharray="6 4"/>'
                    f'<text x="{_n(f.left + f.w - 4)}" y="{y}" dy="-4" text-anchor="end" fill="{HLINE_COLOUR}">'
                    f'{_e(label)}</text></g>')
        items.append((label, HLINE_COLOUR, "dash"))
    k = len(p.series)
    for i, (s, rs) in enumerate(zip(p.series, runs)):
        col = colour(i)
        # each series thinner than the one before, so one drawn over another still shows both
        width = LINE_WIDTHS[0] + (LINE_WIDTHS[1] - LINE_WIDTHS[0]) * (k - 1 - i) / max(k - 1, 1)
        items.append((s.name if rs else f"{s.name} (no data)", col, "line"))
        g = [f'<g class="series" fill="{col}" stroke="{col}">']
        for r in rs:
            if len(r) > 1:
                g.append(f'<path class="mark" d="{_path(f, r, p.step)}" fill="none" stroke-width="{_n(width)}">'
                         f'<title>{_e(s.name)}</title></path>')
        lonely_only = sum(len(r) for r in rs) > MAX_MARKERS
        for r in rs:
            if lonely_only and len(r) > 1:
                continue
            for x, y in r:
                g.append(f'<circle class="mark" cx="{_n(f.x(x))}" cy="{_n(f.y(y))}" r="{_n(width / 2 + 2)}">'
                         f'<title>{_e(s.name)}: {_e(p.x_label)} {_e(fmt(x))}, {_e(p.y_label)} {_e(fmt(y))}'
                         f'</title></circle>')
        g.append("</g>")
        body.extend(g)
    legend, end = _legend(items, bottom + 24)
    return _svg(p.title, end, body + legend)


def _bars(p: BarPlot) -> str:
    vals = [[None if missing(v) else float(v) for v in s.values] for s in p.series]
    present = [v for vs in vals for v in vs if v is not None]
    if not p.categories or not present:
        return _empty(p.title)
    yt = nice_ticks(min(present + [0.0]), max(present + [0.0]),
                    integer=all(v.is_integer() for v in present))
    f = _Frame(_left_margin(yt), None, yt)
    body = _y_axis(f, p.y_label)
    n, k = len(p.categories), max(len(p.series), 1)
    slot = f.w / n
    bar_w = slot * 0.8 / k
    # labels that do not fit their slot are turned; too many to read turned: every m-th
    longest = max(_text_w(c) for c in p.categories)
    turned = longest > slot - 4
    every = max(1, math.ceil(14 / slot)) if turned else 1
    label_y = f.top + f.h + 14
    for j, c in enumerate(p.categories):
        if j % every:
            continue
        cx = _n(f.left + (j + 0.5) * slot)
        if turned:
            body.append(f'<text x="{cx}" y="{_n(label_y)}" text-anchor="end" '
                        f'transform="rotate(-40 {cx} {_n(label_y)})">{_e(c)}</text>')
        else:
            body.append(f'<text x="{cx}" y="{_n(label_y + 2)}" text-anchor="middle">{_e(c)}</text>')
    zero = f.y(0.0)
    items = []
    for i, (s, vs) in enumerate(zip(p.series, vals)):
        col = colour(i)
        items.append((s.name, col, "bar"))
        g = [f'<g class="series" fill="{col}">']
        for j, v in enumerate(vs):
            if v is None:
                continue
            x = f.left + j * slot + slot * 0.1 + i * bar_w
            y0, y1 = sorted((zero, f.y(v)))
            g.append(f'<rect class="mark" x="{_n(x)}" y="{_n(y0)}" width="{_n(max(bar_w - 1, 1))}" '
                     f'height="{_n(max(y1 - y0, 0.5))}"><title>{_e(p.categories[j])}, {_e(s.name)}: '
                     f'{_e(fmt(v))} {_e(p.y_label)}</title></rect>')
        g.append("</g>")
        body.extend(g)
    body.append(f'<line x1="{_n(f.left)}" x2="{_n(f.left + f.w)}" y1="{_n(zero)}" y2="{_n(zero)}" stroke="#444"/>')
    body.append(_frame_box(f))
    drop = longest * math.sin(math.radians(40)) + 8 if turned else 18
    legend, end = _legend(items, label_y + drop + 16)
    return _svg(p.title, end, body + legend)
