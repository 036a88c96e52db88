"""Reports: ticks, formatting, escaping and degenerate plots; the atomic directory, strict JSON and
CSV; and the density report of a real run, opened in headless Chromium with no network, where
every plot must be drawn (sizes, marks, colours in a screenshot) and every CSV must read back
to the numbers in result.json."""

import csv
import html
import json
import math
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from vmhost.density import format_result
from vmhost.reports import BarPlot, LinePlot, Report, Series, Table
from vmhost.reports import files as report_files
from vmhost.reports import svg
from vmhost.reports.density import CURVE_COLUMNS, NODE_COLUMNS, STEP_COLUMNS, TIMELINE_COLUMNS, build
from vmhost.reports.numbers import fmt, nice_ticks, tick_labels
from vmhost.reports.page import CSP

from helpers import ROOT
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND",       # no name resolves: no network at all
                  "--force-device-scale-factor=1", "--hide-scrollbars"]
WIDTH = 1000

# What the test adds to a copy of the page (the page itself has no script, and its CSP forbids
# one): every plot's rendered size, its data marks, how many have a non-zero size or length,
# and their computed colours, as JSON in <pre id="measure">.
MEASURE = """<script>
const plots = [...document.querySelectorAll('svg.plot')].map(svg => {
  const box = svg.getBoundingClientRect();
  const marks = [...svg.querySelectorAll('.mark')];
  const drawn = marks.filter(m => m.tagName === 'path' ? m.getTotalLength() > 0
                                  : (b => b.width > 0 && b.height > 0)(m.getBBox()));
  const colour = m => getComputedStyle(m).getPropertyValue(m.tagName === 'path' ? 'stroke' : 'fill');
  const frame = svg.querySelector('.frame');
  const area = frame ? frame.getBoundingClientRect() : null;
  return {title: svg.getAttribute('aria-label'), width: box.width, height: box.height,
          bottom: box.bottom + scrollY,
          area: area && [area.left + scrollX, area.top + scrollY, area.right + scrollX, area.bottom + scrollY],
          marks: marks.length, drawn: drawn.length,
          paths: drawn.filter(m => m.tagName === 'path').length,
          circles: drawn.filter(m => m.tagName === 'circle').length,
          rects: drawn.filter(m => m.tagName === 'rect').length,
          colours: [...new Set(drawn.map(colour))],
          noData: svg.querySelector('.no-data') !== null};
});
const pre = document.createElement('pre');
pre.id = 'measure';
pre.textContent = JSON.stringify({plots, height: document.documentElement.scrollHeight});
document.body.appendChild(pre);
</script>"""


# ------------------------------------------------------------------------------------------
# ticks and numbers

@pytest.mark.parametrize("lo, hi, integer, ticks", [
    (0, 31, False, [0, 10, 20, 30, 40]),
    (0, 0.7, False, [0, 0.2, 0.4, 0.6, 0.8]),
    (0, 0.8867, False, [0, 0.25, 0.5, 0.75, 1.0]),
    (1, 3, True, [1, 2, 3]),
    (1, 3, False, [1, 1.5, 2, 2.5, 3]),
    (1, 8, True, [0, 2, 4, 6, 8]),
    (0, 0, False, [0, 0.25, 0.5, 0.75, 1.0]),
    (5, 5, True, [4, 5, 6]),
    (-3, 7, False, [-5, -2.5, 0, 2.5, 5, 7.5]),
    (0, 2.5e6, False, [0, 1e6, 2e6, 3e6]),
])
def test_nice_ticks(lo, hi, integer, ticks):
    assert nice_ticks(lo, hi, integer=integer) == pytest.approx(ticks)


def test_nice_ticks_round_and_covering_for_any_range():
    rng = random.Random(6)
    for _ in range(2000):
        a = rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-8, 3)
        b = a + abs(rng.gauss(0, 1)) * 10 ** rng.randint(-6, 8)
        integer = rng.random() < 0.3
        if b - a < 1e-6 * abs(a):
            continue            # a span below the float resolution of its values: no plot has one
        t = nice_ticks(a, b, integer=integer)
        step = t[1] - t[0]
        # within float noise (1e-9 of a step); an integer axis over less than one whole step has
        # just the two whole numbers around it
        slack = 1e-9 * step
        assert t[0] <= a + slack and t[-1] >= b - slack and (2 if integer else 3) <= len(t) <= 9, (a, b, t)
        mant = step / 10 ** math.floor(math.log10(step) + 1e-12)
        assert any(abs(mant - m) < 1e-6 for m in (1, 2, 2.5, 5, 10)), (a, b, step)
        assert all(abs((u - v) - step) <= 1e-9 * max(abs(u), abs(v), step) for u, v in zip(t[1:], t))
        if integer:
            assert step >= 1 and float(step).is_integer()


def test_tick_labels_and_values():
    assert tick_labels([0, 0.25, 0.5]) == ["0.00", "0.25", "0.50"]
    assert tick_labels([0, 2500, 5000]) == ["0", "2,500", "5,000"]
    assert tick_labels([0, 2e6, 4e6]) == ["0", "2M", "4M"]
    assert tick_labels([0, 2.5e9, 5e9]) == ["0", "2.5G", "5.0G"]
    assert tick_labels([-1, 0, 1]) == ["-1", "0", "1"]
    assert fmt(None) == fmt(math.nan) == fmt(np.float64("nan")) == "-"
    assert fmt(1234567) == fmt(np.int64(1234567)) == fmt(1234567.0) == "1,234,567"
    assert fmt(0.123456) == "0.1235" and fmt(12345.6) == "12,346" and fmt(2.5e-7) == "2.5e-07"
    assert fmt(True) == "yes" and fmt("tiny-linux") == "tiny-linux"


# ------------------------------------------------------------------------------------------
# plots and the page, as markup

EVIL = '<script>alert("x")</script> & "quotes"'


def test_every_caller_text_is_escaped():
    rep = Report(EVIL, subtitle=EVIL)
    rep.text(EVIL)
    rep.table(Table("t", [EVIL], [[EVIL]]))
    rep.plot(LinePlot(EVIL, EVIL, EVIL, [Series(EVIL, [1, 2], [3, 4])], hlines=[(EVIL, 2)], note=EVIL))
    rep.plot(BarPlot(EVIL, EVIL, [EVIL], [Series(EVIL, [1])]))
    page = rep.html()
    assert "<script" not in page and "alert(" in page
    # every occurrence is the escaped text: 1 title + h1 + subtitle + paragraph + th + td + ...
    assert page.count(html.escape(EVIL, quote=True)) >= 18


def test_degenerate_plots():
    # nothing to draw: says so
    for p in (LinePlot("a", "x", "y"), LinePlot("b", "x", "y", [Series("s", [], [])]),
              LinePlot("c", "x", "y", [Series("s", [1, 2], [None, math.nan])]),
              BarPlot("d", "y", [], []), BarPlot("e", "y", ["k"], [Series("s", [None])])):
        out = svg.render(p)
        assert 'class="no-data"' in out and 'class="mark"' not in out
    # one point: a marker, no line
    one = svg.render(LinePlot("one", "x", "y", [Series("s", [3], [7])]))
    assert one.count("<circle") == 1 and "<path" not in one
    # a missing value breaks the line: two runs, the lone point keeps its marker
    broken = svg.render(LinePlot("b", "x", "y", [Series("s", [1, 2, 3, 4], [1, 2, None, 4])]))
    assert broken.count("<path") == 1 and broken.count("<circle") == 3
    broken = svg.render(LinePlot("b", "x", "y", [Series("s", [1, 2, 3, 4, 5], [1, 2, np.nan, 4, 5])]))
    assert broken.count("<path") == 2
    # a step plot holds each value (H then V); many points: the line without markers
    many = svg.render(LinePlot("m", "x", "y", [Series("s", range(500), range(500))], step=True))
    assert "<circle" not in many and re.search(r'd="M[\d.]+ [\d.]+H[\d.]+V', many)
    # an empty series among others is in the legend as such
    assert "e (no data)" in svg.render(LinePlot("l", "x", "y", [Series("s", [1], [1]), Series("e", [], [])]))
    bars = svg.render(BarPlot("b", "GiB", ["a", "b", "c"], [Series("u", [1, None, 3]), Series("f", [0, 2, 1])]))
    assert bars.count('<rect class="mark"') == 5
    assert len({svg.colour(i) for i in range(40)}) == 40


def test_content_is_checked_where_it_is_made():
    with pytest.raises(ValueError, match="2 xs but 1 ys"):
        Series("s", [1, 2], [1])
    with pytest.raises(ValueError, match="not a number"):
        LinePlot("p", "x", "y", [Series("s", [1], ["many"])])
    with pytest.raises(ValueError, match="needs xs and ys"):
        LinePlot("p", "x", "y", [Series("s", [1, 2])])
    with pytest.raises(ValueError, match="1 values for 2 categories"):
        BarPlot("p", "y", ["a", "b"], [Series("s", [1])])
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        Table("t", ["a", "b"], [[1, 2, 3]])
    with pytest.raises(ValueError, match="plain file name"):
        Table("../t", ["a"], [])
    rep = Report("r")
    rep.table(Table("t", ["a"], []))
    with pytest.raises(ValueError, match="two tables"):
        rep.table(Table("t", ["b"], []))
    with pytest.raises(ValueError, match="plain, unused"):
        rep.write("/nonexistent/never", {}, files={"t.csv": "x"})


# ------------------------------------------------------------------------------------------
# files

def test_a_modules_plots_are_drawn_in_declaration_order():
    from vmhost.reports.report import Plots
    plots = Plots()
    one, two, three = (LinePlot(t, "x", "y", [Series("s", [0, 1], [1, 2])]) for t in "abc")
    plots.add(lambda res: one)
    plots.add(lambda res: None if res["none"] else [two, three])      # none, or several
    plots.add(lambda res: three)
    assert plots.of({"none": False}) == [one, two, three, three]
    assert plots.of({"none": True}) == [one, three]


def test_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    d = tmp_path / "rep"
    rep = Report("r")
    rep.table(Table("t", ["a"], [[1]]))
    rep.write(d, {"run": 1}, files={"report.txt": "one\n"})
    assert sorted(p.name for p in d.iterdir()) == ["report.html", "report.txt", "result.json", "t.csv"]
    Report("r").write(d, {"run": 2})
    assert sorted(p.name for p in d.iterdir()) == ["report.html", "result.json"]      # old files gone
    assert json.loads((d / "result.json").read_text()) == {"run": 2}

    def broken(path, table):
        path.write_text("half")
        raise OSError("disk full")
    monkeypatch.setattr("vmhost.reports.report.write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        rep.write(d, {"run": 3})
    assert json.loads((d / "result.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]             # no temporary left
    with pytest.raises(OSError):
        rep.write(tmp_path / "new", {"run": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_json_is_strict_and_plain():
    res = {"a": np.int64(3), "b": np.float32(0.5), "c": np.array([1, 2]), "d": (np.bool_(True), math.nan),
           "e": {np.int64(1): math.inf}}
    text = report_files.dumps_json(res)

    def no_constants(name):
        raise AssertionError(f"{name} in JSON")
    assert json.loads(text, parse_constant=no_constants) == {"a": 3, "b": 0.5, "c": [1, 2], "d": [True, None],
                                                             "e": {"1": None}}


def test_csv_cells_read_back(tmp_path):
    t = Table("t", ["i", "f", "b", "n", "s"], [[np.int64(7), 0.1 + 0.2, True, None, 'a,"b"'], [1, np.nan, False, 2, ""]])
    report_files.write_csv(tmp_path / "t.csv", t)
    rows = list(csv.reader(open(tmp_path / "t.csv", newline="")))
    assert rows == [["i", "f", "b", "n", "s"], ["7", repr(0.1 + 0.2), "true", "", 'a,"b"'], ["1", "", "false", "2", ""]]


# ------------------------------------------------------------------------------------------
# the browser

def chromium(tmp_path: Path, *args: str) -> str:
    assert CHROMIUM.exists(), "headless Chromium is needed (apt-get install chromium; .ci/run does)"
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    r = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def measure(tmp_path: Path, report_dir: Path) -> dict:
    """Open a copy of report.html (beside the original, with the measuring script) and read back
    what Chromium drew."""
    page = (report_dir / "report.html").read_text()
    assert f'content="{CSP}"' in page
    page = page.replace(f'content="{CSP}"', f'content="{CSP}; script-src \'unsafe-inline\'"')
    copy = report_dir / "measured.html"
    copy.write_text(page.replace("</body>", MEASURE + "</body>"))
    try:
        dom = chromium(tmp_path, f"--window-size={WIDTH},1200", "--dump-dom", copy.as_uri())
    finally:
        copy.unlink()
    m = re.search(r'<pre id="measure">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    return json.loads(html.unescape(m.group(1)))


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) as an (h, w, 3) array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(h):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            a = np.frombuffer(bytes(line), np.uint8).reshape(w, bpp).astype(np.uint32)
            line = bytearray((np.cumsum(a, axis=0) % 256).astype(np.uint8).tobytes())
        elif kind == 2:
            line = bytearray(((np.frombuffer(bytes(line), np.uint8).astype(np.uint16)
                               + np.frombuffer(bytes(prev), np.uint8)) % 256).astype(np.uint8).tobytes())
        elif kind in (3, 4):
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                if kind == 3:
                    line[i] = (line[i] + (a + b) // 2) & 255
                    continue
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            assert kind == 0, kind
        rows.append(bytes(line))
        prev = line
    return np.frombuffer(b"".join(rows), np.uint8).reshape(h, w, bpp)[:, :, :3]


def rgb(css: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"rgb\((\d+), (\d+), (\d+)\)", css)
    assert m, css
    return tuple(int(v) for v in m.groups())


def screenshot(tmp_path: Path, page: Path, height: int) -> np.ndarray:
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.as_uri())
    return decode_png(shot.read_bytes())


def assert_seen(tmp_path: Path, report_dir: Path, plots: list[dict]) -> None:
    """Every plot's colours are in a screenshot of the original page, inside that plot's area
    (not only in its legend)."""
    img = screenshot(tmp_path, report_dir / "report.html", int(max(p["bottom"] for p in plots)) + 20)
    for p in plots:
        x0, y0, x1, y1 = (int(v) for v in p["area"])
        box = img[y0:y1, x0:x1].astype(int)
        assert box.size, p
        for css in p["colours"]:
            near = (np.abs(box - np.array(rgb(css))).max(axis=2) <= 2).sum()
            assert near >= 10, f"{p['title']}: colour {css} on {near} pixels"


# ------------------------------------------------------------------------------------------
# the density report of a real run

@pytest.fixture(scope="module")
def density(tmp_path_factory):
    d = tmp_path_factory.mktemp("density") / "report"
    r = subprocess.run([sys.executable, "-m", "vmhost.cli", "density", "configs/density-tiny.yaml", "--json",
                        "--quiet", "--report", str(d)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), d


def test_density_report_files(density):
    res, d = density
    assert sorted(p.name for p in d.iterdir()) == ["curve.csv", "nodes.csv", "report.html", "report.txt",
                                                   "result.json", "steps.csv", "timeline.csv"]
    assert json.loads((d / "result.json").read_text()) == res
    assert (d / "report.txt").read_text() == format_result(res) + "\n"
    assert [p.name for p in d.parent.iterdir()] == ["report"]
    assert res["timeline"] and all(s["per_node"] for s in res["steps"])


def test_density_html_is_self_contained(density):
    page = (density[1] / "report.html").read_text()
    assert not re.search(r"https?:|//[a-z]|<script|<link|<img|<iframe|@import|url\(|\bsrc=", page, re.I)
    assert page.count("<svg") == 5 and 'class="no-data"' not in page
    for t in ("curve", "steps", "timeline", "nodes"):
        assert f'href="{t}.csv"' in page


def _read_csv(path: Path) -> tuple[list[str], list[list]]:
    def value(s: str):
        if s == "":
            return None
        if s in ("true", "false"):
            return s == "true"
        for kind in (int, float):
            try:
                return kind(s)
            except ValueError:
                pass
        return s
    rows = list(csv.reader(open(path, newline="")))
    return rows[0], [[value(c) for c in r] for r in rows[1:]]


def test_density_csvs_read_back_to_the_result(density):
    res, d = density
    cols, rows = _read_csv(d / "curve.csv")
    assert cols == CURVE_COLUMNS and len(rows) == len(res["curve"]) > 0
    for row, want in zip(rows, res["curve"]):
        assert row == [want.get(c) for c in CURVE_COLUMNS]
    cols, rows = _read_csv(d / "steps.csv")
    assert cols == STEP_COLUMNS and len(rows) == len(res["steps"]) > 0
    for row, s in zip(rows, res["steps"]):
        got = dict(zip(cols, row))
        for c in cols:
            if c in s and c not in ("oom_kills", "violations"):
                assert got[c] == s[c], c
        assert [got["p50_s"], got["p90_s"], got["p99_s"]] == [s["time_to"][k] for k in ("p50_s", "p90_s", "p99_s")]
        assert got["storm_headroom_pages"] == s["storm"]["headroom_pages"]
        assert got["storm_survives"] == s["storm"]["survives"]
        assert got["oom_kills"] == len(s["oom_kills"]) and (got["violations"] or "") == "; ".join(s["violations"])
    cols, rows = _read_csv(d / "timeline.csv")
    assert cols == TIMELINE_COLUMNS and rows == [[p[c] for c in cols] for p in res["timeline"]] and rows
    cols, rows = _read_csv(d / "nodes.csv")
    assert cols == NODE_COLUMNS
    assert rows == [[s["guests"], n["node"], n["total_pages"], n["free_pages"], n["total_pages"] - n["free_pages"]]
                    for s in res["steps"] for n in s["per_node"]]


@pytest.mark.chromium
def test_density_plots_are_seen_in_chromium(density, tmp_path):
    res, d = density
    m = measure(tmp_path, d)
    plots = {p["title"]: p for p in m["plots"]}
    assert list(plots) == ["Memory needed for N VMs", "KSM savings over time", "Memory per NUMA node after each step",
                           "ksmd CPU at steady state", "Time to X% of each step's savings"]
    steps, curve = res["steps"], res["curve"]
    nodes = len(steps[0]["per_node"])
    for p in plots.values():
        assert p["width"] >= 600 and p["height"] >= 250 and not p["noData"], p
        assert p["drawn"] == p["marks"] > 0, p
    want = {  # title: (paths, circles, rects, colours)
        "Memory needed for N VMs": (3, 2 * len(curve) + len(steps), 0, 3),
        "KSM savings over time": (1, 0, 0, 1),
        "Memory per NUMA node after each step": (0, 0, 2 * nodes * len(steps), 2 * nodes),
        "ksmd CPU at steady state": (1, len(steps), 0, 1),
        "Time to X% of each step's savings": (3, 3 * len(steps), 0, 3),
    }
    for title, (paths, circles, rects, colours) in want.items():
        p = plots[title]
        assert (p["paths"], p["circles"], p["rects"], len(p["colours"])) == (paths, circles, rects, colours), p
    assert {rgb(c) for p in plots.values() for c in p["colours"]} >= {
        tuple(int(svg.PALETTE[i][k:k + 2], 16) for k in (1, 3, 5)) for i in range(3)}
    assert_seen(tmp_path, d, list(plots.values()))


def test_density_report_of_a_result_without_timeline_or_nodes(density, tmp_path):
    res = json.loads(json.dumps(density[0]))
    del res["timeline"]
    for s in res["steps"]:
        del s["per_node"]
    rep = build(res)
    rep.write(tmp_path / "old", res)
    page = (tmp_path / "old" / "report.html").read_text()
    assert page.count('class="no-data"') == 2
    assert "This result has no timeline of savings." in page and "This result has no per-node memory." in page
    assert (tmp_path / "old" / "timeline.csv").read_text().splitlines() == [",".join(TIMELINE_COLUMNS)]
    m = measure(tmp_path, tmp_path / "old")
    empty = [p["title"] for p in m["plots"] if p["noData"]]
    assert empty == ["KSM savings over time", "Memory per NUMA node after each step"]
    assert all(p["height"] > 50 and p["width"] >= 600 for p in m["plots"])
    assert all(p["drawn"] == p["marks"] > 0 for p in m["plots"] if not p["noData"])


@pytest.mark.chromium
def test_degenerate_plots_in_chromium(tmp_path):
    rep = Report("edge cases")
    rep.plot(LinePlot("one point", "x", "y", [Series("s", [3], [7])]))
    rep.plot(LinePlot("broken", "x", "y", [Series("s", [1, 2, 3, 4, 5], [1, 2, None, 4, math.nan])],
                      hlines=[("cap", 5)]))
    rep.plot(LinePlot("nothing", "x", "y", [Series("s", [], [])]))
    rep.plot(BarPlot("bars", "GiB", ["a", "b"], [Series("u", [1, None]), Series("f", [0.5, 2])]))
    rep.write(tmp_path / "edge", {})
    plots = {p["title"]: p for p in measure(tmp_path, tmp_path / "edge")["plots"]}
    assert (plots["one point"]["circles"], plots["one point"]["paths"]) == (1, 0)
    assert (plots["broken"]["circles"], plots["broken"]["paths"]) == (3, 1)
    assert plots["nothing"]["noData"] and plots["nothing"]["marks"] == 0 and plots["nothing"]["height"] > 50
    assert plots["bars"]["rects"] == 3 and len(plots["bars"]["colours"]) == 2
    assert_seen(tmp_path, tmp_path / "edge", [p for p in plots.values() if p["marks"]])
