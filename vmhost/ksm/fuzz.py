"""Random KSM traces for differential fuzzing, and shrinking a trace that shows a difference.

The kernel has no single function this mirrors: this module writes programs in the trace
contract (``docs/ksm-trace-v1.md``) that exercise what a workload can do to
KSM through its user interface (mmap with THP and MAP_SHARED, writes of every content
kind, madvise, prctl, fork, exit, every writable knob of /sys/kernel/mm/ksm, scans of every
length, run=2), so that the emulator can be held against the kernel on cases nobody wrote
by hand. Running the kernel side is ``vmhost/reality/ksm_fuzz.py``'s job; this module never
touches the machine.

A generated trace is a plain document (the dict a YAML trace file decodes to), small enough
that the kernel runs it in about a second: at most a few hundred pages per process (THP
regions 512), at most 4 live processes, at most ``MAX_SCANS`` full scans. Values are drawn
from small pools so that pages, processes and writes collide and merge.

Constructs the trace contract says cannot agree are not generated (prctl leaves the
oracle's own interpreter mergeable, so a ``prctl: true`` is always followed straight away
by ``prctl: false``, before any scan or fork), nor those whose outcome depends on wall
time in ways the trace does not fix (``advisor_mode: scan-time`` is only set for the length
of one knob step; prune intervals are 0, ones that fall between ksmd's 50 ms sleeps, the
default 2000 ms that a trace never reaches, or 60 s).

``shrink`` is delta debugging (Zeller's ddmin) over a trace's steps, then over its initial
knobs, processes, the writes inside knob steps, scan lengths and fill lengths; a candidate
that is not a valid trace (a step naming a process whose fork was removed) is skipped.
"""

from __future__ import annotations

import copy
import json
import random
import re
from typing import Callable

from guests.errors import InputError
from vmhost.ksm.trace import Trace, parse_trace

MAX_LIVE = 4            # processes alive at once
MAX_SCANS = 16          # full scans in one trace (each is ~50 ms of ksmd sleep on the kernel)
MAX_STEPS = 22
VALUES = (0x11, 0x22, 0x33, 0x44, 0x55)
UNIQUE_KEYS = (1, 2, 3)

#: (knob, value, weight): valid values and values the kernel refuses (EINVAL), to be drawn.
KNOB_CHOICES = (
    ("max_page_sharing", 2, 3), ("max_page_sharing", 3, 3), ("max_page_sharing", 5, 2),
    ("max_page_sharing", 256, 2), ("max_page_sharing", 1, 1), ("max_page_sharing", "x", 1),
    ("use_zero_pages", 1, 3), ("use_zero_pages", 0, 2), ("use_zero_pages", "y", 1),
    ("use_zero_pages", 2, 1),
    ("smart_scan", 0, 3), ("smart_scan", 1, 2), ("smart_scan", "off", 1),
    ("merge_across_nodes", 0, 1), ("merge_across_nodes", 1, 1), ("merge_across_nodes", 2, 1),
    ("stable_node_chains_prune_millisecs", 0, 3), ("stable_node_chains_prune_millisecs", 75, 2),
    ("stable_node_chains_prune_millisecs", 130, 2),
    ("stable_node_chains_prune_millisecs", 2000, 1),
    ("stable_node_chains_prune_millisecs", 60000, 1),
    ("pages_to_scan", 1000000, 2), ("pages_to_scan", 100, 1), ("pages_to_scan", 250, 1),
    ("pages_to_scan", -1, 1),
    ("sleep_millisecs", 50, 1), ("sleep_millisecs", 40, 1), ("sleep_millisecs", 80, 1),
    ("sleep_millisecs", "fast", 1),
    ("run", 0, 1), ("run", 2, 3), ("run", 3, 1),
    ("advisor_max_cpu", 50, 1), ("advisor_min_pages_to_scan", 300, 1),
    ("advisor_max_pages_to_scan", 5000, 1), ("advisor_target_scan_time", 0, 1),
    ("advisor_target_scan_time", 100, 1), ("advisor_mode", "none", 1),
    ("advisor_mode", "auto", 1),
)

STEP_WEIGHTS = (("fill", 30), ("madvise", 16), ("scan", 24), ("knob", 9), ("fork", 5),
                ("exit", 3), ("prctl", 2), ("snapshot", 2))


class _Gen:
    def __init__(self, rng: random.Random, thp: bool = True):
        self.rng = rng
        self.thp = thp
        self.procs: dict[str, list[dict]] = {}   # alive process -> its regions
        self.next_proc = 0
        self.scans = 0
        self.steps: list[dict] = []

    # -- pieces ------------------------------------------------------------------------------
    def new_name(self) -> str:
        name = f"p{self.next_proc}"
        self.next_proc += 1
        return name

    def regions(self) -> list[dict]:
        rng, out = self.rng, []
        for i in range(rng.choice((1, 1, 2, 2, 3))):
            r = {"name": f"r{i}"}
            kind = rng.random()
            if kind < 0.1:
                r.update(pages=512, thp=True) if self.thp else r.update(pages=512)
            elif kind < 0.2:
                r.update(pages=rng.randint(1, 64), shared=True)
            elif kind < 0.25:
                r.update(pages=rng.randint(1, 32), prot="none")
            else:
                r.update(pages=rng.choice((rng.randint(1, 16), rng.randint(2, 128),
                                           rng.randint(64, 300))))
            out.append(r)
        return out

    def content(self):
        rng = self.rng
        kind = rng.choices(("zero", "same", "seq", "unique", "cycle"), (2, 5, 2, 2, 2))[0]
        if kind == "zero":
            return "zero"
        if kind == "same":
            return {"same": rng.choice(VALUES)}
        if kind == "seq":
            return {"seq": rng.choice(VALUES)}
        if kind == "unique":
            return {"unique": rng.choice(UNIQUE_KEYS)}
        return {"cycle": rng.sample(VALUES, rng.randint(1, 3))}

    def pick(self):
        proc = self.rng.choice(sorted(self.procs))
        return proc, self.rng.choice(self.procs[proc])

    def span(self, region: dict, whole_bias: float) -> tuple[int, int]:
        pages = region["pages"]
        if self.rng.random() < whole_bias:
            return 0, pages
        start = self.rng.randrange(pages)
        return start, self.rng.randint(1, pages - start)

    def knob_writes(self, n: int) -> dict:
        names = [c[0] for c in KNOB_CHOICES]
        weights = [c[2] for c in KNOB_CHOICES]
        out = {}
        for _ in range(n):
            i = self.rng.choices(range(len(names)), weights)[0]
            out.setdefault(names[i], KNOB_CHOICES[i][1])
        return out

    # -- steps -------------------------------------------------------------------------------
    def fill(self, proc=None, region=None):
        if proc is None:
            proc, region = self.pick()
        start, count = self.span(region, 0.3)
        self.steps.append({"fill": {"proc": proc, "region": region["name"], "start": start,
                                    "count": count, "content": self.content()}})

    def madvise(self, advice=None, proc=None, region=None):
        if proc is None:
            proc, region = self.pick()
        advice = advice or self.rng.choices(("mergeable", "unmergeable", "dontneed"),
                                            (6, 2, 2))[0]
        body = {"proc": proc, "region": region["name"], "advice": advice}
        start, count = self.span(region, 0.7)
        if (start, count) != (0, region["pages"]):
            body.update(start=start, count=count)
        self.steps.append({"madvise": body})

    def scan(self):
        n = min(self.rng.choice((1, 1, 1, 2, 2, 3, 4)), MAX_SCANS - self.scans)
        if n > 0:
            self.scans += n
            self.steps.append({"scan": n})

    def knob(self):
        if self.rng.random() < 0.1:
            # the scan-time advisor, for one step only (it retunes pages_to_scan by wall time)
            self.steps.append({"knob": {"advisor_mode": "scan-time", "pages_to_scan": 500}})
            self.steps.append({"knob": {"advisor_mode": "none", "pages_to_scan": 1000000}})
            return
        self.steps.append({"knob": self.knob_writes(self.rng.choice((1, 1, 2, 3)))})

    def fork(self):
        if len(self.procs) >= MAX_LIVE:
            return self.fill()
        parent = self.rng.choice(sorted(self.procs))
        child = self.new_name()
        self.procs[child] = self.procs[parent]
        self.steps.append({"fork": {"proc": parent, "child": child}})

    def exit(self):
        proc = self.rng.choice(sorted(self.procs))
        del self.procs[proc]
        self.steps.append({"exit": {"proc": proc}})

    def prctl(self):
        proc = self.rng.choice(sorted(self.procs))
        if self.rng.random() < 0.7:
            self.steps.append({"prctl": {"proc": proc, "merge": True}})
        self.steps.append({"prctl": {"proc": proc, "merge": False}})

    def snapshot(self):
        self.steps.append({"snapshot": {}})

    # -- the document ------------------------------------------------------------------------
    def document(self) -> dict:
        rng = self.rng
        doc: dict = {"version": 1}
        if rng.random() < 0.5:
            doc["knobs"] = self.knob_writes(rng.randint(1, 3))
        processes = {}
        for _ in range(rng.choice((1, 1, 2, 2, 3))):
            name = self.new_name()
            regions = self.regions()
            processes[name] = {"regions": regions}
            self.procs[name] = regions
        doc["processes"] = processes
        # something to merge from the start: a write and MADV_MERGEABLE in the first process
        first = sorted(self.procs)[0]
        region = rng.choice(self.procs[first])
        self.fill(first, region)
        self.madvise("mergeable", first, region)
        kinds, weights = zip(*STEP_WEIGHTS)
        for _ in range(rng.randint(4, MAX_STEPS)):
            if not self.procs:
                break
            getattr(self, rng.choices(kinds, weights)[0])()
        if self.scans < MAX_SCANS:
            self.steps.append({"scan": min(rng.choice((1, 2, 3)), MAX_SCANS - self.scans)})
        doc["steps"] = self.steps
        return doc


def generate(seed: int, thp: bool = True) -> dict:
    """A random valid trace document; the same seed always gives the same document.

    ``thp=False`` makes every THP region a plain one of the same size (and changes nothing
    else): the kernel does not always find a huge page free, so a batch that must agree
    exactly leaves THP out.
    """
    doc = _Gen(random.Random(seed), thp).document()
    parse_trace(doc, f"<fuzz seed {seed}>")          # the generator only writes valid traces
    return doc


def trace_seed(campaign_seed: int, index: int) -> int:
    """The seed of trace ``index`` of a campaign (traces can be regenerated one by one)."""
    return campaign_seed * 1_000_003 + index


def parse(doc: dict, name: str = "<fuzz>") -> Trace | None:
    """The validated trace of a document, or None if the document is not a valid trace."""
    try:
        return parse_trace(copy.deepcopy(doc), name)
    except InputError:
        return None


# --------------------------------------------------------------------------------------------
# Writing a document as a corpus-style YAML file

_PLAIN = re.compile(r"[a-z][a-z0-9_-]*\Z")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _flow(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if _PLAIN.match(value) and value not in _YAML_WORDS else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r}")


def to_yaml(doc: dict, comment: str = "") -> str:
    """The document as a trace file in the corpus's layout (one step per line), with
    ``comment`` as its leading ``#`` lines."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()] if comment else []
    lines.append("version: 1")
    if doc.get("knobs"):
        lines.append(f"knobs: {_flow(doc['knobs'])}")
    lines.append("processes:" + ("" if doc["processes"] else " {}"))
    for name, body in doc["processes"].items():
        lines += [f"  {name}:", f"    regions: {_flow(body['regions'])}"]
    lines.append("steps:" + ("" if doc["steps"] else " []"))
    lines += [f"  - {_flow(step)[1:-1]}" for step in doc["steps"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Shrinking


def _ddmin(items: list, fails: Callable[[list], bool]) -> list:
    """Zeller's ddmin: a 1-minimal sublist of ``items`` (order kept) for which ``fails`` holds."""
    n = 2
    while len(items) >= 2:
        size = -(-len(items) // n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        for i in range(len(chunks)):
            complement = [x for j, c in enumerate(chunks) if j != i for x in c]
            if fails(complement):
                items, n = complement, max(n - 1, 2)
                break
        else:
            for c in chunks:
                if len(c) < len(items) and fails(c):
                    items, n = c, 2
                    break
            else:
                if n >= len(items):
                    break
                n = min(n * 2, len(items))
    return items


def shrink(doc: dict, fails: Callable[[dict], bool]) -> dict:
    """A small document for which ``fails`` still holds (``fails(doc)`` must hold).

    ``fails`` is only called on valid traces; it is typically "the emulator and the kernel
    disagree" and costs a kernel run, so every candidate is tried at most once.
    """
    seen: dict[str, bool] = {}

    def test(candidate: dict) -> bool:
        key = json.dumps(candidate, sort_keys=True)
        if key not in seen:
            seen[key] = parse(candidate) is not None and fails(candidate)
        return seen[key]

    def with_(**changes) -> dict:
        out = copy.deepcopy(doc)
        out.update(changes)
        if not out.get("knobs"):
            out.pop("knobs", None)
        return out

    # steps
    doc = with_(steps=_ddmin(list(doc["steps"]), lambda s: test(with_(steps=s))))
    # the knobs section
    knobs = list((doc.get("knobs") or {}).items())
    if knobs:
        doc = with_(knobs=dict(_ddmin(knobs, lambda k: test(with_(knobs=dict(k)))))
                    if not test(with_(knobs={})) else {})
    # processes never named by a step, and regions nobody uses
    for name in list(doc["processes"]):
        cand = with_(processes={k: v for k, v in doc["processes"].items() if k != name})
        if test(cand):
            doc = cand
    for name, body in list(doc["processes"].items()):
        for region in list(body["regions"]):
            procs = copy.deepcopy(doc["processes"])
            procs[name]["regions"] = [r for r in body["regions"] if r["name"] != region["name"]]
            if procs[name]["regions"] and test(with_(processes=procs)):
                doc = with_(processes=procs)
                body = doc["processes"][name]
    # inside steps: single knob writes, shorter scans, shorter fills
    for i in range(len(doc["steps"])):
        (kind, body), = doc["steps"][i].items()
        if kind == "knob" and len(body) > 1:
            kept = _ddmin(list(body.items()), lambda kv: test(_replace(doc, i, {"knob": dict(kv)})))
            doc = _replace(doc, i, {"knob": dict(kept)})
        elif kind == "scan":
            for n in range(1, body):
                if test(_replace(doc, i, {"scan": n})):
                    doc = _replace(doc, i, {"scan": n})
                    break
        elif kind == "fill" and body["count"] > 1:
            for count in sorted({1, body["count"] // 2}):
                cand = _replace(doc, i, {"fill": dict(body, count=count)})
                if test(cand):
                    doc = cand
                    break
    return doc


def _replace(doc: dict, i: int, step: dict) -> dict:
    out = copy.deepcopy(doc)
    out["steps"][i] = step
    return out
