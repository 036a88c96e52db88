"""The host configuration file, shared by every command that builds a host.

A YAML document with a ``host:`` section and an optional ``ksm:`` section::

    host:
      profile: linux-6.18          # or linux-2.6.33
      thp: madvise                 # always | madvise | never
      block_size: 128MiB           # memory block (and section) size
      nodes:                       # NUMA nodes, in id order
        - {memory: 4GiB, cpus: 2}          # cpus: a count, or a list of cpu ids
        - {memory: 4GiB, cpus: [2, 3]}
      distance: [[10, 20], [20, 10]]       # optional SLIT matrix
      movable_nodes: [1]           # nodes whose boot memory is ZONE_MOVABLE
      swap:                        # optional swap devices
        - {name: sda, size: 1GiB, priority: 10, read_mbps: 500, write_mbps: 400}
    ksm:                           # sysfs knob writes, in this order, checked by the engine
      pages_to_scan: 1000
      run: 1

Sizes are integers (bytes) or strings with a unit: B, KiB, MiB, GiB, TiB (K, M, G,
T are read as the same binary units). Every mistake -- a missing or unknown key, a
bad size, a knob the engine refuses -- raises :class:`InputError` naming the file,
the key path (``host.nodes[1].memory``) and the reason, on one line.

``load_config(path)`` reads and validates; ``HostConfig.build()`` makes the Host;
``HostConfig.apply_ksm(ksm)`` writes the knobs to an engine. ``parse_host_config``
does the same for a mapping already read (a scenario embeds the same sections).
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guests.errors import InputError
from guests.schema import (ABSENT, Section, expect_enum, expect_int, expect_list, expect_mapping,
                           expect_new_name, expect_number, fail, parse_size, read_yaml, rule)
from hw.swap import SwapDevice
from hw.topology import NumaNode, Topology
from vmhost.mm.swap import MAX_SWAPFILES, SWP_MAX_PAGES
from vmhost.profile import PROFILES
from hw.units import PAGE_SIZE

THP_MODES = ("always", "madvise", "never")


@dataclass
class HostConfig:
    path: str
    profile: str = "linux-6.18"
    thp: str = "madvise"
    block_pages: int = 32768
    topology: Topology | None = None
    movable_nodes: tuple[int, ...] = ()
    swap: list[dict] = field(default_factory=list)
    ksm: list[tuple[str, str]] = field(default_factory=list)
    guests: list = field(default_factory=list)      # GuestSpec, from a `guests:` list
    policy: tuple[str, dict] | None = None          # KSM tuning policy (vmhost.policies): name, options

    def make_policy(self, resolution: int = 1):
        """The configured tuning policy (fixed knobs when none is configured), not attached."""
        from vmhost.policies import make_policy
        name, options = self.policy or ("fixed", {})
        policy = make_policy(name, **options)
        policy.resolution = resolution
        return policy

    def build(self):
        """A Host as configured (KSM engine not attached: see ``apply_ksm``)."""
        from vmhost.host import Host
        devices = [SwapDevice(s["name"], s["pages"], s["priority"], s["read_bps"], s["write_bps"])
                   for s in self.swap]
        return Host(self.topology, block_pages=self.block_pages, profile=self.profile, swap=devices,
                    movable_nodes=self.movable_nodes, thp=self.thp)

    def apply_ksm(self, ksm) -> None:
        for name, value in self.ksm:
            rc = ksm.write_knob(name, value)
            if rc:
                raise fail(self.path, f"ksm.{name}", f"the write is refused ({errno.errorcode[-rc]})")


def _knob_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# ------------------------------------------------------------------------------------------
# the host section: one rule per key (guests.schema.Section), in the order they are read

@dataclass
class _Node:
    """A ``host.nodes[i]`` entry being read (``taken``: the cpu ids of every node so far)."""
    id: int
    block_bytes: int
    taken: set
    memory: int = 0
    cpus: tuple[int, ...] = ()


def _node_memory(value: Any, path: str, key: str, node: _Node) -> None:
    node.memory = parse_size(value, path, key, minimum=node.block_bytes)
    if node.memory % node.block_bytes:
        raise fail(path, key, f"{value!r} is not a multiple of the block size "
                              f"({node.block_bytes >> 20} MiB)")


def _node_cpus(value: Any, path: str, key: str, node: _Node) -> None:
    """A list of cpu ids, or a count of the lowest ids no node has yet."""
    if isinstance(value, list):
        for j, c in enumerate(value):
            expect_int(c, path, f"{key}[{j}]", 0)
            if c in node.taken:
                raise fail(path, f"{key}[{j}]", f"cpu {c} belongs to two nodes")
            node.taken.add(c)
        node.cpus = tuple(value)
        return
    count = expect_int(value, path, key, 0, 4096)
    ids, cpu = [], 0
    while len(ids) < count:
        if cpu not in node.taken:
            ids.append(cpu)
            node.taken.add(cpu)
        cpu += 1
    node.cpus = tuple(ids)


NODE = Section(
    rule("memory", apply=_node_memory, required=True),
    rule("cpus", apply=_node_cpus, default=1),
)


@dataclass
class _Swap:
    """A ``host.swap[i]`` entry being read (``taken``: the names of the devices before it)."""
    index: int
    taken: set
    name: str = ""
    pages: int = 0
    priority: int = 0
    read_bps: float = 0.0
    write_bps: float = 0.0

    def spec(self) -> dict:
        return {"name": self.name, "pages": self.pages, "priority": self.priority,
                "read_bps": self.read_bps, "write_bps": self.write_bps}


def _swap_name(value: Any, path: str, key: str, dev: _Swap) -> None:
    dev.name = expect_new_name(value, path, key, dev.taken, "swap devices")


def _swap_priority(value: Any, path: str, key: str, dev: _Swap) -> None:
    dev.priority = expect_int(-2 - dev.index if value is ABSENT else value, path, key, -32768, 32767)


def _swap_pages(value: Any, path: str, key: str) -> int:
    pages = parse_size(value, path, key, minimum=PAGE_SIZE) // PAGE_SIZE
    if pages > SWP_MAX_PAGES:
        raise fail(path, key, f"a swap device has at most {SWP_MAX_PAGES} pages "
                              f"({SWP_MAX_PAGES * PAGE_SIZE >> 30} GiB) here")
    return pages


def _bytes_per_s(value: Any, path: str, key: str) -> float:
    """A rate in MB/s (> 0), in bytes per second."""
    return expect_number(value, path, key, 0.0, lo_open=True) * 1e6


SWAP = Section(
    rule("name", apply=_swap_name, required=True),
    rule("size", _swap_pages, attr="pages", required=True),
    rule("priority", apply=_swap_priority),
    rule("read_mbps", _bytes_per_s, default=500, attr="read_bps"),
    rule("write_mbps", _bytes_per_s, default=400, attr="write_bps"),
)


def _topology(nodes: list[NumaNode], distance: list, path: str) -> Topology:
    try:
        return Topology(nodes, [list(r) for r in distance])
    except ValueError as exc:
        raise fail(path, "host", str(exc)) from None


def _block_size(value: Any, path: str, key: str, cfg: HostConfig) -> None:
    block_bytes = 128 << 20
    if value is not ABSENT:
        block_bytes = parse_size(value, path, key, minimum=PAGE_SIZE)
        pages = block_bytes // PAGE_SIZE
        if block_bytes % PAGE_SIZE or pages & (pages - 1):
            raise fail(path, key, f"{value!r} is not a power-of-two number of pages")
    cfg.block_pages = block_bytes // PAGE_SIZE


def _nodes(value: Any, path: str, key: str, cfg: HostConfig) -> None:
    nodes = expect_list(value, path, key, "nodes", nonempty=True)
    block_bytes, taken = cfg.block_pages * PAGE_SIZE, set()
    built = [NODE.fill(n, path, f"{key}[{i}]", _Node(i, block_bytes, taken)) for i, n in enumerate(nodes)]
    cfg.topology = _topology([NumaNode(n.id, n.memory, n.cpus) for n in built], [], path)


def _distance(value: Any, path: str, key: str, cfg: HostConfig) -> None:
    """An optional SLIT matrix over the nodes (10 on the diagonal)."""
    if isinstance(value, (list, dict)) and not value:
        return
    count = len(cfg.topology.nodes)
    if (not isinstance(value, list) or len(value) != count
            or any(not isinstance(r, list) or len(r) != count for r in value)):
        raise fail(path, key, f"expected a {count}x{count} matrix")
    for i, row in enumerate(value):
        for j, d in enumerate(row):
            expect_int(d, path, f"{key}[{i}][{j}]", 10, 254)
            if (i == j) != (d == 10):
                raise fail(path, f"{key}[{i}][{j}]", "must be 10 on the diagonal and above 10 elsewhere")
    cfg.topology = _topology(cfg.topology.nodes, value, path)


def _movable_nodes(value: Any, path: str, key: str, cfg: HostConfig) -> None:
    movable = expect_list(value, path, key, "node ids")
    for j, nid in enumerate(movable):
        expect_int(nid, path, f"{key}[{j}]", 0, len(cfg.topology.nodes) - 1)
    cfg.movable_nodes = tuple(movable)


def _swap(value: Any, path: str, key: str, cfg: HostConfig) -> None:
    devices, taken = expect_list(value, path, key, "swap devices"), set()
    if len(devices) > MAX_SWAPFILES:
        raise fail(path, key, f"at most {MAX_SWAPFILES} swap devices, got {len(devices)}")
    cfg.swap = [SWAP.fill(s, path, f"{key}[{i}]", _Swap(i, taken)).spec() for i, s in enumerate(devices)]


HOST = Section(
    rule("profile", expect_enum, sorted(PROFILES), "profile"),
    rule("thp", expect_enum, THP_MODES),
    rule("block_size", apply=_block_size),
    rule("nodes", apply=_nodes, required=True),
    rule("distance", apply=_distance, default=[]),
    rule("movable_nodes", apply=_movable_nodes, default=[]),
    rule("swap", apply=_swap, default=[]),
)


def parse_host_config(doc: Any, path: str, extra_keys: tuple[str, ...] = ()) -> HostConfig:
    """Validate a document with ``host:``, ``ksm:`` and ``policy:`` (plus ``extra_keys`` left to
    the caller)."""
    expect_mapping(doc, path, "", ("host", "ksm", "policy") + extra_keys, ("host",))
    cfg = HOST.fill(doc["host"], path, "host", HostConfig(path))
    knobs = doc.get("ksm", {}) or {}
    expect_mapping(knobs, path, "ksm", tuple(knobs) if isinstance(knobs, dict) else ())
    cfg.ksm = [(str(k), _knob_text(v)) for k, v in knobs.items()]
    _check_knobs(cfg)
    if doc.get("policy") is not None:
        cfg.policy = parse_policy(doc["policy"], path)
        _check_knobs(cfg, list(cfg.policy[1].get("knobs", {}).items()), "policy.knobs")
    return cfg


MIN_POLICY_INTERVAL_S = 0.1


def parse_policy(doc: Any, path: str) -> tuple[str, dict]:
    """``policy: {name: ksmtuned, interval_s: 60, ...}``: a policy of vmhost.policies and its
    options (the policy's own fields, each of the type of its default)."""
    from vmhost.policies import POLICIES, options_of
    if isinstance(doc, str):
        doc = {"name": doc}
    if not isinstance(doc, dict) or "name" not in doc:
        raise fail(path, "policy", "expected a policy name or a mapping with a name")
    name = expect_enum(doc["name"], path, "policy.name", POLICIES, "KSM policy")
    cls = POLICIES[name]
    fields = options_of(cls)
    options = {}
    for key, value in doc.items():
        if key == "name":
            continue
        if key not in fields:
            raise fail(path, f"policy.{key}", f"not an option of policy {name!r} "
                                              f"(known: {', '.join(sorted(fields))})")
        if key == "knobs":
            expect_mapping(value, path, "policy.knobs", tuple(value) if isinstance(value, dict) else ())
            options[key] = {str(k): _knob_text(v) for k, v in value.items()}
            continue
        default = fields[key].default
        kind = float if isinstance(default, float) else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                or not math.isfinite(value) or (kind is int and value != int(value)):
            raise fail(path, f"policy.{key}", f"expected a non-negative {'number' if kind is float else 'whole number'}, got {value!r}")
        if key == "interval_s" and value < MIN_POLICY_INTERVAL_S:
            raise fail(path, f"policy.{key}", f"{value!r} is too short (at least "
                                              f"{MIN_POLICY_INTERVAL_S:g} s between wake-ups)")
        options[key] = kind(value)
    return name, options


def _check_knobs(cfg: HostConfig, pairs: list[tuple[str, str]] | None = None,
                 prefix: str = "ksm") -> None:
    """Write the knobs to a scratch engine of the same profile: each must be accepted."""
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    pairs = cfg.ksm if pairs is None else pairs
    if not pairs:
        return
    scratch = Host(Topology.uniform(1, 4 << 20), block_pages=1024, profile=cfg.profile)
    ksm = Ksm(scratch)
    for name, value in pairs:
        rc = ksm.write_knob(name, value)
        if rc == -errno.ENOENT:
            raise fail(cfg.path, f"{prefix}.{name}", f"no such KSM knob in profile {cfg.profile}")
        if rc:
            raise fail(cfg.path, f"{prefix}.{name}", f"{value!r} is refused ({errno.errorcode[-rc]})")


def load_config(path: str | Path) -> HostConfig:
    """Read and validate a host configuration file (host, ksm and optionally guests)."""
    doc = read_yaml(path)
    cfg = parse_host_config(doc, str(path), extra_keys=("guests",))
    if isinstance(doc, dict) and "guests" in doc:
        cfg.guests = parse_guests(doc["guests"], str(path))
    return cfg


def parse_guests(entries: Any, path: str) -> list:
    """A ``guests:`` list (GuestSpec fields, as `vmhost import libvirt` writes them)."""
    from guests.libvirt_import import guest_from_dict
    if not isinstance(entries, list):
        raise fail(path, "guests", "must be a list of guests")
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(guest_from_dict(entry, f"guests[{i}]"))
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None
    return out
