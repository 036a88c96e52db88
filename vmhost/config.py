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

from hw.swap import SwapDevice
from hw.topology import NumaNode, Topology
from vmhost.errors import InputError
from vmhost.mm.swap import MAX_SWAPFILES, SWP_MAX_PAGES
from vmhost.profile import PROFILES
from vmhost.schema import (expect_enum, expect_int, expect_list, expect_mapping,
                           expect_number, expect_str, fail, parse_size,
                           read_yaml)
from hw.units import PAGE_SIZE

HOST_KEYS = ("profile", "thp", "block_size", "nodes", "distance", "movable_nodes", "swap")
NODE_KEYS = ("memory", "cpus")
SWAP_KEYS = ("name", "size", "priority", "read_mbps", "write_mbps")
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


def parse_host_config(doc: Any, path: str, extra_keys: tuple[str, ...] = ()) -> HostConfig:
    """Validate a document with ``host:``, ``ksm:`` and ``policy:`` (plus ``extra_keys`` left to
    the caller)."""
    expect_mapping(doc, path, "", ("host", "ksm", "policy") + extra_keys, ("host",))
    host = expect_mapping(doc["host"], path, "host", HOST_KEYS, ("nodes",))
    cfg = HostConfig(path)
    if "profile" in host:
        cfg.profile = expect_enum(host["profile"], path, "host.profile", sorted(PROFILES), "profile")
    if "thp" in host:
        cfg.thp = expect_enum(host["thp"], path, "host.thp", THP_MODES)
    block_bytes = 128 << 20
    if "block_size" in host:
        block_bytes = parse_size(host["block_size"], path, "host.block_size", minimum=PAGE_SIZE)
        pages = block_bytes // PAGE_SIZE
        if block_bytes % PAGE_SIZE or pages & (pages - 1):
            raise fail(path, "host.block_size", f"{host['block_size']!r} is not a power-of-two number of pages")
    cfg.block_pages = block_bytes // PAGE_SIZE
    nodes = expect_list(host["nodes"], path, "host.nodes", "nodes", nonempty=True)
    built, next_cpu, seen_cpus = [], 0, set()
    for i, n in enumerate(nodes):
        key = f"host.nodes[{i}]"
        expect_mapping(n, path, key, NODE_KEYS, ("memory",))
        mem = parse_size(n["memory"], path, f"{key}.memory", minimum=block_bytes)
        if mem % block_bytes:
            raise fail(path, f"{key}.memory", f"{n['memory']!r} is not a multiple of the block size "
                                              f"({block_bytes >> 20} MiB)")
        cpus = n.get("cpus", 1)
        if isinstance(cpus, list):
            for j, c in enumerate(cpus):
                expect_int(c, path, f"{key}.cpus[{j}]", 0)
                if c in seen_cpus:
                    raise fail(path, f"{key}.cpus[{j}]", f"cpu {c} belongs to two nodes")
                seen_cpus.add(c)
            ids = tuple(cpus)
        else:
            count = expect_int(cpus, path, f"{key}.cpus", 0, 4096)
            ids = []
            while len(ids) < count:
                if next_cpu not in seen_cpus:
                    ids.append(next_cpu)
                    seen_cpus.add(next_cpu)
                next_cpu += 1
            ids = tuple(ids)
        built.append(NumaNode(i, mem, ids))
    distance = host.get("distance", [])
    if distance:
        if (not isinstance(distance, list) or len(distance) != len(built)
                or any(not isinstance(r, list) or len(r) != len(built) for r in distance)):
            raise fail(path, "host.distance", f"expected a {len(built)}x{len(built)} matrix")
        for i, row in enumerate(distance):
            for j, d in enumerate(row):
                expect_int(d, path, f"host.distance[{i}][{j}]", 10, 254)
                if (i == j) != (d == 10):
                    raise fail(path, f"host.distance[{i}][{j}]",
                               "must be 10 on the diagonal and above 10 elsewhere")
    try:
        cfg.topology = Topology(built, [list(r) for r in distance])
    except ValueError as exc:
        raise fail(path, "host", str(exc)) from None
    movable = expect_list(host.get("movable_nodes", []), path, "host.movable_nodes", "node ids")
    for j, nid in enumerate(movable):
        expect_int(nid, path, f"host.movable_nodes[{j}]", 0, len(built) - 1)
    cfg.movable_nodes = tuple(movable)
    swap = expect_list(host.get("swap", []), path, "host.swap", "swap devices")
    if len(swap) > MAX_SWAPFILES:
        raise fail(path, "host.swap", f"at most {MAX_SWAPFILES} swap devices, got {len(swap)}")
    names = set()
    for i, s in enumerate(swap):
        key = f"host.swap[{i}]"
        expect_mapping(s, path, key, SWAP_KEYS, ("name", "size"))
        expect_str(s["name"], path, f"{key}.name")
        if s["name"] in names:
            raise fail(path, f"{key}.name", f"two swap devices are named {s['name']!r}")
        names.add(s["name"])
        size = parse_size(s["size"], path, f"{key}.size", minimum=PAGE_SIZE)
        if size // PAGE_SIZE > SWP_MAX_PAGES:
            raise fail(path, f"{key}.size", f"a swap device has at most {SWP_MAX_PAGES} pages "
                                            f"({SWP_MAX_PAGES * PAGE_SIZE >> 30} GiB) here")
        prio = expect_int(s.get("priority", -2 - i), path, f"{key}.priority", -32768, 32767)
        rates = {}
        for k, default in (("read_mbps", 500), ("write_mbps", 400)):
            v = expect_number(s.get(k, default), path, f"{key}.{k}", 0.0, lo_open=True)
            rates[k] = v * 1e6
        cfg.swap.append({"name": s["name"], "pages": size // PAGE_SIZE, "priority": prio,
                         "read_bps": rates["read_mbps"], "write_bps": rates["write_mbps"]})
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
