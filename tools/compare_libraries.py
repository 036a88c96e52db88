"""Start-up cost of the hand-written progress bar and SVG plots against libraries that do the
same job, side by side: each case in a fresh interpreter, the cases interleaved, the median of
N rounds. Run it with a Python that has the libraries (a scratch venv, never the system's):

    python3 -m venv /tmp/cmp && /tmp/cmp/bin/pip install tqdm rich matplotlib pygal numpy
    PYTHONPATH=. /tmp/cmp/bin/python tools/compare_libraries.py 11

Also prints each plot's size and whether it holds a script (the report must be readable
offline, without scripts). Not shipped: tooling of the checkout, like container.py.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

PLOT = "xs = list(range(1, 17)); ys = [[i * f for i in xs] for f in (1.0, 0.6, 0.5)]\n"
CASES = {
    "python -c pass": "pass",
    "import numpy": "import numpy",
    "vmhost.progress (import + 16 steps)":
        "import io\nfrom vmhost.progress import Progress\n"
        "with Progress(16, 'd', stream=io.StringIO()) as p:\n    [p.advance(note='x') for _ in range(16)]",
    "tqdm (import + 16 steps)":
        "import io\nfrom tqdm import tqdm\nfor _ in tqdm(range(16), file=io.StringIO()): pass",
    "rich.progress (import + 16 steps)":
        "import io\nfrom rich.console import Console\nfrom rich.progress import Progress\n"
        "with Progress(console=Console(file=io.StringIO())) as p:\n"
        "    t = p.add_task('d', total=16)\n    [p.advance(t) for _ in range(16)]",
    "vmhost.reports.svg, numpy (import + 1 line plot)": PLOT +
        "from vmhost.reports.model import LinePlot, Series\nfrom vmhost.reports.svg import render\n"
        "s = render(LinePlot('t', 'x', 'y', [Series(str(k), xs, y) for k, y in enumerate(ys)]))\n"
        "open(os.environ['OUT'] + '/ours.svg', 'w').write(s)",
    "matplotlib, numpy (import + 1 line plot to SVG)": PLOT +
        "import io, matplotlib\nmatplotlib.use('svg')\nmatplotlib.rcParams['svg.fonttype'] = 'none'\n"
        "import matplotlib.pyplot as plt\nf, a = plt.subplots(figsize=(7.6, 3.2))\n"
        "[a.plot(xs, y, marker='o', label=str(k)) for k, y in enumerate(ys)]\na.legend()\n"
        "b = io.StringIO(); f.savefig(b, format='svg')\n"
        "open(os.environ['OUT'] + '/matplotlib.svg', 'w').write(b.getvalue())",
    "pygal, numpy (import + 1 line plot, js=[])": PLOT +
        "import numpy, pygal\nc = pygal.Line(js=[], width=760, height=320)\nc.x_labels = xs\n"
        "[c.add(str(k), y) for k, y in enumerate(ys)]\n"
        "open(os.environ['OUT'] + '/pygal.svg', 'w').write(c.render(is_unicode=True))",
}


def main(rounds: int) -> None:
    out = tempfile.mkdtemp(prefix="compare-libraries-")
    env = dict(os.environ, OUT=out)
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(rounds):
        for name, code in CASES.items():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import os\n" + code], check=True, env=env)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["python -c pass"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:50s} {m * 1e3:7.1f} ms, {(m - base) * 1e3:7.1f} ms over a bare interpreter")
    for f in sorted(os.listdir(out)):
        text = open(os.path.join(out, f)).read()
        print(f"{f}: {len(text)} bytes, script: {'<script' in text}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
