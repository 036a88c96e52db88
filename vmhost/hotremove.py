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
from typing import Any

import numpy as np

from guests.errors import InputError
from guests.schema import (ABSENT, Section, expect_bool, expect_enum, expect_int, expect_list,
                           expect_mapping, expect_new_name, expect_one_step, expect_str, fail,
                           parse_duration_ns, parse_size, read_yaml, rule)
from hw.memory import BlockState, Zone
from hw.units import HPAGE_PAGES, PAGE_SIZE
from vmhost.config import HostConfig, parse_host_config
from vmhost.ksm.trace import content_ids, parse_content
from vmhost.mm import invariants
from vmhost.mm.mempolicy import MODES, MemPolicy
from vmhost.mm.vma import NO_PFN, PTE_PRESENT, PTE_ZERO

STEP_KINDS = ("ksm_scans", "run_for", "offline", "unplug", "online", "add_dimm", "add_virtio_mem",
              "pressure", "reclaim", "write", "ksm")
OFFLINE_TARGETS = ("blocks", "node", "device", "pages_of", "empty")


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

def _range_list(value: Any, pages: int, path: str, key: str) -> list[tuple[int, int]]:
    if not isinstance(value, list):
        raise fail(path, key, "expected a list of {start, count}")
    out = []
    for i, r in enumerate(value):
        k = f"{key}[{i}]"
        expect_mapping(r, path, k, ("start", "count"), ("start", "count"))
        start = expect_int(r["start"], path, f"{k}.start", 0, pages - 1)
        count = expect_int(r["count"], path, f"{k}.count", 1, pages - start)
        out.append((start, count))
    return out


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
    for i, f in enumerate(value or []):
        k = f"{key}[{i}]"
        expect_mapping(f, path, k, ("start", "count", "content"), ("start", "count", "content"))
        start = expect_int(f["start"], path, f"{k}.start", 0, spec.pages - 1)
        count = expect_int(f["count"], path, f"{k}.count", 1, spec.pages - start)
        spec.fills.append((start, count, parse_content(f["content"], count, path, f"{k}.content")))


def _region_pinned(value: Any, path: str, key: str, spec: RegionSpec) -> None:
    spec.pinned = _range_list(value, spec.pages, path, key)


REGION = Section(               # a region has a size or a number of pages
    rule("name", expect_str, required=True),
    rule("size", apply=_region_size),
    rule("pages", expect_int, 1),
    rule("content", apply=_region_content),
    rule("fill", apply=_region_fills, default=[]),
    rule("mergeable", expect_bool, default=False),
    rule("thp", expect_bool, default=False),
    rule("pinned", apply=_region_pinned, default=[]),
)


def _region(r: Any, path: str, key: str) -> RegionSpec:
    REGION.check(r, path, key)
    expect_str(r["name"], path, f"{key}.name")          # a bad name is reported first
    if ("size" in r) == ("pages" in r):
        raise fail(path, key, "give exactly one of size and pages")
    return REGION.fill(r, path, key, RegionSpec("", 0))


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
        reg = _region(r, path, f"{key}[{i}]")
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


def parse_scenario(doc: Any, path: str) -> Scenario:
    cfg = parse_host_config(doc, path, extra_keys=("processes", "kernel_pages", "timeline"))
    nnodes = cfg.topology.node_count
    block_bytes = cfg.block_pages * PAGE_SIZE
    nblocks = sum(n.mem_bytes // block_bytes for n in cfg.topology.nodes)
    procs_doc = doc.get("processes", {}) or {}
    if not isinstance(procs_doc, dict):
        raise fail(path, "processes", "expected a mapping of process names")
    procs: list[ProcSpec] = []
    regions_of: dict[str, dict[str, int]] = {}
    for name, p in procs_doc.items():
        spec = PROC.fill(p, path, f"processes.{name}", _Proc(nnodes, ProcSpec(str(name)))).spec
        regions_of[spec.name] = {reg.name: reg.pages for reg in spec.regions}
        procs.append(spec)
    kernel_pages = []
    kp = doc.get("kernel_pages", []) or []
    if not isinstance(kp, list):
        raise fail(path, "kernel_pages", "expected a list of {node, pages}")
    for i, k in enumerate(kp):
        key = f"kernel_pages[{i}]"
        expect_mapping(k, path, key, ("node", "pages"), ("node", "pages"))
        kernel_pages.append((expect_int(k["node"], path, f"{key}.node", 0, nnodes - 1),
                             expect_int(k["pages"], path, f"{key}.pages", 1)))
    timeline = doc.get("timeline", []) or []
    if not isinstance(timeline, list):
        raise fail(path, "timeline", "expected a list of steps")
    steps: list[Step] = []
    devices: dict[str, str] = {}
    for i, s in enumerate(timeline):
        kind, body = expect_one_step(s, path, f"timeline[{i}]", STEP_KINDS, "{offline: {blocks: [4]}}")
        key = f"timeline[{i}].{kind}"
        if kind == "ksm_scans":
            args = expect_int(body, path, key, 1, 10_000)
        elif kind == "run_for":
            args = parse_duration_ns(body, path, key)
        elif kind == "ksm":
            if not isinstance(body, dict) or not body:
                raise fail(path, key, "expected knob writes such as {run: 0}")
            args = [(str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in body.items()]
        elif kind in ("offline", "online"):
            targets = OFFLINE_TARGETS if kind == "offline" else ("blocks", "node", "device")
            options = ("signal_after", "run_write_after") if kind == "offline" else ()
            expect_mapping(body, path, key, targets + options)
            if sum(t in body for t in targets) != 1:
                raise fail(path, key, f"give one of {', '.join(targets)}")
            opts = {o: parse_duration_ns(body[o], path, f"{key}.{o}") for o in options if o in body}
            if "pages_of" in body:
                if not isinstance(body["pages_of"], str) or body["pages_of"] not in regions_of:
                    raise fail(path, f"{key}.pages_of", f"no process {body['pages_of']!r}")
                args = {"pages_of": body["pages_of"]}
            elif "empty" in body:
                if body["empty"] is not True:
                    raise fail(path, f"{key}.empty", "expected true")
                args = {"empty": True}
            elif "blocks" in body:
                args = {"blocks": _blocks_arg(body["blocks"], path, f"{key}.blocks", nblocks)}
            elif "node" in body:
                args = {"node": expect_int(body["node"], path, f"{key}.node", 0, nnodes - 1)}
            else:
                if expect_str(body["device"], path, f"{key}.device") not in devices:
                    raise fail(path, f"{key}.device", f"no device {body['device']!r} was added before")
                args = {"device": body["device"]}
            args.update(opts)
        elif kind == "unplug":
            if expect_str(body, path, key, "a device name") not in devices:
                raise fail(path, key, f"no hot-added device {body!r} (add_dimm / add_virtio_mem first)")
            args = body
        elif kind in ("add_dimm", "add_virtio_mem"):
            req = ("name", "node", "size") if kind == "add_dimm" else ("name", "node", "blocks")
            expect_mapping(body, path, key, req + ("zone", "online"), req)
            if not isinstance(body["name"], str) or not body["name"] or body["name"] == "boot":
                raise fail(path, f"{key}.name", "expected a device name (not 'boot')")
            if body["name"] in devices and (kind == "add_dimm" or devices[body["name"]] != kind):
                raise fail(path, f"{key}.name", f"a device named {body['name']!r} exists already")
            args = {"name": body["name"], "node": expect_int(body["node"], path, f"{key}.node", 0, nnodes - 1),
                    "zone": body.get("zone", "movable"), "online": expect_bool(body.get("online", True), path, f"{key}.online")}
            if args["zone"] not in ("movable", "normal"):
                raise fail(path, f"{key}.zone", f"{args['zone']!r} is not movable or normal")
            if kind == "add_dimm":
                size = parse_size(body["size"], path, f"{key}.size", minimum=block_bytes)
                if size % block_bytes:
                    raise fail(path, f"{key}.size", f"{body['size']!r} is not a multiple of the block size")
                args["size"] = size
                nblocks += size // block_bytes
            else:
                args["blocks"] = expect_int(body["blocks"], path, f"{key}.blocks", 1, 1 << 16)
                nblocks += args["blocks"]
            devices[body["name"]] = kind
        elif kind == "pressure":
            expect_mapping(body, path, key, ("pages", "size", "node", "content"))
            if ("pages" in body) == ("size" in body):
                raise fail(path, key, "give exactly one of pages and size")
            pages = (expect_int(body["pages"], path, f"{key}.pages", 1) if "pages" in body
                     else parse_size(body["size"], path, f"{key}.size", minimum=PAGE_SIZE) // PAGE_SIZE)
            args = {"pages": pages, "node": expect_int(body.get("node", 0), path, f"{key}.node", 0, nnodes - 1),
                    "content": parse_content(body.get("content", {"unique": 1_000_000 + i}), pages, path,
                                        f"{key}.content")}
        elif kind == "reclaim":
            expect_mapping(body, path, key, ("node", "pages"), ("pages",))
            args = {"node": expect_int(body.get("node", 0), path, f"{key}.node", 0, nnodes - 1),
                    "pages": expect_int(body["pages"], path, f"{key}.pages", 1)}
        else:  # write
            expect_mapping(body, path, key, ("proc", "region", "start", "count", "content"),
                           ("proc", "region", "content"))
            if expect_str(body["proc"], path, f"{key}.proc") not in regions_of:
                raise fail(path, f"{key}.proc", f"no process {body['proc']!r}")
            if expect_str(body["region"], path, f"{key}.region") not in regions_of[body["proc"]]:
                raise fail(path, f"{key}.region", f"process {body['proc']!r} has no region {body['region']!r}")
            pages = regions_of[body["proc"]][body["region"]]
            start = expect_int(body.get("start", 0), path, f"{key}.start", 0, pages - 1)
            count = expect_int(body.get("count", pages - start), path, f"{key}.count", 1, pages - start)
            args = {"proc": body["proc"], "region": body["region"], "start": start, "count": count,
                    "content": parse_content(body["content"], count, path, f"{key}.content")}
        steps.append(Step(i, kind, args))
    return Scenario(path, cfg, procs, kernel_pages, steps)


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

