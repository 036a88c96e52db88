"""KSM trace format v1: loading, validation, page contents and result comparison.

A trace is a tiny program of memory operations (see ``docs/ksm-trace-v1.md``) that
runs both in the emulator (``vmhost ksm replay``) and in the real kernel (``vmhost ksm oracle``).
This module is the part both engines share, so it never touches the kernel: it turns a YAML/JSON
file into a validated :class:`Trace`, knows how page contents are derived from content specs, and
compares two result documents field by field.

Validation is strict on purpose. A trace that silently means something else in one engine than in
the other is worse than no trace, so every mistake is reported as one :class:`InputError` line that
names the file, the step (index and kind), the field and the reason.

Extensions to v1 defined here (they keep every plain v1 trace's meaning):

- region option ``prot: none`` (default ``readwrite``): the region is mapped ``PROT_NONE``.
  ``fill`` still writes it, the way a debugger does (``/proc/PID/mem``, a forced write fault), so
  the kernel selftest "KSM merges PROT_NONE memory" (docs/ksm-behaviour.md §11 F5) can be expressed.

Step ``args`` after validation (defaults filled in, so engines need no second look at the YAML):

==========  =====================================================================
kind        args
==========  =====================================================================
fill        ``{proc, region, start, count, content}``
madvise     ``{proc, region, advice, start, count}`` (start/count default to the region)
prctl       ``{proc, merge}``
knob        ``{NAME: VALUE, ...}`` in write order (a dict keeps insertion order)
fork        ``{proc, child}``
exit        ``{proc}``
scan        ``{count: N}``
snapshot    ``{}``
==========  =====================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guests.errors import InputError
from guests.schema import DocumentError, load_json, load_yaml
from hw.units import PAGE_SIZE
from vmhost.ksm import knobs as knob_table

WORDS_PER_PAGE = PAGE_SIZE // 8
MAX_ID = 1 << 63

PROFILES = ("linux-6.18", "linux-2.6.33")
DEFAULT_PROFILE = "linux-6.18"

#: Writable KSM sysfs knobs a trace may set (in /sys/kernel/mm/ksm).
KNOBS = knob_table.NAMES

#: Global fields of a snapshot, in the order of the spec's output example (``step`` and ``procs``
#: are structural and not listed).
SNAPSHOT_FIELDS = (
    "full_scans",
    "pages_scanned",
    "pages_skipped",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
    "general_profit",
    "cow_ksm",
    "ksm_swpin_copy",
)

#: When a ``scan`` step gives up on ksmd: neither ``full_scans`` nor ``pages_scanned`` moved for
#: IDLE_PERIODS sleeps of ``sleep_millisecs`` (read when the step starts), at least IDLE_MIN_MS.
#: The oracle waits that long in wall time, the emulator on its virtual clock.
IDLE_PERIODS = 10
IDLE_MIN_MS = 500

#: Per-process fields of a snapshot (from /proc/PID/ksm_stat).
PROC_FIELDS = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages")

STEP_KINDS = ("fill", "madvise", "prctl", "knob", "fork", "exit", "scan", "snapshot")
ADVICES = ("mergeable", "unmergeable", "dontneed")
PROTS = ("readwrite", "none")
CONTENT_KINDS = ("zero", "same", "seq", "unique", "cycle")


@dataclass
class Region:
    """One anonymous mapping of a process; ``pages`` 4 KiB pages."""

    name: str
    pages: int
    shared: bool = False
    thp: bool = False
    prot: str = "readwrite"  # extension: "none" maps it PROT_NONE


@dataclass
class Step:
    """One operation; ``index`` is its 0-based position in ``steps``."""

    index: int
    kind: str
    args: dict


@dataclass
class Trace:
    path: str
    version: int
    profile: str
    knobs: list[tuple[str, str | int]]
    processes: dict[str, list[Region]]
    steps: list[Step] = field(default_factory=list)

    def all_regions(self) -> dict[str, list[Region]]:
        """Every process that ever exists (forked children included) with its regions."""
        out = dict(self.processes)
        for step in self.steps:
            if step.kind == "fork":
                out[step.args["child"]] = out[step.args["proc"]]
        return out

    def total_pages(self) -> int:
        """Upper bound of the pages all processes of the trace can map."""
        return sum(r.pages for regions in self.all_regions().values() for r in regions)


# --------------------------------------------------------------------------------------------
# Loading


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file (YAML, or JSON when the name ends in ``.json``)."""
    name = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InputError(f"{name}: cannot read trace: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: cannot read trace: not UTF-8 text ({exc.reason})") from None
    json_file = name.endswith(".json")
    try:
        doc = load_json(text, name) if json_file else load_yaml(text, name)
    except DocumentError as exc:      # duplicate keys are refused in both syntaxes
        where = f"line {exc.line}: " if exc.line is not None else ""
        raise InputError(f"{name}: {where}{'JSON' if json_file else 'YAML'} syntax error: "
                         f"{exc.problem}") from None
    return parse_trace(doc, name)


def parse_trace(doc: Any, path: str = "<trace>") -> Trace:
    """Validate an already-decoded document; ``path`` is used in messages."""
    return _Validator(path).trace(doc)


def parse_content(spec: Any, count: int, path: str, where: str):
    """A content spec (zero, {same: V}, {seq: S}, {unique: K}, {cycle: [...]}) for ``count``
    pages, validated as a trace's fill content; ``where`` names its key in messages."""
    v = _Validator(path)
    v.where = where
    return v.content(spec, count)


# --------------------------------------------------------------------------------------------
# Validation


class _Validator:
    """Walks the document once, tracking which processes exist at each step."""

    def __init__(self, path: str):
        self.path = path
        self.where = ""  # "step 3 (fill)" / "knobs" / "processes.a" ...

    def fail(self, fld: str | None, reason: str):
        parts = [self.path]
        if self.where:
            parts.append(self.where)
        if fld is not None:
            parts.append(f"field '{fld}'")
        raise InputError(": ".join(parts + [reason]))

    # -- scalar helpers --------------------------------------------------------------------
    def integer(self, value, fld, minimum=None, maximum=None):
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(fld, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            what = "positive" if minimum == 1 else f">= {minimum}"
            self.fail(fld, f"must be {what}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(fld, f"must be <= {maximum}, got {value}")
        return value

    def boolean(self, value, fld):
        if not isinstance(value, bool):
            self.fail(fld, f"expected true or false, got {_show(value)}")
        return value

    def name(self, value, fld):
        if not isinstance(value, str) or not value:
            self.fail(fld, f"expected a non-empty name, got {_show(value)}")
        return value

    def mapping(self, value, fld, required=(), optional=()):
        if not isinstance(value, dict):
            self.fail(fld, f"expected a mapping, got {_show(value)}")
        for key in value:
            if key not in required and key not in optional:
                allowed = ", ".join(list(required) + list(optional)) or "none"
                sub = key if fld is None else f"{fld}.{key}"
                self.fail(sub, f"unknown field (allowed: {allowed})")
        for key in required:
            if key not in value:
                sub = key if fld is None else f"{fld}.{key}"
                self.fail(sub, "missing")
        return value

    # -- document --------------------------------------------------------------------------
    def trace(self, doc) -> Trace:
        self.mapping(doc, None, required=("version", "processes", "steps"),
                     optional=("profile", "knobs"))
        if isinstance(doc["version"], bool) or doc["version"] != 1:
            self.fail("version", f"unsupported version {_show(doc['version'])} (only 1)")
        profile = doc.get("profile", DEFAULT_PROFILE)
        if profile not in PROFILES:
            self.fail("profile", f"unknown profile {_show(profile)} "
                      f"(allowed: {', '.join(PROFILES)})")
        self.where = "knobs"
        knobs = list(self.knob_writes(doc.get("knobs", {}) or {}, None).items())
        self.where = ""
        processes = self.processes(doc["processes"])
        steps = self.steps(doc["steps"], processes)
        return Trace(self.path, 1, profile, knobs, processes, steps)

    def knob_writes(self, value, fld) -> dict:
        if not isinstance(value, dict):
            self.fail(fld, f"expected a mapping of knob names to values, got {_show(value)}")
        for knob, val in value.items():
            sub = knob if fld is None else f"{fld}.{knob}"
            if knob not in KNOBS:
                self.fail(sub, f"unknown knob {_show(knob)}")
            if isinstance(val, bool) or not isinstance(val, (int, str)):
                self.fail(sub, f"expected an integer or a string, got {_show(val)} "
                          "(quote words like 'on')")
            if knob == "run" and _as_uint(val) == 1:
                # ksmd may only run inside scan steps: a run=1 between steps would race.
                self.fail(sub, "run=1 is only allowed through a scan step")
        return dict(value)

    def processes(self, value) -> dict[str, list[Region]]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail("processes", f"expected a mapping of process names, got {_show(value)}")
        out = {}
        for pname, body in value.items():
            base = f"processes.{pname}"
            self.name(pname, base)
            self.mapping(body, base, required=("regions",))
            regions = body["regions"]
            if not isinstance(regions, list):
                self.fail(f"{base}.regions", f"expected a list, got {_show(regions)}")
            seen = set()
            out[pname] = []
            for i, reg in enumerate(regions):
                rf = f"{base}.regions[{i}]"
                self.mapping(reg, rf, required=("name", "pages"),
                             optional=("shared", "thp", "prot"))
                rname = self.name(reg["name"], f"{rf}.name")
                if rname in seen:
                    self.fail(f"{rf}.name", f"duplicate region name {rname!r}")
                seen.add(rname)
                pages = self.integer(reg["pages"], f"{rf}.pages", minimum=1)
                shared = self.boolean(reg.get("shared", False), f"{rf}.shared")
                thp = self.boolean(reg.get("thp", False), f"{rf}.thp")
                prot = reg.get("prot", "readwrite")
                if prot not in PROTS:
                    self.fail(f"{rf}.prot", f"unknown protection {_show(prot)} "
                              f"(allowed: {', '.join(PROTS)})")
                out[pname].append(Region(rname, pages, shared, thp, prot))
        return out

    def steps(self, value, processes) -> list[Step]:
        if not isinstance(value, list):
            self.fail("steps", f"expected a list, got {_show(value)}")
        alive = {name: {r.name: r for r in regs} for name, regs in processes.items()}
        exited: dict[str, int] = {}
        out = []
        for index, raw in enumerate(value):
            self.where = f"step {index}"
            if not isinstance(raw, dict) or len(raw) != 1:
                self.fail(None, "a step is a mapping with exactly one key, the step kind "
                          f"({', '.join(STEP_KINDS)}), got {_show(raw)}")
            (kind, body), = raw.items()
            if kind not in STEP_KINDS:
                self.fail(None, f"unknown step kind {_show(kind)} "
                          f"(allowed: {', '.join(STEP_KINDS)})")
            self.where = f"step {index} ({kind})"
            args = getattr(self, f"step_{kind}")(body, alive, exited, index)
            out.append(Step(index, kind, args))
        self.where = ""
        return out

    # -- steps -----------------------------------------------------------------------------
    def proc(self, body, alive, exited):
        pname = self.name(body["proc"], "proc")
        if pname in exited:
            self.fail("proc", f"process {pname!r} exited at step {exited[pname]}")
        if pname not in alive:
            self.fail("proc", f"unknown process {pname!r}")
        return pname

    def region(self, body, regions, pname) -> Region:
        rname = self.name(body["region"], "region")
        if rname not in regions:
            self.fail("region", f"process {pname!r} has no region {rname!r}")
        return regions[rname]

    def page_range(self, body, reg: Region, default_whole: bool):
        if default_whole:
            start = self.integer(body.get("start", 0), "start", minimum=0)
            if start >= reg.pages:
                self.fail("start", f"page {start} is past the end of region {reg.name!r} "
                          f"({reg.pages} pages)")
            count = self.integer(body.get("count", reg.pages - start), "count", minimum=1)
        else:
            start = self.integer(body["start"], "start", minimum=0)
            count = self.integer(body["count"], "count", minimum=1)
        if start + count > reg.pages:
            self.fail("count", f"page range {start}..{start + count} is past the end of region "
                      f"{reg.name!r} ({reg.pages} pages)")
        return start, count

    def step_fill(self, body, alive, exited, index):
        self.mapping(body, None, required=("proc", "region", "start", "count", "content"))
        pname = self.proc(body, alive, exited)
        reg = self.region(body, alive[pname], pname)
        start, count = self.page_range(body, reg, default_whole=False)
        content = self.content(body["content"], count)
        return {"proc": pname, "region": reg.name, "start": start, "count": count,
                "content": content}

    def step_madvise(self, body, alive, exited, index):
        self.mapping(body, None, required=("proc", "region", "advice"), optional=("start", "count"))
        pname = self.proc(body, alive, exited)
        reg = self.region(body, alive[pname], pname)
        if body["advice"] not in ADVICES:
            self.fail("advice", f"unknown advice {_show(body['advice'])} "
                      f"(allowed: {', '.join(ADVICES)})")
        start, count = self.page_range(body, reg, default_whole=True)
        return {"proc": pname, "region": reg.name, "advice": body["advice"],
                "start": start, "count": count}

    def step_prctl(self, body, alive, exited, index):
        self.mapping(body, None, required=("proc", "merge"))
        pname = self.proc(body, alive, exited)
        return {"proc": pname, "merge": self.boolean(body["merge"], "merge")}

    def step_knob(self, body, alive, exited, index):
        if isinstance(body, dict) and not body:
            self.fail(None, "a knob step needs at least one knob")
        return self.knob_writes(body, None)

    def step_fork(self, body, alive, exited, index):
        self.mapping(body, None, required=("proc", "child"))
        pname = self.proc(body, alive, exited)
        child = self.name(body["child"], "child")
        if child in alive or child in exited:
            self.fail("child", f"process name {child!r} is already used")
        alive[child] = dict(alive[pname])
        return {"proc": pname, "child": child}

    def step_exit(self, body, alive, exited, index):
        self.mapping(body, None, required=("proc",))
        pname = self.proc(body, alive, exited)
        del alive[pname]
        exited[pname] = index
        return {"proc": pname}

    def step_scan(self, body, alive, exited, index):
        return {"count": self.integer(body, "scan", minimum=1)}

    def step_snapshot(self, body, alive, exited, index):
        if body is not None and body != {}:
            self.fail("snapshot", f"takes no fields, got {_show(body)}")
        return {}

    # -- content ---------------------------------------------------------------------------
    def content(self, spec, count):
        if spec == "zero":
            return "zero"
        if not isinstance(spec, dict) or len(spec) != 1:
            self.fail("content", f"expected zero, {{same: V}}, {{seq: S}}, {{unique: K}} or "
                      f"{{cycle: [V, ...]}}, got {_show(spec)}")
        (kind, val), = spec.items()
        if kind == "same":
            self.integer(val, "content.same", minimum=0, maximum=MAX_ID - 1)
        elif kind == "seq":
            self.integer(val, "content.seq", minimum=0)
            if val + count - 1 >= MAX_ID:
                self.fail("content.seq", f"ids {val}..{val + count - 1} reach 2^63")
        elif kind == "unique":
            self.integer(val, "content.unique", minimum=0)
            if (val << 32) + count >= MAX_ID:
                self.fail("content.unique", f"key {val} makes ids reach 2^63")
        elif kind == "cycle":
            if not isinstance(val, list) or not val:
                self.fail("content.cycle", f"expected a non-empty list of ids, got {_show(val)}")
            for i, v in enumerate(val):
                self.integer(v, f"content.cycle[{i}]", minimum=0, maximum=MAX_ID - 1)
        else:
            self.fail("content", f"unknown content kind {_show(kind)} "
                      f"(allowed: {', '.join(CONTENT_KINDS)})")
        return {kind: val}


def _as_uint(val) -> int | None:
    """The value the kernel's decimal parser would see, or None if it would refuse it."""
    s = str(val)
    return int(s) if s.isdigit() else None


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------
# Page contents


def content_ids(spec, count: int) -> np.ndarray:
    """The 64-bit content id of each of ``count`` pages written with content ``spec``."""
    i = np.arange(count, dtype=np.uint64)
    if spec == "zero":
        return np.zeros(count, dtype=np.uint64)
    (kind, val), = spec.items()
    if kind == "same":
        return np.full(count, val, dtype=np.uint64)
    if kind == "seq":
        return np.uint64(val) + i
    if kind == "unique":
        return np.uint64(val << 32) + i + np.uint64(1)
    if kind == "cycle":
        return np.asarray(val, dtype=np.uint64)[np.arange(count) % len(val)]
    raise ValueError(f"unknown content spec {spec!r}")


def page_bytes(ids: np.ndarray) -> bytes:
    """Page images for ``ids``: each id as 8 little-endian bytes, repeated over its 4096 bytes."""
    ids = np.asarray(ids, dtype="<u8")
    return np.repeat(ids, WORDS_PER_PAGE).tobytes()


# --------------------------------------------------------------------------------------------
# Results


def _label(i: int, snap: dict) -> str:
    return f"snapshot {i} (step {snap.get('step')})"


def compare_results(a: dict, b: dict) -> list[str]:
    """Every difference between two result documents, one readable line each ([] = agree).

    ``engine`` is ignored (it is what differs by design); everything else the spec puts in the
    output is compared: profile, the snapshots field by field (per-process fields too) and errors.
    """
    diffs = []
    if a.get("version") != b.get("version"):
        diffs.append(f"version {a.get('version')} != {b.get('version')}")
    if a.get("profile") != b.get("profile"):
        diffs.append(f"profile {a.get('profile')} != {b.get('profile')}")
    sa, sb = a.get("snapshots", []), b.get("snapshots", [])
    if len(sa) != len(sb):
        diffs.append(f"snapshot count {len(sa)} != {len(sb)}")
    for i, (x, y) in enumerate(zip(sa, sb)):
        label = _label(i, x)
        if x.get("step") != y.get("step"):
            diffs.append(f"snapshot {i}: step {x.get('step')} != {y.get('step')}")
        for f in SNAPSHOT_FIELDS:
            if x.get(f) != y.get(f):
                diffs.append(f"{label}: {f} {x.get(f)} != {y.get(f)}")
        px, py = x.get("procs", {}), y.get("procs", {})
        for p in list(px) + [p for p in py if p not in px]:
            if p not in py:
                diffs.append(f"{label}: process {p} only in the first result")
            elif p not in px:
                diffs.append(f"{label}: process {p} only in the second result")
            else:
                for f in PROC_FIELDS:
                    if px[p].get(f) != py[p].get(f):
                        diffs.append(f"{label}: {p}.{f} {px[p].get(f)} != {py[p].get(f)}")
    ea, eb = a.get("errors", []), b.get("errors", [])
    for e in ea:
        if e not in eb:
            diffs.append(f"error only in the first result: {json.dumps(e, sort_keys=True)}")
    for e in eb:
        if e not in ea:
            diffs.append(f"error only in the second result: {json.dumps(e, sort_keys=True)}")
    if not diffs and ea != eb:
        diffs.append("errors are in a different order")
    return diffs


_SHORT = {
    "full_scans": "fs", "pages_scanned": "scanned", "pages_skipped": "skipped",
    "pages_shared": "shared", "pages_sharing": "sharing", "pages_unshared": "unshared",
    "pages_volatile": "volatile", "ksm_zero_pages": "zero", "stable_node_chains": "chains",
    "stable_node_dups": "dups", "general_profit": "profit", "cow_ksm": "cow",
    "ksm_swpin_copy": "swpin",
}


def format_result(result: dict) -> str:
    """A plain-text table of a result document (for output without ``--json``)."""
    cols = ["step"] + [_SHORT[f] for f in SNAPSHOT_FIELDS]
    rows = [[str(s.get("step"))] + [str(s.get(f, "")) for f in SNAPSHOT_FIELDS]
            for s in result.get("snapshots", [])]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()
    out = [f"engine {result.get('engine')}, profile {result.get('profile')}, "
           f"{len(rows)} snapshot(s)", line(cols)]
    out += [line(r) for r in rows]
    procs = [(s.get("step"), p, v) for s in result.get("snapshots", [])
             for p, v in s.get("procs", {}).items()]
    if procs:
        out.append("per process (rmap_items / merging_pages / zero_pages):")
        for step, p, v in procs:
            out.append(f"  step {step} {p}: " + " / ".join(str(v.get(f)) for f in PROC_FIELDS))
    for e in result.get("errors", []):
        out.append("error: " + ", ".join(f"{k} {v}" for k, v in e.items()))
    return "\n".join(out)


def dumps_result(result: dict) -> str:
    """JSON text of a result with one snapshot (and one error) per line, diff-friendly."""
    head = {k: v for k, v in result.items() if k not in ("snapshots", "errors")}
    lines = [json.dumps(head)[:-1] + ","]
    for key in ("snapshots", "errors"):
        items = result.get(key, [])
        body = ",\n  ".join(json.dumps(x) for x in items)
        lines.append(f' "{key}": [' + (f"\n  {body}\n ]" if items else "]") + ",")
    lines[-1] = lines[-1][:-1] + "}"
    return "\n".join(lines) + "\n"
