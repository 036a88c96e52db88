"""Import a libvirt host -- its NUMA cells and its domains -- as a vmhost host config.

``import_host(uri)`` connects with libvirt-python (read-only) and reads

* the host's NUMA cells from ``getCapabilities()`` (``host/topology/cells/cell``: memory, CPU
  ids and, when libvirt reports them, the ``distances/sibling`` SLIT values). A connection
  whose capabilities list no cells (libvirt's test driver with a custom node file) falls back
  to one node holding ``getInfo()``'s memory and CPU count, and says so in a note;
* every domain of ``listAllDomains()`` -- running or only defined -- through ``XMLDesc()``,
  parsed with :func:`parse_domain_xml` into a :class:`guests.spec.GuestSpec`. ``XMLDesc(0)``
  is the live definition of a running domain and the persistent one of a domain that is only
  defined; ``running`` is ``isActive()`` (a paused or suspended guest's RAM exists, so it counts
  as running); ``vcpus`` is ``<vcpu>``'s value (the maximum), not its ``current=`` attribute.

``host_config_document(host)`` turns the result into the host config mapping (``host:`` in
the shape ``vmhost.config`` reads, plus a ``guests:`` list), ``render_yaml(host)`` into YAML
text with a comment header saying where it came from, and ``write_host_config(host, path)``
writes it atomically (a temporary file in the same directory, then ``os.replace``).

Sizes
-----
libvirt sizes are an integer plus a ``unit`` attribute (``KiB`` when absent), read as libvirt
reads them (``virScaleInteger``, case-insensitive): ``b``/``byte``/``bytes``; ``k``/``KiB``,
``M``/``MiB``, ``G``/``GiB``, ``T``/``TiB``, ``P``/``PiB``, ``E``/``EiB`` are powers of 1024;
``KB``, ``MB``, ``GB``, ``TB``, ``PB``, ``EB`` powers of 1000. GuestSpec keeps whole MiB, so a
size that is not a whole number of MiB is rounded up to the next MiB (and a note says so).

In the YAML, every guest size is an integer number of MiB under a key ending in ``_mib``
(GuestSpec's own field names); host node sizes are strings such as ``"2048MiB"`` (the config
loader's size syntax). A host node is rounded down to a whole number of memory blocks
(``block_size``, 128 MiB unless a node is smaller), as the config loader requires.

Errors are :class:`LibvirtImportError`, one line naming the source (URI and domain, or file),
the element and the reason. This module imports nothing from ``vmhost``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from guests.spec import GuestNumaCell, GuestSpec, MemoryDevice, NumaTune

KIB = 1 << 10
MIB = 1 << 20
DEFAULT_BLOCK = 128 * MIB
MEMORY_DEVICE_MODELS = ("dimm", "virtio-mem")
NUMATUNE_MODES = ("strict", "interleave", "preferred", "restrictive")

_DIGITS = re.compile(r"^\s*(\d+)\s*$")
_CPUSET = re.compile(r"^\s*\^?\d+(-\d+)?(\s*,\s*\^?\d+(-\d+)?)*\s*$")


class LibvirtImportError(Exception):
    """The import failed; the message is one line: source, element, reason."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


# ---------------------------------------------------------------- sizes


def unit_scale(unit: str) -> int:
    """Bytes per unit, as libvirt's virScaleInteger reads ``unit``; ValueError if unknown."""
    u = unit.strip()
    if not u:
        raise ValueError("empty unit")
    if u.lower() in ("b", "byte", "bytes"):
        return 1
    if len(u) == 1 or u[1:].lower() == "ib":
        base = 1024
    elif len(u) == 2 and u[1].lower() == "b":
        base = 1000
    else:
        raise ValueError(f"unknown unit {unit!r}")
    power = "kmgtpe".find(u[0].lower())
    if power < 0:
        raise ValueError(f"unknown unit {unit!r}")
    return base ** (power + 1)


def size_bytes(text: str | None, unit: str | None, where: str, default_unit: str = "KiB") -> int:
    """Bytes of a libvirt size: ``text`` a whole number, ``unit`` as libvirt reads it."""
    if text is None or not _DIGITS.match(text):
        raise LibvirtImportError(f"{where}: {text!r} is not a whole number")
    try:
        scale = unit_scale(default_unit if unit is None else unit)
    except ValueError:
        raise LibvirtImportError(
            f"{where}: unknown memory unit {unit!r} (libvirt's units: b, bytes, KiB, MiB, GiB, "
            "TiB, PiB, EiB or k, M, G, T, P, E; KB, MB, GB, TB, PB, EB are powers of 1000)") \
            from None
    return int(text) * scale


def _mib_up(nbytes: int) -> int:
    return -(-nbytes // MIB)


def _size_text(nbytes: int) -> str:
    if nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30}GiB"
    if nbytes % MIB == 0:
        return f"{nbytes >> 20}MiB"
    return f"{nbytes >> 10}KiB"


# ---------------------------------------------------------------- host


@dataclass
class HostCell:
    id: int                    # libvirt's cell id
    memory_bytes: int
    cpus: list[int]
    distances: dict[int, int] = field(default_factory=dict)   # sibling cell id -> SLIT value


@dataclass
class LibvirtHost:
    uri: str
    cells: list[HostCell]
    guests: list[GuestSpec] = field(default_factory=list)
    hostname: str | None = None
    libvirt_version: str | None = None
    cells_from: str = "getCapabilities()"
    notes: list[str] = field(default_factory=list)   # written as comments in the YAML


def parse_capabilities(xml_text: str, source: str = "capabilities") -> list[HostCell]:
    """Host NUMA cells of a ``getCapabilities()`` document, in id order ([] when none)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise LibvirtImportError(f"{source}: not valid XML ({exc})") from None
    cells = []
    for i, c in enumerate(root.findall("./host/topology/cells/cell")):
        where = f"{source}: <cell> #{i}"
        cid = _int_attr(c, "id", where)
        where = f"{source}: <cell id='{cid}'>"
        mem = c.find("memory")
        if mem is None:
            raise LibvirtImportError(f"{where}: no <memory> element")
        nbytes = size_bytes(mem.text, mem.get("unit"), f"{where} <memory>")
        cpus = [_int_attr(cpu, "id", f"{where} <cpu>") for cpu in c.findall("./cpus/cpu")]
        dist = {}
        for s in c.findall("./distances/sibling"):
            dist[_int_attr(s, "id", f"{where} <sibling>")] = _int_attr(s, "value",
                                                                       f"{where} <sibling>")
        cells.append(HostCell(cid, nbytes, cpus, dist))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise LibvirtImportError(f"{source}: <cells>: two cells have the same id")
    return sorted(cells, key=lambda c: c.id)


def _int_attr(el: ET.Element, name: str, where: str) -> int:
    v = el.get(name)
    if v is None or not _DIGITS.match(v):
        raise LibvirtImportError(f"{where}: attribute {name}={v!r} is not a whole number")
    return int(v)


# ---------------------------------------------------------------- domains


def parse_domain_xml(xml_text: str, source: str = "domain", running: bool | None = None,
                     notes: list[str] | None = None) -> GuestSpec:
    """A GuestSpec from libvirt domain XML.

    ``source`` names where the XML came from in error messages (a file, or URI and domain).
    ``running`` is the domain's state; when None it is taken from the XML (a live domain's
    ``<domain id=...>`` attribute: libvirt gives running domains an id). What GuestSpec cannot
    hold (sizes rounded up to whole MiB, shared or file-backed RAM) is appended to ``notes``.
    """
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise LibvirtImportError(f"{source}: not valid XML ({exc})") from None
    if root.tag != "domain":
        raise LibvirtImportError(f"{source}: <{root.tag}>: expected a <domain> element")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise LibvirtImportError(f"{source}: <name>: missing or empty")
    src = f"{source}" if f"'{name}'" in source else f"{source}: domain '{name}'"

    def size_of(el: ET.Element, tag: str) -> int:
        return size_bytes(el.text, el.get("unit"), f"{src}: <{tag}>")

    mem_el = root.find("memory")
    if mem_el is None:
        raise LibvirtImportError(f"{src}: <memory>: missing")
    memory = size_of(mem_el, "memory")
    cur_el = root.find("currentMemory")
    current = size_of(cur_el, "currentMemory") if cur_el is not None else None
    max_mem = max_slots = None
    mm = root.find("maxMemory")
    if mm is not None:
        max_mem = size_of(mm, "maxMemory")
        if mm.get("slots") is not None:
            max_slots = _int_attr(mm, "slots", f"{src}: <maxMemory>")

    vcpus = 1
    vc = root.find("vcpu")
    if vc is not None:
        if not _DIGITS.match(vc.text or ""):
            raise LibvirtImportError(f"{src}: <vcpu>: {vc.text!r} is not a whole number")
        vcpus = int(vc.text)

    cells = []
    for c in root.findall("./cpu/numa/cell"):
        where = f"{src}: <cpu><numa><cell>"
        cid = _int_attr(c, "id", where) if c.get("id") is not None else len(cells)
        where = f"{src}: <cpu><numa><cell id='{cid}'>"
        cpus = c.get("cpus", "")
        if cpus and not _CPUSET.match(cpus):
            raise LibvirtImportError(f"{where}: cpus={cpus!r} is not a cpuset")
        cell_mem = size_bytes(c.get("memory"), c.get("unit"), f"{where} memory")
        cells.append((cid, cpus.strip(), cell_mem))

    numatune = None
    nt = root.find("numatune")
    if nt is not None:
        numatune = NumaTune()
        m = nt.find("memory")
        if m is not None:
            numatune.mode = _numa_mode(m.get("mode", "strict"), f"{src}: <numatune><memory>")
            numatune.nodeset = _nodeset(m.get("nodeset", ""), f"{src}: <numatune><memory>")
        for mn in nt.findall("memnode"):
            where = f"{src}: <numatune><memnode>"
            cid = _int_attr(mn, "cellid", where)
            where = f"{src}: <numatune><memnode cellid='{cid}'>"
            numatune.memnodes[cid] = (_numa_mode(mn.get("mode", "strict"), where),
                                      _nodeset(mn.get("nodeset", ""), where))

    mb = root.find("memoryBacking")
    nosharepages = mb is not None and mb.find("nosharepages") is not None
    hugepages = mb is not None and mb.find("hugepages") is not None
    locked = mb is not None and mb.find("locked") is not None

    devices = []
    for i, d in enumerate(root.findall("./devices/memory")):
        model = d.get("model", "")
        where = f"{src}: <memory model='{model}'> #{i}"
        if model not in MEMORY_DEVICE_MODELS:
            continue        # nvdimm, virtio-pmem, sgx-epc: not guest RAM that KSM sees
        t = d.find("target")
        if t is None or t.find("size") is None:
            raise LibvirtImportError(f"{where}: <target><size>: missing")
        size = size_bytes(t.find("size").text, t.find("size").get("unit"), f"{where} <size>")
        node = None
        if t.find("node") is not None:
            txt = t.find("node").text
            if not _DIGITS.match(txt or ""):
                raise LibvirtImportError(f"{where} <node>: {txt!r} is not a whole number")
            node = int(txt)
        req = blk = None
        if model == "virtio-mem":
            r, b = t.find("requested"), t.find("block")
            if r is not None:
                req = size_bytes(r.text, r.get("unit"), f"{where} <requested>")
            if b is not None:
                blk = size_bytes(b.text, b.get("unit"), f"{where} <block>")
        devices.append((model, size, node, req, blk))

    if running is None:
        running = root.get("id") not in (None, "-1")

    sized = [("<memory>", memory), ("<currentMemory>", current), ("<maxMemory>", max_mem)]
    sized += [(f"<cell id='{cid}'>", b) for cid, _, b in cells]
    for i, (model, size, _, req, blk) in enumerate(devices):
        sized += [(f"<memory model='{model}'> #{i} size", size),
                  (f"<memory model='{model}'> #{i} requested", req),
                  (f"<memory model='{model}'> #{i} block", blk)]
    rounded = [f"{label} {b >> 10 if b % KIB == 0 else b} {'KiB' if b % KIB == 0 else 'bytes'}"
               f" -> {_mib_up(b)} MiB" for label, b in sized if b is not None and b % MIB]
    try:
        spec = GuestSpec(
            name=name,
            memory_mib=_mib_up(memory),
            current_memory_mib=None if current is None else _mib_up(current),
            max_memory_mib=None if max_mem is None else _mib_up(max_mem),
            max_memory_slots=max_slots,
            vcpus=vcpus,
            numa_cells=[GuestNumaCell(cid, cpus, _mib_up(b)) for cid, cpus, b in cells],
            numatune=numatune,
            nosharepages=nosharepages,
            hugepages=hugepages,
            locked=locked,
            memory_devices=[MemoryDevice(model, _mib_up(size), node,
                                         None if req is None else _mib_up(req),
                                         None if blk is None else _mib_up(blk))
                            for model, size, node, req, blk in devices],
            running=running,
        )
    except ValueError as exc:
        raise LibvirtImportError(f"{src}: {exc}") from None
    spec_notes = notes if notes is not None else []
    if rounded:
        spec_notes.append(f"guest {name}: rounded up to whole MiB: {', '.join(rounded)}")
    if mb is not None:
        access = mb.find("access")
        source_el = mb.find("source")
        if access is not None and access.get("mode") == "shared":
            spec_notes.append(f"guest {name}: <memoryBacking><access mode='shared'/>: shared "
                              "guest RAM, which KSM does not merge (not in GuestSpec)")
        if source_el is not None and source_el.get("type") in ("file", "memfd"):
            spec_notes.append(f"guest {name}: <memoryBacking><source type="
                              f"'{source_el.get('type')}'/>: not anonymous memory (not in "
                              "GuestSpec)")
    return spec


def _numa_mode(mode: str, where: str) -> str:
    if mode not in NUMATUNE_MODES:
        raise LibvirtImportError(f"{where}: mode={mode!r} is not one of "
                                 f"{', '.join(NUMATUNE_MODES)}")
    return mode


def _nodeset(nodeset: str, where: str) -> str:
    if nodeset and not _CPUSET.match(nodeset):
        raise LibvirtImportError(f"{where}: nodeset={nodeset!r} is not a node set")
    return nodeset.strip()


# ---------------------------------------------------------------- libvirt


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _version_text(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def import_host(uri: str) -> LibvirtHost:
    """Read the host's NUMA cells and every domain (running or defined) through libvirt."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtImportError("libvirt-python is not installed: pip install 'vmhost[libvirt]' "
                                 "(it builds against libvirt's headers: apt-get install "
                                 "libvirt-dev pkg-config first)") from None
    # libvirt prints every error on stderr by default; they are raised as exceptions anyway
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtImportError(f"{uri}: cannot connect: {_first_line(exc)}") from None
    if conn is None:
        raise LibvirtImportError(f"{uri}: cannot connect")
    step = "getCapabilities()"
    try:
        host = LibvirtHost(uri, [])
        try:
            host.hostname = conn.getHostname()
        except libvirt.libvirtError:
            pass
        try:
            host.libvirt_version = _version_text(conn.getLibVersion())
        except libvirt.libvirtError:
            pass
        host.cells = parse_capabilities(conn.getCapabilities(), f"{uri}: getCapabilities()")
        if not host.cells:
            step = "getInfo()"
            info = conn.getInfo()       # [model, memory MiB, cpus, mhz, nodes, sockets, ...]
            host.cells = [HostCell(0, int(info[1]) * MIB, list(range(int(info[2]))))]
            host.cells_from = "getInfo()"
            host.notes.append(f"getCapabilities() lists no host NUMA cells, so the host is one "
                              f"node with getInfo()'s {info[1]} MiB and {info[2]} CPUs (libvirt's "
                              f"test driver reports no cells for a custom node file)")
        step = "listAllDomains()"
        domains = sorted(conn.listAllDomains(0), key=lambda d: d.name())
        for dom in domains:
            name = dom.name()
            step = f"domain '{name}': XMLDesc()"
            xml_text = dom.XMLDesc(0)
            step = f"domain '{name}': isActive()"
            running = bool(dom.isActive())
            host.guests.append(parse_domain_xml(xml_text, f"{uri}: domain '{name}'", running,
                                                host.notes))
        return host
    except libvirt.libvirtError as exc:
        raise LibvirtImportError(f"{uri}: {step}: {_first_line(exc)}") from None
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


# ---------------------------------------------------------------- the host config document


_GUEST_FIELDS = ("name", "memory_mib", "current_memory_mib", "max_memory_mib",
                 "max_memory_slots", "vcpus", "numa_cells", "numatune", "nosharepages",
                 "hugepages", "locked", "memory_devices", "running", "image")


def guest_to_dict(g: GuestSpec) -> dict[str, Any]:
    """GuestSpec as a YAML-ready mapping: its field names, sizes as integers of MiB.

    None values and empty lists are left out; the booleans are always written. ``numatune``
    becomes ``{mode, nodeset, memnodes: {cell: {mode, nodeset}}}``.
    """
    d: dict[str, Any] = {"name": g.name, "memory_mib": g.memory_mib}
    for k in ("current_memory_mib", "max_memory_mib", "max_memory_slots"):
        if getattr(g, k) is not None:
            d[k] = getattr(g, k)
    d["vcpus"] = g.vcpus
    if g.numa_cells:
        d["numa_cells"] = [{"id": c.id, "cpus": c.cpus, "memory_mib": c.memory_mib}
                           for c in g.numa_cells]
    if g.numatune is not None:
        nt: dict[str, Any] = {"mode": g.numatune.mode, "nodeset": g.numatune.nodeset}
        if g.numatune.memnodes:
            nt["memnodes"] = {cell: {"mode": m, "nodeset": ns}
                              for cell, (m, ns) in sorted(g.numatune.memnodes.items())}
        d["numatune"] = nt
    d["nosharepages"] = g.nosharepages
    d["hugepages"] = g.hugepages
    d["locked"] = g.locked
    if g.memory_devices:
        devs = []
        for m in g.memory_devices:
            dev: dict[str, Any] = {"model": m.model, "size_mib": m.size_mib}
            for k in ("node", "requested_mib", "block_mib"):
                if getattr(m, k) is not None:
                    dev[k] = getattr(m, k)
            devs.append(dev)
        d["memory_devices"] = devs
    d["running"] = g.running
    if g.image is not None:
        d["image"] = g.image
    return d


def guest_from_dict(d: Any, where: str = "guest") -> GuestSpec:
    """The inverse of :func:`guest_to_dict`; ValueError names ``where`` and the key."""
    def mapping(v: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
        if not isinstance(v, dict):
            raise ValueError(f"{key}: expected a mapping, got {type(v).__name__}")
        for k in v:
            if k not in allowed:
                raise ValueError(f"{key}.{k}: unknown key (allowed: {', '.join(allowed)})")
        for k in required:
            if k not in v:
                raise ValueError(f"{key}.{k}: missing")
        return v

    def whole(v: Any, key: str, lo: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key}: expected a whole number >= {lo}, got {v!r}")
        return v

    def text(v: Any, key: str) -> str:
        if not isinstance(v, str):
            raise ValueError(f"{key}: expected a string, got {v!r}")
        return v

    def flag(v: Any, key: str) -> bool:
        if not isinstance(v, bool):
            raise ValueError(f"{key}: expected true or false, got {v!r}")
        return v

    def opt(key: str, conv, *a):
        return None if d.get(key) is None else conv(d[key], f"{where}.{key}", *a)

    mapping(d, where, _GUEST_FIELDS, ("name", "memory_mib"))
    cells = []
    for i, c in enumerate(d.get("numa_cells") or []):
        k = f"{where}.numa_cells[{i}]"
        mapping(c, k, ("id", "cpus", "memory_mib"), ("id", "memory_mib"))
        cells.append(GuestNumaCell(whole(c["id"], f"{k}.id"), text(c.get("cpus", ""), f"{k}.cpus"),
                                   whole(c["memory_mib"], f"{k}.memory_mib", 1)))
    numatune = None
    if d.get("numatune") is not None:
        k = f"{where}.numatune"
        nt = mapping(d["numatune"], k, ("mode", "nodeset", "memnodes"), ())
        numatune = NumaTune(text(nt.get("mode", "strict"), f"{k}.mode"),
                            text(nt.get("nodeset", ""), f"{k}.nodeset"))
        if numatune.mode not in NUMATUNE_MODES:
            raise ValueError(f"{k}.mode: {numatune.mode!r} is not one of "
                             f"{', '.join(NUMATUNE_MODES)}")
        mn = nt.get("memnodes") or {}
        if not isinstance(mn, dict):
            raise ValueError(f"{k}.memnodes: expected a mapping of cell id to {{mode, nodeset}}")
        for cell, v in mn.items():
            kk = f"{k}.memnodes.{cell}"
            mapping(v, kk, ("mode", "nodeset"), ())
            numatune.memnodes[whole(cell, kk)] = (text(v.get("mode", "strict"), f"{kk}.mode"),
                                                  text(v.get("nodeset", ""), f"{kk}.nodeset"))
    devices = []
    for i, m in enumerate(d.get("memory_devices") or []):
        k = f"{where}.memory_devices[{i}]"
        mapping(m, k, ("model", "size_mib", "node", "requested_mib", "block_mib"),
                ("model", "size_mib"))
        if m["model"] not in MEMORY_DEVICE_MODELS:
            raise ValueError(f"{k}.model: {m['model']!r} is not dimm or virtio-mem")
        devices.append(MemoryDevice(
            m["model"], whole(m["size_mib"], f"{k}.size_mib", 1),
            None if m.get("node") is None else whole(m["node"], f"{k}.node"),
            None if m.get("requested_mib") is None else whole(m["requested_mib"],
                                                              f"{k}.requested_mib"),
            None if m.get("block_mib") is None else whole(m["block_mib"], f"{k}.block_mib", 1)))
    try:
        return GuestSpec(
            name=text(d["name"], f"{where}.name"),
            memory_mib=whole(d["memory_mib"], f"{where}.memory_mib", 1),
            current_memory_mib=opt("current_memory_mib", whole, 1),
            max_memory_mib=opt("max_memory_mib", whole, 1),
            max_memory_slots=opt("max_memory_slots", whole),
            vcpus=whole(d.get("vcpus", 1), f"{where}.vcpus", 1),
            numa_cells=cells, numatune=numatune,
            nosharepages=flag(d.get("nosharepages", False), f"{where}.nosharepages"),
            hugepages=flag(d.get("hugepages", False), f"{where}.hugepages"),
            locked=flag(d.get("locked", False), f"{where}.locked"),
            memory_devices=devices,
            running=flag(d.get("running", True), f"{where}.running"),
            image=opt("image", text))
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: {exc}") from None


def host_config_document(host: LibvirtHost) -> dict[str, Any]:
    """The host config mapping: ``host:`` (vmhost.config's shape) and ``guests:``.

    Adds to ``host.notes`` what the conversion changed (nodes rounded down to whole memory
    blocks, cells renumbered, distances left out).
    """
    if not host.cells:
        raise LibvirtImportError(f"{host.uri}: the host has no NUMA cells and no memory")
    smallest = min(c.memory_bytes for c in host.cells)
    if smallest < MIB:
        bad = min(host.cells, key=lambda c: c.memory_bytes)
        raise LibvirtImportError(f"{host.uri}: {host.cells_from}: cell {bad.id} has "
                                 f"{bad.memory_bytes >> 10} KiB of memory; a vmhost node needs "
                                 "at least 1 MiB")
    block = DEFAULT_BLOCK
    while block > smallest:
        block //= 2
    nodes = []
    for c in host.cells:
        mem = c.memory_bytes // block * block
        if mem != c.memory_bytes:
            host.notes.append(f"host cell {c.id}: {c.memory_bytes >> 10} KiB rounded down to "
                              f"{_size_text(mem)}, a whole number of {_size_text(block)} blocks")
        nodes.append({"memory": _size_text(mem), "cpus": list(c.cpus)})
    ids = [c.id for c in host.cells]
    if ids != list(range(len(ids))):
        host.notes.append(f"host cells {ids} are nodes 0..{len(ids) - 1} here; guests' "
                          "numatune nodesets keep libvirt's cell ids")
    doc_host: dict[str, Any] = {"block_size": _size_text(block), "nodes": nodes}
    if len(host.cells) > 1:
        matrix, why = _distance_matrix(host.cells)
        if matrix is not None:
            doc_host["distance"] = matrix
        else:
            host.notes.append(f"no distance matrix: {why} (vmhost's default distances apply)")
    return {"host": doc_host, "guests": [guest_to_dict(g) for g in host.guests]}


def _distance_matrix(cells: list[HostCell]) -> tuple[list[list[int]] | None, str]:
    if not any(c.distances for c in cells):
        return None, "libvirt reports no cell distances"
    matrix = []
    for a in cells:
        row = []
        for b in cells:
            v = a.distances.get(b.id)
            if v is None:
                return None, f"cell {a.id} has no distance to cell {b.id}"
            if (a.id == b.id) != (v == 10) or not 10 <= v <= 254:
                return None, f"distance {a.id}->{b.id} is {v} (need 10 to itself, 11..254 " \
                             "to others)"
            row.append(v)
        matrix.append(row)
    return matrix, ""


# ---------------------------------------------------------------- YAML


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes lists of scalars, lists of lists and small leaf mappings inline."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, (list, dict)) for x in data) \
        or all(isinstance(x, list) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    leaf = all(not isinstance(v, dict)
               and not (isinstance(v, list) and v and isinstance(v[0], dict))
               for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data,
                                    flow_style=leaf and len(data) <= 5)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, _represent_dict)


def render_yaml(host: LibvirtHost, document: dict[str, Any] | None = None,
                when: datetime | None = None) -> str:
    """The host config as YAML text, with a comment header saying where it came from."""
    doc = host_config_document(host) if document is None else document
    when = when or datetime.now(timezone.utc)
    about = ", ".join(x for x in (f"host {host.hostname}" if host.hostname else "",
                                  f"libvirt {host.libvirt_version}" if host.libvirt_version
                                  else "") if x)
    running = sum(g.running for g in host.guests)
    lines = [
        "# vmhost host config imported from libvirt by `vmhost import libvirt`",
        f"# source: {host.uri}" + (f" ({about})" if about else ""),
        f"# imported: {when.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        f"# host nodes: {len(host.cells)} from {host.cells_from}",
        f"# guests: {len(host.guests)} domains from XMLDesc() ({running} running, "
        f"{len(host.guests) - running} defined only); guest sizes are integers of MiB "
        "(the *_mib keys)",
    ]
    lines += [f"# note: {n}" for n in host.notes]
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100,
                     default_flow_style=False)
    return "\n".join(lines) + "\n" + body


def check_output_path(path: str | os.PathLike) -> Path:
    """The output path, if a file can be created there; LibvirtImportError otherwise."""
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        raise LibvirtImportError(f"{path}: cannot write: directory {str(parent)!r} does not exist")
    if p.is_dir():
        raise LibvirtImportError(f"{path}: cannot write: it is a directory")
    return p


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    p = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise LibvirtImportError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, p)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise LibvirtImportError(f"{path}: cannot write: {exc.strerror or exc}") from None


def write_host_config(host: LibvirtHost, path: str | os.PathLike) -> str:
    """Render ``host`` and write it atomically to ``path``; returns the text written."""
    check_output_path(path)
    text = render_yaml(host)
    write_text_atomically(path, text)
    return text


# ---------------------------------------------------------------- live sampling


def sample_domains(uri: str, directory: str | os.PathLike, names: list[str],
                   keep_dumps: bool = False) -> tuple[dict[str, Path], Path]:
    """Dump the memory of each named (running) domain through libvirt and import it.

    Every domain gets ``virDomainCoreDumpWithFormat(dom, FILE, VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
    VIR_DUMP_MEMORY_ONLY)``: QEMU's ``dump-guest-memory`` without paging, an ELF64 core
    (libvirt pauses the guest while it writes; a dump of a 128 MiB guest takes about 0.3 s).
    Each dump is fingerprinted (``guests.dumps``) into ``NAME.vmimg`` and deleted unless
    ``keep_dumps``. Everything is written into a staging directory inside ``directory``;
    returns ({domain: image path in the staging directory}, staging directory) -- the caller
    moves the images into place with :func:`commit_samples` once the rest of its output is
    written, or removes the staging directory. Errors are one line naming the URI and domain.
    """
    from guests.dumps import DumpError, import_dump
    try:
        import libvirt
    except ImportError:
        raise LibvirtImportError("libvirt-python is not installed (apt-get install libvirt-dev "
                                 "pkg-config, then pip install libvirt-python)") from None
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise LibvirtImportError(f"{directory}: --sample: not a directory")
    if not d.resolve().parent.is_dir():
        raise LibvirtImportError(f"{directory}: --sample: directory {str(d.resolve().parent)!r} "
                                 "does not exist")
    created = not d.exists()
    d.mkdir(exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".sample-", dir=d))

    def discard():
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                d.rmdir()
            except OSError:
                pass

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    out: dict[str, Path] = {}
    step = "open()"
    conn = None
    try:
        try:
            conn = libvirt.open(uri)     # dumping needs a read-write connection
        except libvirt.libvirtError as exc:
            raise LibvirtImportError(f"{uri}: cannot connect read-write to dump memory: "
                                     f"{_first_line(exc)}") from None
        for name in names:
            core = stage / f"{name}.elf"
            step = f"domain '{name}': coreDumpWithFormat()"
            dom = conn.lookupByName(name)
            dom.coreDumpWithFormat(str(core), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                                   libvirt.VIR_DUMP_MEMORY_ONLY)
            step = f"domain '{name}': importing {core}"
            image = stage / f"{name}.vmimg"
            try:
                import_dump(core, image)
            except DumpError as exc:
                raise LibvirtImportError(f"{uri}: {step}: {exc}") from None
            if keep_dumps:
                os.replace(core, stage / f"{name}.elf.keep")
            else:
                core.unlink()
            out[name] = image
        return out, stage
    except libvirt.libvirtError as exc:
        discard()
        raise LibvirtImportError(f"{uri}: {step}: {_first_line(exc)}") from None
    except BaseException:
        discard()
        raise
    finally:
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass


def commit_samples(samples: dict[str, Path], stage: Path) -> dict[str, Path]:
    """Move staged images (and kept dumps) into their directory; returns the final paths."""
    final = {}
    for name, p in samples.items():
        target = stage.parent / p.name
        os.replace(p, target)
        kept = stage / f"{name}.elf.keep"
        if kept.exists():
            os.replace(kept, stage.parent / f"{name}.elf")
        final[name] = target
    shutil.rmtree(stage, ignore_errors=True)
    return final
