"""Reading a fleet file (format in :mod:`vmhost.fleet`) into validated scenarios.

The whole file is validated before anything runs or is written: every host model (through
:func:`vmhost.config.parse_host_config`, its key paths prefixed with ``hosts[i].``), every
inventory source, the placement, the simulation and, with a sweep, every scenario the sweep
makes. A scenario is the document with the swept key set to one value, validated like the
document itself; its mistakes name the value (``sweep.values[2]: placement.policy: ...``).

VM names are unique across the inventory: inline and generated VMs are numbered per name
prefix (``web-1``, ``web-2``), libvirt guests keep their domain names.

Guests imported from libvirt map onto the simulation's VM as follows: ``memory_mib`` is the
configured (boot) memory, ``nosharepages`` and ``locked`` carry over, and a hugetlbfs-backed
guest (``hugepages``) is simulated as non-mergeable and locked: its RAM is never merged and
is all resident.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hw.units import PAGE_SIZE, PAGES_PER_MIB
from vmhost.config import HostConfig, load_config, parse_host_config
from vmhost.errors import InputError
from vmhost.policies import resolution_refusal
from vmhost.schema import (SchemaError, expect_bool, expect_domain, expect_enum, expect_image,
                           expect_int, expect_list, expect_mapping, expect_mib, expect_number,
                           expect_str, fail, is_percentage, parse_duration_ns, parse_percentage,
                           parse_size, read_yaml)

TOP_KEYS = ("hosts", "inventory", "placement", "simulation", "sweep")
MODEL_KEYS = ("name", "count", "host", "ksm", "policy")
INVENTORY_KEYS = ("vms", "generate", "libvirt")
VM_KEYS = ("image", "memory", "count", "domain", "nosharepages", "locked", "name")
GENERATE_KEYS = ("count", "seed", "mix")
MIX_KEYS = ("image", "memory", "weight", "domain", "nosharepages", "locked", "name")
LIBVIRT_KEYS = ("file", "image", "domain", "state")
PLACEMENT_KEYS = ("policy", "reserve")
POLICIES = ("first-fit", "first-fit-ksm", "sharing-aware")
SIMULATION_KEYS = ("resolution", "seed", "settle", "write_period", "boot")
BOOTS = ("staggered", "together")
SETTLE_KEYS = ("scans", "tolerance", "max_scans", "time")
SWEEP_KEYS = ("key", "values")
_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)$")


@dataclass
class HostModel:
    index: int
    name: str
    count: int | None            # hosts of this model available (None: no limit)
    doc: dict                    # the model's host, ksm and policy sections, as written
    config: HostConfig

    @property
    def ram_pages(self) -> int:
        return sum(n.mem_bytes for n in self.config.topology.nodes) // PAGE_SIZE

    def kept_free_pages(self, resolution: int = 1) -> int:
        """What the kernel keeps free on this host (its high watermarks), full scale, on the
        host simulated at ``resolution`` (whose watermarks are the full-size host's / N, up to
        rounding)."""
        from vmhost.mm.page_alloc import watermarks
        managed = [n.mem_bytes // PAGE_SIZE // resolution for n in self.config.topology.nodes]
        return sum(high for _min, _low, high in watermarks(managed, resolution)) * resolution


@dataclass
class Vm:
    name: str
    image: str                   # catalog name, or an absolute path to an image YAML
    memory_mib: int
    domain: str = "default"
    nosharepages: bool = False
    locked: bool = False
    where: str = ""              # key path of the inventory entry it came from
    img: Any = None              # guests.images.Image (for the placement's estimate)


@dataclass
class Simulation:
    resolution: int = 1
    seed: int = 1
    settle: dict | None = None
    write_period: str | int = "10s"
    boot: str = "staggered"


@dataclass
class Scenario:
    name: str
    value: Any                   # the swept value (None without a sweep)
    models: list[HostModel]
    vms: list[Vm]
    policy: str = "sharing-aware"
    room_pages: dict[int, int] = field(default_factory=dict)   # per model index: RAM minus the
    sim: Simulation = field(default_factory=Simulation)        # reserve and the watermarks
    notes: list[str] = field(default_factory=list)


@dataclass
class Fleet:
    path: str
    scenarios: list[Scenario]
    sweep_key: str | None = None


# ------------------------------------------------------------------------------------------
# the document

def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(read_yaml(path), str(path))


def parse_fleet(doc: Any, path: str) -> Fleet:
    """Every scenario of the document, validated; raises InputError on the first mistake."""
    expect_mapping(doc, path, "", TOP_KEYS, ("hosts", "inventory"))
    base = {k: v for k, v in doc.items() if k != "sweep"}
    first = parse_scenario(base, path, "base", None)
    if "sweep" not in doc:
        return Fleet(path, [first])
    sw = expect_mapping(doc["sweep"], path, "sweep", SWEEP_KEYS, SWEEP_KEYS)
    key = expect_str(sw["key"], path, "sweep.key", "a dotted key path such as placement.policy")
    values = expect_list(sw["values"], path, "sweep.values", nonempty=True)
    _, leaf = _resolve(base, key, path)
    scenarios, names = [], set()
    for i, value in enumerate(values):
        d = copy.deepcopy(base)
        p, _ = _resolve(d, key, path)
        p[leaf] = copy.deepcopy(value)
        name = f"{key}={_short(value)}"
        if name in names:
            raise fail(path, f"sweep.values[{i}]", f"{_short(value)} is listed twice")
        names.add(name)
        try:
            scenarios.append(parse_scenario(d, path, name, value))
        except InputError as exc:
            raise InputError(f"{path}: sweep.values[{i}]: {_strip(exc, path)}") from None
    return Fleet(path, scenarios, key)


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _strip(exc: Exception, path: str) -> str:
    msg = str(exc)
    return msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg


def _resolve(doc: dict, key: str, path: str) -> tuple[Any, Any]:
    """The container the sweep key's last step lives in, and that step (a key or an index).
    Every step but the last must exist; the last may be absent (a default being swept)."""
    steps: list[Any] = []
    for part in key.split("."):
        m = _TOKEN.match(part)
        if not m:
            raise fail(path, "sweep.key", f"{key!r} is not a dotted key path (bad step {part!r})")
        steps.append(m.group(1))
        steps.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    if steps[0] == "sweep":
        raise fail(path, "sweep.key", "the sweep cannot sweep itself")
    node: Any = doc
    walked = ""
    for j, step in enumerate(steps):
        last = j == len(steps) - 1
        here = f"{walked}[{step}]" if isinstance(step, int) else (f"{walked}.{step}" if walked else step)
        if isinstance(step, int):
            if not isinstance(node, list):
                raise fail(path, "sweep.key", f"{walked or 'the document'} is not a list in {key!r}")
            if step >= len(node):
                raise fail(path, "sweep.key", f"{here} does not exist ({walked} has {len(node)} entries)")
        else:
            if not isinstance(node, dict):
                raise fail(path, "sweep.key", f"{walked or 'the document'} is not a mapping in {key!r}")
            if step not in node and not last:
                raise fail(path, "sweep.key", f"{here} does not exist in the fleet document")
        if last:
            return node, step
        node = node[step]
        walked = here
    raise AssertionError("unreachable")


def parse_scenario(doc: dict, path: str, name: str, value: Any) -> Scenario:
    models = _models(doc["hosts"], path)
    vms = _inventory(doc["inventory"], path)
    pl = expect_mapping(doc.get("placement", {}) or {}, path, "placement", PLACEMENT_KEYS)
    policy = expect_enum(pl.get("policy", "sharing-aware"), path, "placement.policy", POLICIES)
    scn = Scenario(name, value, models, vms, policy)
    scn.sim = _simulation(doc.get("simulation", {}) or {}, path)
    _check_resolution(scn, path)
    if scn.sim.resolution > 1:
        scn.notes.append(f"every host and VM simulated at 1/{scn.sim.resolution} of its pages; "
                         f"page counts and CPU scaled back x{scn.sim.resolution}")
    reserve = pl.get("reserve", "5%")
    for m in models:
        kept = m.kept_free_pages(scn.sim.resolution)
        scn.room_pages[m.index] = m.ram_pages - _reserve(reserve, m, path) - kept
        if scn.room_pages[m.index] <= 0:
            raise fail(path, "placement.reserve", f"{reserve!r} leaves no room on host model {m.name!r} "
                                                  f"({m.ram_pages // PAGES_PER_MIB} MiB, of which the kernel "
                                                  f"keeps {kept // PAGES_PER_MIB} MiB free)")
    _check_fit(scn, path)
    return scn


# ------------------------------------------------------------------------------------------
# host models

def _models(entries: Any, path: str) -> list[HostModel]:
    expect_list(entries, path, "hosts", "host models", nonempty=True)
    out, names = [], set()
    for i, m in enumerate(entries):
        key = f"hosts[{i}]"
        expect_mapping(m, path, key, MODEL_KEYS, ("name", "host"))
        name = expect_str(m["name"], path, f"{key}.name")
        if name in names:
            raise fail(path, f"{key}.name", f"two host models are named {name!r}")
        names.add(name)
        count = None
        if m.get("count") is not None:
            count = expect_int(m["count"], path, f"{key}.count", 1, 1_000_000)
        doc = {k: copy.deepcopy(m[k]) for k in ("host", "ksm", "policy") if k in m}
        try:
            cfg = parse_host_config(doc, path)
        except SchemaError as exc:
            raise InputError(f"{path}: {key}.{_strip(exc, path)}") from None
        out.append(HostModel(i, name, count, doc, cfg))
    return out


def _reserve(value: Any, model: HostModel, path: str) -> int:
    ram = model.ram_pages
    if is_percentage(value):
        pct = parse_percentage(value, path, "placement.reserve", 0.0, 100.0, hi_open=True)
        return int(math.ceil(pct / 100 * ram))
    return -(-parse_size(value, path, "placement.reserve", minimum=0) // PAGE_SIZE)


# ------------------------------------------------------------------------------------------
# inventory

def _image_ref(img, value: str) -> str:
    """What a task names the image by: the catalog name, or the image file's absolute path."""
    from guests.resolve import image_ref
    return image_ref(img, value)


def _vm_template(e: Any, path: str, key: str, keys: tuple[str, ...]) -> Vm:
    expect_mapping(e, path, key, keys, ("image",))
    img = expect_image(e["image"], path, f"{key}.image")
    mem = expect_mib(e["memory"], path, f"{key}.memory") if "memory" in e else img.memory_mib
    try:
        img.class_pages(mem)
    except ValueError as exc:
        raise fail(path, f"{key}.memory", f"too small for image {img.name!r} ({exc})") from None
    name = expect_str(e.get("name", img.name), path, f"{key}.name", "a non-empty name prefix")
    return Vm(name, _image_ref(img, e["image"]), mem, expect_domain(e.get("domain", "default"), path, f"{key}.domain"),
              expect_bool(e.get("nosharepages", False), path, f"{key}.nosharepages"),
              expect_bool(e.get("locked", False), path, f"{key}.locked"), key, img)


class _Names:
    """Unique VM names: numbered per prefix; a clash (a libvirt name) is an error."""

    def __init__(self, path: str):
        self.path, self.taken, self.next = path, {}, {}

    def numbered(self, vm: Vm) -> Vm:
        n = self.next.get(vm.name, 1)
        while f"{vm.name}-{n}" in self.taken:
            n += 1
        self.next[vm.name] = n + 1
        return self.add(Vm(**{**vm.__dict__, "name": f"{vm.name}-{n}"}))

    def add(self, vm: Vm) -> Vm:
        if vm.name in self.taken:
            raise fail(self.path, vm.where, f"VM name {vm.name!r} is also used by {self.taken[vm.name]}")
        self.taken[vm.name] = vm.where
        return vm


def _inventory(inv: Any, path: str) -> list[Vm]:
    expect_mapping(inv, path, "inventory", INVENTORY_KEYS)
    names = _Names(path)
    vms: list[Vm] = []
    entries = expect_list(inv.get("vms", []), path, "inventory.vms", "VMs")
    for i, e in enumerate(entries):
        key = f"inventory.vms[{i}]"
        t = _vm_template(e, path, key, VM_KEYS)
        count = expect_int(e.get("count", 1), path, f"{key}.count", 1, 1_000_000)
        vms.extend(names.numbered(t) for _ in range(count))
    if "generate" in inv:
        vms.extend(_generate(inv["generate"], path, names))
    lv = expect_list(inv.get("libvirt", []), path, "inventory.libvirt", "{file, image, ...}")
    for i, e in enumerate(lv):
        vms.extend(_libvirt(e, path, f"inventory.libvirt[{i}]", names))
    if not vms:
        raise fail(path, "inventory", "no VMs (give vms, generate or libvirt)")
    return vms


def _generate(g: Any, path: str, names: _Names) -> list[Vm]:
    expect_mapping(g, path, "inventory.generate", GENERATE_KEYS, ("count", "mix"))
    count = expect_int(g["count"], path, "inventory.generate.count", 1, 1_000_000)
    seed = expect_int(g.get("seed", 1), path, "inventory.generate.seed", 0, 2**32 - 1)
    mix = expect_list(g["mix"], path, "inventory.generate.mix", "{image, memory, weight, ...}",
                      nonempty=True)
    templates, weights = [], []
    for i, e in enumerate(mix):
        key = f"inventory.generate.mix[{i}]"
        templates.append(_vm_template(e, path, key, MIX_KEYS))
        weights.append(expect_number(e.get("weight", 1), path, f"{key}.weight", 0.0, lo_open=True))
    w = np.array(weights) / sum(weights)
    picks = np.random.default_rng(seed).choice(len(templates), size=count, p=w)
    return [names.numbered(templates[int(i)]) for i in picks]


def _libvirt(e: Any, path: str, key: str, names: _Names) -> list[Vm]:
    from guests.images import ImageError
    expect_mapping(e, path, key, LIBVIRT_KEYS, ("file",))
    f = expect_str(e["file"], path, f"{key}.file",
                   "the path of a host YAML written by `vmhost import libvirt`")
    p = Path(f) if Path(f).is_absolute() else Path(path).resolve().parent / f
    if not p.is_file():
        raise fail(path, f"{key}.file", f"no such file {f!r}")
    try:
        guests = load_config(p).guests
    except InputError as exc:
        raise fail(path, f"{key}.file", str(exc)) from None
    state = expect_enum(e.get("state", "running"), path, f"{key}.state", ("running", "all"))
    default = e.get("image")
    default_img = expect_image(default, path, f"{key}.image") if default is not None else None
    domain = expect_domain(e.get("domain", "default"), path, f"{key}.domain")
    out = []
    for j, g in enumerate(guests):
        if state == "running" and not g.running:
            continue
        if g.image is None and default is None:
            raise fail(path, f"{key}.image", f"guest {g.name!r} names no image: give a default image")
        try:
            # a guest's own image path is relative to its host file
            img = expect_image(g.image, str(p), f"guests[{j}].image") if g.image else default_img
            img.class_pages(g.memory_mib)
        except ImageError as exc:
            raise fail(path, f"{key}.file", f"guests[{j}]: too small for image ({exc})") from None
        except InputError as exc:
            raise fail(path, f"{key}.file", _strip(exc, str(p))) from None
        out.append(names.add(Vm(g.name, _image_ref(img, g.image or default), g.memory_mib, domain,
                                g.nosharepages or g.hugepages, g.locked or g.hugepages,
                                f"{key}.file", img)))
    return out


# ------------------------------------------------------------------------------------------
# simulation

def _simulation(s: Any, path: str) -> Simulation:
    expect_mapping(s, path, "simulation", SIMULATION_KEYS)
    sim = Simulation()
    sim.resolution = expect_int(s.get("resolution", 1), path, "simulation.resolution", 1, 1 << 16)
    sim.seed = expect_int(s.get("seed", 1), path, "simulation.seed", 0, 2**32 - 1)
    sim.boot = expect_enum(s.get("boot", "staggered"), path, "simulation.boot", BOOTS)
    if "write_period" in s:
        parse_duration_ns(s["write_period"], path, "simulation.write_period")
        sim.write_period = s["write_period"]
    if s.get("settle") is not None:
        st = expect_mapping(s["settle"], path, "simulation.settle", SETTLE_KEYS)
        if "time" in st:
            if any(k in st for k in ("scans", "tolerance", "max_scans")):
                raise fail(path, "simulation.settle", "give either time or scans/tolerance/max_scans")
            parse_duration_ns(st["time"], path, "simulation.settle.time")
        scans = expect_int(st.get("scans", 2), path, "simulation.settle.scans", 1, 100)
        expect_number(st.get("tolerance", 0.001), path, "simulation.settle.tolerance", 0.0, 1.0)
        expect_int(st.get("max_scans", 30), path, "simulation.settle.max_scans", scans + 2, 100_000)
        sim.settle = dict(st)
    return sim


def _check_fit(scn: Scenario, path: str) -> None:
    """Every VM fits an empty host of some model by its configured memory."""
    room = max(scn.room_pages.values())
    for vm in scn.vms:
        if vm.memory_mib * PAGES_PER_MIB > room:
            raise fail(path, vm.where, f"VM {vm.name} ({vm.memory_mib} MiB) fits no host model "
                                       f"(the most room is {room // PAGES_PER_MIB} MiB, after the reserve and "
                                       f"what the kernel keeps free)")


def _check_resolution(scn: Scenario, path: str) -> None:
    r = scn.sim.resolution
    if r == 1:
        return
    key = "simulation.resolution"
    for vm in scn.vms:
        if vm.memory_mib % r:
            raise fail(path, key, f"{r} does not divide the memory of VM {vm.name} ({vm.memory_mib} MiB)")
    for m in scn.models:
        c = m.config
        if c.policy and (why := resolution_refusal(c.policy[0], r)):
            raise fail(path, f"hosts[{m.index}].policy.name", why)
        if c.block_pages % r:
            raise fail(path, key, f"{r} does not divide host model {m.name!r}'s block size "
                                  f"({c.block_pages} pages)")
        for n in c.topology.nodes:
            if (n.mem_bytes // PAGE_SIZE) % r:
                raise fail(path, key, f"{r} does not divide node {n.id}'s memory of host model {m.name!r}")
        for s in c.swap:
            if s["pages"] < r:
                raise fail(path, key, f"swap device {s['name']} of host model {m.name!r} is smaller "
                                      f"than {r} pages")
