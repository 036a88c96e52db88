"""Hot-remove scenarios: a host, its processes, a timeline; what happens to merged pages.

A scenario file is a host configuration (``vmhost.config``: ``host:`` and
``ksm:``) plus::

    processes:
      guest1:
        node: 0                          # home node (the CPUs it runs on); default 0
        policy: {mode: bind, nodes: [1]} # optional NUMA policy (local, preferred, bind, interleave)
        oom_score_adj: 0                 # optional, -1000..1000
        regions:
          - name: ram
            size: 64MiB                  # or pages: N
            content: {same: 7}           # fills the region (content specs of the KSM trace format:
                                         # zero, {same: V}, {seq: S}, {unique: K}, {cycle: [..]})
            fill:                        # or/and partial fills, in order
              - {start: 0, count: 16, content: {unique: 3}}
            mergeable: true              # MADV_MERGEABLE (default false)
            thp: false                   # MADV_HUGEPAGE / MADV_NOHUGEPAGE (default false)
            pinned: [{start: 0, count: 4}]   # long-term GUP pins (FOLL_LONGTERM)
    kernel_pages: [{node: 0, pages: 16}] # unmovable kernel allocations (optional)
    timeline:
      - ksm_scans: 2                     # ksmd runs N more full scans (run=1 is written if run is 0)
      - run_for: 500ms                   # the clock runs (ksmd, kswapd) for this long
      - offline: {blocks: [4, 5]}        # or {node: 1} (all its online blocks) or {device: NAME}
                                         # or {pages_of: guest1} (the blocks holding its pages)
                                         # or {empty: true} (one online block holding no page);
                                         # options: signal_after: 1s (the offlining writer gets
                                         # a signal then: EINTR if still retrying; default 10s),
                                         # run_write_after: 200ms (another writer of KSM's run
                                         # arrives then; it waits for the offline to end)
      - ksm: {run: 0}                    # writes to /sys/kernel/mm/ksm (refusals are reported)
      - unplug: NAME                     # hot-remove a DIMM / virtio-mem device (offline + remove)
      - online: {blocks: [4]}
      - add_dimm: {name: d1, node: 1, size: 1GiB, zone: movable, online: true}
      - add_virtio_mem: {name: vm0, node: 1, blocks: 2, online: true}
      - pressure: {pages: 4096, node: 0} # a new process allocates and writes this many pages
      - reclaim: {node: 0, pages: 1024}  # direct reclaim (to swap)
      - write: {proc: guest1, region: ram, start: 0, count: 8, content: {unique: 9}}

Every mistake is one InputError line naming the file, the key path and the reason;
nothing is run or written before the whole file is validated.

The report gives, for each block offlined: the result and reason, pages migrated
(KSM and ordinary), stable nodes pruned, KSM counters before and after, the time
(virtual: the cost model of ``vmhost.mm.migrate`` and ``vmhost.mm.hotplug``), and
for every step the invariant checker's verdict that every page of every process
still reads what it read before (``invariants.check(host, views_before)``).
``--report DIR`` writes it as HTML with plots, JSON, text and CSV tables
(``vmhost.reports.hotremove``). A ``policy:`` section (a KSM tuning policy) drives the knobs
on the clock as in density and fleet studies (the host, KSM, ksmd and policy are built by
``vmhost.system.build_system``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from guests.errors import InputError
from guests.schema import (ABSENT, Section, expect_bool, expect_enum, expect_int, expect_list,
                           expect_new_name, expect_one_step, expect_str, fail,
                           parse_duration_ns, parse_size, read_yaml, rule, sub)
from hw.memory import BlockState, Zone
from hw.units import HPAGE_PAGES, PAGE_SIZE
from vmhost.config import HostConfig, parse_host_config
from vmhost.ksm.trace import content_ids, parse_content
from vmhost.mm import invariants
from vmhost.mm.mempolicy import MODES, MemPolicy
from vmhost.mm.vma import NO_PFN, PTE_PRESENT, PTE_ZERO


@dataclass
class RegionSpec:
    name: str
    pages: int
    fills: list[tuple[int, int, Any]] = field(default_factory=list)
    mergeable: bool = False
    thp: bool = False
    pinned: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ProcSpec:
    name: str
    node: int = 0
    policy: MemPolicy | None = None
    oom_score_adj: int = 0
    regions: list[RegionSpec] = field(default_factory=list)


@dataclass
class Step:
    index: int
    kind: str
    args: Any


@dataclass
class Scenario:
    path: str
    config: HostConfig
    procs: list[ProcSpec]
    kernel_pages: list[tuple[int, int]]
    steps: list[Step]


# ------------------------------------------------------------------------------------------
# validation

class _Body(SimpleNamespace):
    """A mapping being read in a scope (a range of a region, a kernel allocation, a step's
    body): its values as attributes, in its table's order (:meth:`args`), beside the scope
    (:class:`_Scope`), the step's index and kind, and the pages of the region it is in."""

    def __init__(self, scope: "_Scope | None", index: int = 0, kind: str = "", pages: int = 0):
        super().__init__()
        self._scope, self._index, self._kind, self._pages = scope, index, kind, pages

    def args(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _start(value: Any, path: str, key: str, body: _Body) -> None:
    body.start = expect_int(value, path, key, 0, body._pages - 1)


def _count(value: Any, path: str, key: str, body: _Body) -> None:
    """The pages from ``start`` on (default: to the end of the region)."""
    rest = body._pages - body.start
    body.count = expect_int(rest if value is ABSENT else value, path, key, 1, rest)


def _content(value: Any, path: str, key: str, body: _Body) -> None:
    body.content = parse_content(value, body.count, path, key)


RANGE = Section(rule("start", apply=_start, required=True), rule("count", apply=_count, required=True))
FILL = Section(*RANGE.keys, rule("content", apply=_content, required=True))


def _spans(value: Any, path: str, key: str, section: Section, pages: int, what: str) -> list[_Body]:
    """A list of ranges of a region of ``pages`` pages, each read by ``section``."""
    return [section.fill(r, path, f"{key}[{i}]", _Body(None, pages=pages))
            for i, r in enumerate(expect_list(value, path, key, what))]


def _region_size(value: Any, path: str, key: str, spec: RegionSpec) -> None:
    if value is ABSENT:
        return
    size = parse_size(value, path, key, minimum=PAGE_SIZE)
    if size % PAGE_SIZE:
        raise fail(path, key, f"{value!r} is not a whole number of 4 KiB pages")
    spec.pages = size // PAGE_SIZE


def _region_content(value: Any, path: str, key: str, spec: RegionSpec) -> None:
    if value is not ABSENT:
        spec.fills.append((0, spec.pages, parse_content(value, spec.pages, path, key)))


def _region_fills(value: Any, path: str, key: str, spec: RegionSpec) -> None:
    spec.fills.extend((f.start, f.count, f.content)
                      for f in _spans(value or [], path, key, FILL, spec.pages, "{start, count, content}"))


def _region_pinned(value: Any, path: str, key: str, spec: RegionSpec) -> None:
    spec.pinned = [(r.start, r.count) for r in _spans(value, path, key, RANGE, spec.pages, "{start, count}")]


REGION = Section(
    rule("name", expect_str, required=True),
    rule("size", apply=_region_size),
    rule("pages", expect_int, 1),
    rule("content", apply=_region_content),
    rule("fill", apply=_region_fills, default=[]),
    rule("mergeable", expect_bool, default=False),
    rule("thp", expect_bool, default=False),
    rule("pinned", apply=_region_pinned, default=[]),
    one_of=("size", "pages"),
)


@dataclass
class _Proc:
    """A process being read: its spec, and the host's node count its node ids are checked by."""
    nnodes: int
    spec: ProcSpec
    mode: str = ""
    nodes: tuple[int, ...] = ()


def _node_ids(value: Any, path: str, key: str, p: _Proc) -> None:
    for i, n in enumerate(expect_list(value, path, key, "node ids")):
        expect_int(n, path, f"{key}[{i}]", 0, p.nnodes - 1)
    p.nodes = tuple(value)


POLICY = Section(
    rule("mode", expect_enum, MODES, required=True),
    rule("nodes", apply=_node_ids, default=[]),
)


def _proc_node(value: Any, path: str, key: str, p: _Proc) -> None:
    p.spec.node = expect_int(value, path, key, 0, p.nnodes - 1)


def _proc_policy(value: Any, path: str, key: str, p: _Proc) -> None:
    if value is ABSENT:
        return
    POLICY.fill(value, path, key, p)
    try:
        p.spec.policy = MemPolicy(p.mode, p.nodes)
    except ValueError as exc:
        raise fail(path, key, str(exc)) from None


def _proc_oom_score_adj(value: Any, path: str, key: str, p: _Proc) -> None:
    p.spec.oom_score_adj = expect_int(value, path, key, -1000, 1000)


def _proc_regions(value: Any, path: str, key: str, p: _Proc) -> None:
    taken: set[str] = set()
    for i, r in enumerate(expect_list(value, path, key, "regions", nonempty=True)):
        reg = REGION.fill(r, path, f"{key}[{i}]", RegionSpec("", 0))
        expect_new_name(reg.name, path, f"{key}[{i}].name", taken, "regions")
        p.spec.regions.append(reg)


PROC = Section(
    rule("node", apply=_proc_node, default=0),
    rule("policy", apply=_proc_policy),
    rule("oom_score_adj", apply=_proc_oom_score_adj, default=0),
    rule("regions", apply=_proc_regions, required=True),
)


def _blocks_arg(value: Any, path: str, key: str, nblocks: int) -> list[int]:
    if isinstance(value, str) and "-" in value:
        lo, _, hi = value.partition("-")
        if not (lo.strip().isdigit() and hi.strip().isdigit()) or int(lo) > int(hi):
            raise fail(path, key, f"{value!r} is not a block range like 4-7")
        value = list(range(int(lo), int(hi) + 1))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise fail(path, key, "expected a block number, a list of them, or a range like 4-7")
    for i, b in enumerate(value):
        expect_int(b, path, f"{key}[{i}]", 0, nblocks - 1)
    return list(value)


# ------------------------------------------------------------------------------------------
# the scenario's own sections: processes, kernel pages, the timeline

@dataclass
class _Scope:
    """What a scenario's names and numbers are checked against, as far as it is read: the
    host's nodes and memory blocks, the processes' regions (pages by name), the devices added
    by the steps so far (their kind by name); and what is read."""
    nnodes: int
    nblocks: int
    block_bytes: int
    regions_of: dict[str, dict[str, int]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    procs: list[ProcSpec] = field(default_factory=list)
    kernel_pages: list[tuple[int, int]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def _node(value: Any, path: str, key: str, body: _Body) -> None:
    if value is not ABSENT:
        body.node = expect_int(value, path, key, 0, body._scope.nnodes - 1)


KERNEL_PAGES = Section(
    rule("node", apply=_node, required=True),
    rule("pages", expect_int, 1, required=True),
)


# -- timeline steps: one table per step kind whose body is a mapping

def _blocks(value: Any, path: str, key: str, body: _Body) -> None:
    if value is not ABSENT:
        body.blocks = _blocks_arg(value, path, key, body._scope.nblocks)


def _device(value: Any, path: str, key: str, body: _Body) -> None:
    if value is not ABSENT:
        if expect_str(value, path, key) not in body._scope.devices:
            raise fail(path, key, f"no device {value!r} was added before")
        body.device = value


def _pages_of(value: Any, path: str, key: str, body: _Body) -> None:
    if value is not ABSENT:
        if not isinstance(value, str) or value not in body._scope.regions_of:
            raise fail(path, key, f"no process {value!r}")
        body.pages_of = value


def _empty(value: Any, path: str, key: str, body: _Body) -> None:
    if value is not ABSENT:
        if value is not True:
            raise fail(path, key, "expected true")
        body.empty = True


_ONLINE_TARGETS = (rule("blocks", apply=_blocks), rule("node", apply=_node),
                   rule("device", apply=_device))
OFFLINE = Section(               # which blocks, and when its writer is interrupted or queued behind
    *_ONLINE_TARGETS, rule("pages_of", apply=_pages_of), rule("empty", apply=_empty),
    rule("signal_after", parse_duration_ns), rule("run_write_after", parse_duration_ns),
    one_of=("blocks", "node", "device", "pages_of", "empty"),
)
ONLINE = Section(*_ONLINE_TARGETS, one_of=("blocks", "node", "device"))


def _device_name(value: Any, path: str, key: str, body: _Body) -> None:
    if not isinstance(value, str) or not value or value == "boot":
        raise fail(path, key, "expected a device name (not 'boot')")
    kind = body._scope.devices.get(value)     # a virtio-mem device may be added to
    if kind is not None and (body._kind == "add_dimm" or kind != body._kind):
        raise fail(path, key, f"a device named {value!r} exists already")
    body.name = value


def _dimm_size(value: Any, path: str, key: str, body: _Body) -> None:
    block_bytes = body._scope.block_bytes
    size = parse_size(value, path, key, minimum=block_bytes)
    if size % block_bytes:
        raise fail(path, key, f"{value!r} is not a multiple of the block size")
    body.size = size


_DEVICE = (rule("name", apply=_device_name, required=True), rule("node", apply=_node, required=True),
           rule("zone", expect_enum, ("movable", "normal"), default="movable"),
           rule("online", expect_bool, default=True))
ADD_DIMM = Section(*_DEVICE, rule("size", apply=_dimm_size, required=True))
ADD_VIRTIO_MEM = Section(*_DEVICE, rule("blocks", expect_int, 1, 1 << 16, required=True))


def _pressure_size(value: Any, path: str, key: str, body: _Body) -> None:
    if value is not ABSENT:
        body.pages = parse_size(value, path, key, minimum=PAGE_SIZE) // PAGE_SIZE


def _pressure_content(value: Any, path: str, key: str, body: _Body) -> None:
    if value is ABSENT:                       # pages nobody else has, different at every step
        value = {"unique": 1_000_000 + body._index}
    body.content = parse_content(value, body.pages, path, key)


PRESSURE = Section(
    rule("pages", expect_int, 1), rule("size", apply=_pressure_size),
    rule("node", apply=_node, default=0), rule("content", apply=_pressure_content),
    one_of=("pages", "size"),
)
RECLAIM = Section(rule("node", apply=_node, default=0), rule("pages", expect_int, 1, required=True))


def _write_proc(value: Any, path: str, key: str, body: _Body) -> None:
    if expect_str(value, path, key) not in body._scope.regions_of:
        raise fail(path, key, f"no process {value!r}")
    body.proc = value


def _write_region(value: Any, path: str, key: str, body: _Body) -> None:
    regions = body._scope.regions_of[body.proc]
    if expect_str(value, path, key) not in regions:
        raise fail(path, key, f"process {body.proc!r} has no region {value!r}")
    body.region, body._pages = value, regions[value]


WRITE = Section(
    rule("proc", apply=_write_proc, required=True),
    rule("region", apply=_write_region, required=True),
    rule("start", apply=_start, default=0),
    rule("count", apply=_count),
    rule("content", apply=_content, required=True),
)


def _mapping_step(section: Section) -> Callable[[Any, str, str, _Scope, int, str], Any]:
    """The parser of a step whose body is a mapping read by ``section``: its arguments."""
    def parse(body: Any, path: str, key: str, scope: _Scope, index: int, kind: str) -> dict:
        return section.fill(body, path, key, _Body(scope, index, kind)).args()
    return parse


def _scans(body: Any, path: str, key: str, scope: _Scope, index: int, kind: str) -> int:
    return expect_int(body, path, key, 1, 10_000)


def _run_for(body: Any, path: str, key: str, scope: _Scope, index: int, kind: str) -> int:
    return parse_duration_ns(body, path, key)


def _knob_writes(body: Any, path: str, key: str, scope: _Scope, index: int, kind: str) -> list:
    if not isinstance(body, dict) or not body:
        raise fail(path, key, "expected knob writes such as {run: 0}")
    return [(str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in body.items()]


def _unplug(body: Any, path: str, key: str, scope: _Scope, index: int, kind: str) -> str:
    if expect_str(body, path, key, "a device name") not in scope.devices:
        raise fail(path, key, f"no hot-added device {body!r} (add_dimm / add_virtio_mem first)")
    return body


#: The timeline's step kinds, each with the parser of its body (which returns the step's
#: arguments, as ``Runner._step`` reads them).
STEPS: dict[str, Callable[[Any, str, str, _Scope, int, str], Any]] = {
    "ksm_scans": _scans,
    "run_for": _run_for,
    "offline": _mapping_step(OFFLINE),
    "unplug": _unplug,
    "online": _mapping_step(ONLINE),
    "add_dimm": _mapping_step(ADD_DIMM),
    "add_virtio_mem": _mapping_step(ADD_VIRTIO_MEM),
    "pressure": _mapping_step(PRESSURE),
    "reclaim": _mapping_step(RECLAIM),
    "write": _mapping_step(WRITE),
    "ksm": _knob_writes,
}


def _step(value: Any, path: str, key: str, scope: _Scope, index: int) -> Step:
    kind, body = expect_one_step(value, path, key, tuple(STEPS), "{offline: {blocks: [4]}}")
    args = STEPS[kind](body, path, f"{key}.{kind}", scope, index, kind)
    if kind in ("add_dimm", "add_virtio_mem"):         # the device's blocks can be named from now on
        scope.devices[args["name"]] = kind
        scope.nblocks += args["size"] // scope.block_bytes if kind == "add_dimm" else args["blocks"]
    return Step(index, kind, args)


# -- the sections

def _processes(value: Any, path: str, key: str, scope: _Scope) -> None:
    if not isinstance(value or {}, dict):
        raise fail(path, key, "expected a mapping of process names")
    for name, p in (value or {}).items():
        spec = PROC.fill(p, path, sub(key, str(name)), _Proc(scope.nnodes, ProcSpec(str(name)))).spec
        scope.regions_of[spec.name] = {reg.name: reg.pages for reg in spec.regions}
        scope.procs.append(spec)


def _kernel_pages(value: Any, path: str, key: str, scope: _Scope) -> None:
    for i, k in enumerate(expect_list(value or [], path, key, "{node, pages}")):
        body = KERNEL_PAGES.fill(k, path, f"{key}[{i}]", _Body(scope))
        scope.kernel_pages.append((body.node, body.pages))


def _timeline(value: Any, path: str, key: str, scope: _Scope) -> None:
    for i, s in enumerate(expect_list(value or [], path, key, "steps")):
        scope.steps.append(_step(s, path, f"{key}[{i}]", scope, i))


SCENARIO = Section(              # beside the host config's sections (vmhost.config)
    rule("processes", apply=_processes, default=None),
    rule("kernel_pages", apply=_kernel_pages, default=None),
    rule("timeline", apply=_timeline, default=None),
)


def parse_scenario(doc: Any, path: str) -> Scenario:
    cfg = parse_host_config(doc, path, extra_keys=SCENARIO.names)
    block_bytes = cfg.block_pages * PAGE_SIZE
    scope = _Scope(cfg.topology.node_count,
                   sum(n.mem_bytes // block_bytes for n in cfg.topology.nodes), block_bytes)
    SCENARIO.read(doc, path, "", scope)
    return Scenario(path, cfg, scope.procs, scope.kernel_pages, scope.steps)


def load_scenario(path: str | Path) -> Scenario:
    return parse_scenario(read_yaml(path), str(path))


# ------------------------------------------------------------------------------------------
# running

class Runner:
    REGION_BASE = 0x7E0000000            # 2 MiB aligned virtual page number

    def __init__(self, scn: Scenario):
        from vmhost.system import build_system
        self.scn = scn
        sysm = build_system(scn.config)          # host, KSM, ksmd and the policy: as density's
        self.host, self.ksm, self.ksmd, self.policy = sysm.host, sysm.ksm, sysm.ksmd, sysm.policy
        self.procs = {}
        self.addrs: dict[str, dict[str, int]] = {}
        self.steps: list[dict] = []
        self.problems: list[str] = []
        self._pressure = 0

    def setup(self) -> None:
        host = self.host
        for spec in self.scn.procs:
            proc = host.spawn(spec.name, spec.node)
            proc.oom_score_adj = spec.oom_score_adj
            if spec.policy is not None:
                proc.mm.policy = spec.policy
            at, addrs = self.REGION_BASE, {}
            for reg in spec.regions:
                at = -(-at // HPAGE_PAGES) * HPAGE_PAGES
                proc.mm.mmap(reg.pages, thp=reg.thp, at=at)
                addrs[reg.name] = at
                for start, count, content in reg.fills:
                    proc.mm.write(at + start, content_ids(content, count))
                if reg.mergeable:
                    proc.mm.madvise(at, reg.pages, "mergeable")
                at += reg.pages + HPAGE_PAGES           # a gap keeps regions in separate VMAs
            self.procs[spec.name] = proc
            self.addrs[spec.name] = addrs
        for spec in self.scn.procs:
            proc = self.procs[spec.name]
            for reg in spec.regions:
                for start, count in reg.pinned:
                    host.hotplug.pin_user_pages(proc.mm, self.addrs[spec.name][reg.name] + start, count)
        for node, pages in self.scn.kernel_pages:
            host.hotplug.alloc_kernel_pages(node, pages)
        invariants.check(host)

    def run(self) -> dict:
        self.setup()
        for step in self.scn.steps:
            self.steps.append(self._step(step))
        host = self.host
        return {
            "scenario": self.scn.path, "profile": host.profile.name,
            "host": {"nodes": host.topology.node_count, "block_pages": host.phys.block_pages,
                     "blocks": len(host.phys.blocks),
                     "online_blocks": len(host.phys.online_blocks())},
            "steps": self.steps,
            "ksm": self.ksm.stats(),
            "vmstat": {k: v for k, v in sorted(host.vmstat.items())},
            "oom_kills": [k.__dict__ for k in host.oom.kills],
            "swap": host.swap.stats(),
            "content_unchanged": not self.problems,
            "problems": self.problems[:50],
            **({"policy": self._policy_summary()} if self.scn.config.policy else {}),
        }

    def _policy_summary(self) -> dict:
        name, options = self.scn.config.policy
        return {"name": name, "options": options, "wakeups": len(self.policy.history),
                "changes": [{"t_s": round(d.at_ns / 1e9, 3), "run": d.run, "pages_to_scan": d.pages_to_scan,
                             "sleep_millisecs": d.sleep_millisecs, "reason": d.reason}
                            for d in self.policy.history[:200]]}

    def _check(self, before, label: str) -> dict:
        try:
            invariants.check(self.host, before)
            return {"ok": True}
        except invariants.InvariantViolation as exc:
            self.problems.extend(f"{label}: {p}" for p in exc.problems)
            return {"ok": False, "problems": exc.problems[:20]}

    def _step(self, step: Step) -> dict:
        host, args = self.host, step.args
        out: dict[str, Any] = {"step": step.index, "kind": step.kind}
        before = invariants.views(host) if step.kind != "write" else None
        t0 = host.clock.now
        if step.kind == "ksm_scans":
            if self.ksm.knobs.run == 0:
                self.ksm.write_knob("run", "1")
            out["scans_done"] = self.ksmd.run_full_scans(args)
        elif step.kind == "ksm":
            out["writes"] = [{"knob": k, "value": v, "rc": _errname(self.ksm.write_knob(k, v))}
                             for k, v in args]
        elif step.kind == "run_for":
            host.clock.run_until(host.clock.now + args)
        elif step.kind == "offline":
            out["blocks"] = [r.to_dict() for r in self._offline(args)]
        elif step.kind == "online":
            out["blocks"] = [{"block": b, "rc": _errname(host.hotplug.online_block(b))}
                             for b in self._resolve_blocks(args, online=False)]
        elif step.kind == "unplug":
            rc, results = host.hotplug.unplug(args)
            out["device"] = args
            out["rc"] = _errname(rc)
            out["blocks"] = [r.to_dict() for r in results]
        elif step.kind == "add_dimm":
            zone = Zone.MOVABLE if args["zone"] == "movable" else Zone.NORMAL
            blocks = host.hotplug.add_dimm(args["name"], args["node"], args["size"], zone, args["online"])
            out["blocks_added"] = [b.index for b in blocks]
        elif step.kind == "add_virtio_mem":
            zone = Zone.MOVABLE if args["zone"] == "movable" else Zone.NORMAL
            blocks = host.hotplug.add_virtio_mem(args["name"], args["node"], args["blocks"], zone, args["online"])
            out["blocks_added"] = [b.index for b in blocks]
        elif step.kind == "pressure":
            out.update(self._pressure_step(args))
        elif step.kind == "reclaim":
            out["freed"] = host.reclaim.shrink_node(args["node"], args["pages"])
        elif step.kind == "write":
            proc = self.procs[args["proc"]]
            if proc.alive:
                proc.mm.write(self.addrs[args["proc"]][args["region"]] + args["start"],
                              content_ids(args["content"], args["count"]))
            else:
                out["skipped"] = "process is dead"
        out["ksm"] = self.ksm.stats()
        out["time_ms"] = round((host.clock.now - t0) / 1e6, 3)
        out["check"] = self._check(before, f"step {step.index} ({step.kind})")
        return out

    def _resolve_blocks(self, args: dict, online: bool) -> list[int]:
        phys = self.host.phys
        want = BlockState.ONLINE if online else BlockState.OFFLINE
        if "blocks" in args:
            return list(args["blocks"])
        if "pages_of" in args:
            return self._blocks_holding(args["pages_of"])
        if "empty" in args:
            frames = self.host.frames
            empty = [b.index for b in phys.blocks if b.index and b.state is want and b.hole_pages == 0
                     and not frames.refcount[b.first_pfn: b.first_pfn + b.pages].any()]
            return empty[-1:]
        if "node" in args:
            return [b.index for b in phys.blocks if b.node == args["node"] and b.state is want]
        return [b.index for b in phys.blocks_of_device(args["device"]) if b.state is want]

    def _blocks_holding(self, name: str) -> list[int]:
        """The online blocks holding a frame mapped by process ``name``."""
        proc = self.procs[name]
        pfns = [vma.pte[(vma.ptef & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT] for vma in proc.mm.vmas] if proc.alive else []
        pfns = np.concatenate(pfns) if pfns else np.zeros(0, dtype=np.int64)
        pfns = pfns[pfns != NO_PFN]
        blocks = sorted(set((pfns // self.host.phys.block_pages).tolist()))
        return [b for b in blocks if self.host.phys.blocks[b].state is BlockState.ONLINE]

    def _offline(self, args: dict):
        results = []
        opts = {k: args[k] for k in ("signal_after", "run_write_after") if k in args}
        for b in self._resolve_blocks(args, online=True):
            if b >= len(self.host.phys.blocks):
                raise InputError(f"{self.scn.path}: offline: there is no block {b}")
            results.append(self.host.hotplug.offline_block(b, **{f"{k}_ns": v for k, v in opts.items()}))
        return results

    def _pressure_step(self, args: dict) -> dict:
        from vmhost.mm.oom import OomKilled
        host = self.host
        self._pressure += 1
        hog = host.spawn(f"pressure-{self._pressure}", args["node"])
        vma = hog.mm.mmap(args["pages"], thp=False)
        kills_before = len(host.oom.kills)
        try:
            hog.mm.write(vma.start, content_ids(args["content"], args["pages"]))
            outcome = "allocated"
        except OomKilled:
            outcome = "oom-killed"
        except Exception as exc:                    # OutOfMemory with nobody left to kill
            outcome = f"failed: {exc}"
        return {"pressure_pid": hog.pid, "outcome": outcome,
                "oom_kills": [k.__dict__ for k in host.oom.kills[kills_before:]]}


def _errname(rc: int) -> str:
    return "ok" if rc == 0 else errno.errorcode.get(-rc, str(rc))


# ------------------------------------------------------------------------------------------
# output

_KSM_KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


def _ksm_line(stats: dict | None) -> str:
    if not stats:
        return "-"
    return " ".join(f"{k.removeprefix('pages_')}={stats[k]}" for k in _KSM_KEYS)


def format_result(res: dict) -> str:
    h = res["host"]
    lines = [f"scenario {res['scenario']} ({res['profile']}): {h['nodes']} node(s), {h['blocks']} blocks "
             f"of {h['block_pages'] * 4 // 1024} MiB, {h['online_blocks']} online at the end"]
    for s in res["steps"]:
        head = f"step {s['step']} {s['kind']}"
        if s["kind"] == "ksm_scans":
            head += f": {s['scans_done']} full scan(s), KSM {_ksm_line(s['ksm'])}"
        elif s["kind"] == "pressure":
            head += f": pid {s['pressure_pid']} {s['outcome']}"
            for k in s["oom_kills"]:
                head += f"; OOM killed pid {k['pid']} ({k['name']}, {k['points']} points, {k['freed_pages']} pages freed)"
        elif s["kind"] == "unplug":
            head += f" {s['device']}: {s['rc']}"
        elif s["kind"] == "reclaim":
            head += f": {s['freed']} pages freed"
        elif s["kind"] in ("add_dimm", "add_virtio_mem"):
            head += f": blocks {s['blocks_added']}"
        elif s["kind"] == "online":
            head += ": " + ", ".join(f"{b['block']} {b['rc']}" for b in s["blocks"])
        head += f" [{s['time_ms']} ms]"
        if not s["check"]["ok"]:
            head += "  CONTENT CHECK FAILED"
        lines.append(head)
        if s.get("blocks") and s["kind"] in ("offline", "unplug"):
            lines.append(f"  {'block':>5} {'result':<6} {'reason':<26} {'migrated':>9} {'ksm':>7} "
                         f"{'ordinary':>9} {'pruned':>6} {'time_ms':>9}")
            for b in s["blocks"]:
                result = "ok" if b["ok"] else b["errno"]
                lines.append(f"  {','.join(map(str, b['blocks'])):>5} {result:<6} {(b['reason'] or '-'):<26} "
                             f"{b['pages_migrated']:>9} {b['ksm_pages_migrated']:>7} "
                             f"{b['ordinary_pages_migrated']:>9} {b['stable_nodes_pruned']:>6} {b['time_ms']:>9}")
            first, last = s["blocks"][0], s["blocks"][-1]
            lines.append(f"  KSM before: {_ksm_line(first['ksm_before'])}")
            lines.append(f"  KSM after:  {_ksm_line(last['ksm_after'])}")
    verdict = ("every page of every process reads what it read before each step"
               if res["content_unchanged"] else f"{len(res['problems'])} problem(s): {res['problems'][:3]}")
    lines.append(f"content check: {verdict}")
    pol = res.get("policy")
    if pol:
        lines.append(f"KSM policy {pol['name']}: {pol['wakeups']} wake-ups, {len(pol['changes'])} decisions")
    return "\n".join(lines)


def write_report(res: dict, directory: str | Path) -> None:
    """The report directory (HTML, JSON, text, CSV), atomically: see vmhost.reports.hotremove."""
    from vmhost.reports.hotremove import write_hotremove_report
    write_hotremove_report(res, directory, format_result(res))

