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

from guests.errors import InputError
from guests.resolve import expect_image
from guests.schema import (ABSENT, SchemaError, Section, expect_bool, expect_domain, expect_enum,
                           expect_int, expect_list, expect_mib, expect_new_name, expect_number,
                           expect_section, expect_str, fail, is_percentage, parse_duration_ns,
                           parse_percentage, parse_size, read_yaml, rule)
from hw.units import PAGE_SIZE, PAGES_PER_MIB
from vmhost.config import HostConfig, load_config, parse_host_config
from vmhost.density.config import parse_settle
from vmhost.policies import resolution_refusal

POLICIES = ("first-fit", "first-fit-ksm", "sharing-aware")
BOOTS = ("staggered", "together")
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
# the document: a scenario's sections (SCENARIO) and the sweep (FLEET)

def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(read_yaml(path), str(path))


def parse_fleet(doc: Any, path: str) -> Fleet:
    """Every scenario of the document, validated; raises InputError on the first mistake."""
    top = FLEET.fill(doc, path, "", _Document())
    first = _scenario(top, path, "base", None)
    if top.sweep is None:
        return Fleet(path, [first])
    key, values = top.sweep.key, top.sweep.values
    base = {k: v for k, v in doc.items() if k != "sweep"}
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


@dataclass
class _Sweep:
    key: str = ""
    values: list = field(default_factory=list)


SWEEP = Section(
    rule("key", expect_str, "a dotted key path such as placement.policy", required=True),
    rule("values", expect_list, nonempty=True, required=True),
)


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
    """The scenario a document without a sweep describes (``value``: the swept value)."""
    return _scenario(SCENARIO.fill(doc, path, "", _Document()), path, name, value)


def _scenario(doc: "_Document", path: str, name: str, value: Any) -> Scenario:
    """The scenario of a document's read sections, once its VMs are checked against its host
    models (resolution, room after the reserve and the watermarks, fit)."""
    models, vms, pl = doc.models, doc.vms, doc.placement
    scn = Scenario(name, value, models, vms, pl.policy, sim=doc.sim)
    _check_resolution(scn, path)
    if scn.sim.resolution > 1:
        scn.notes.append(f"every host and VM simulated at 1/{scn.sim.resolution} of its pages; "
                         f"page counts and CPU scaled back x{scn.sim.resolution}")
    reserve = pl.reserve
    for m in models:
        kept = m.kept_free_pages(scn.sim.resolution)
        scn.room_pages[m.index] = m.ram_pages - _reserve(reserve, m, path) - kept
        if scn.room_pages[m.index] <= 0:
            raise fail(path, "placement.reserve", f"{reserve!r} leaves no room on host model {m.name!r} "
                                                  f"({m.ram_pages // PAGES_PER_MIB} MiB, of which the kernel "
                                                  f"keeps {kept // PAGES_PER_MIB} MiB free)")
    _check_fit(scn, path)
    return scn


@dataclass
class _Placement:
    policy: str = "sharing-aware"
    reserve: Any = "5%"          # checked against each host model (``_reserve``)


PLACEMENT = Section(
    rule("policy", expect_enum, POLICIES, default="sharing-aware"),
    rule("reserve", lambda value, path, key: value),
)


# ------------------------------------------------------------------------------------------
# host models

@dataclass
class _Model:
    """A ``hosts[i]`` entry being read (``taken``: the names of the models before it)."""
    taken: set
    name: str = ""
    count: int | None = None
    doc: dict = field(default_factory=dict)      # its host, ksm and policy sections, as written


def _model_name(value: Any, path: str, key: str, model: _Model) -> None:
    model.name = expect_new_name(value, path, key, model.taken, "host models")


def _model_count(value: Any, path: str, key: str, model: _Model) -> None:
    if value is not ABSENT and value is not None:
        model.count = expect_int(value, path, key, 1, 1_000_000)


def _host_section(value: Any, path: str, key: str, model: _Model) -> None:
    """Kept as written, read by ``parse_host_config`` once the model's keys are read."""
    if value is not ABSENT:
        model.doc[key.rsplit(".", 1)[1]] = copy.deepcopy(value)


MODEL = Section(
    rule("name", apply=_model_name, required=True),
    rule("count", apply=_model_count),
    rule("host", apply=_host_section, required=True),
    rule("ksm", apply=_host_section),
    rule("policy", apply=_host_section),
)


def _models(entries: Any, path: str, key: str) -> list[HostModel]:
    expect_list(entries, path, key, "host models", nonempty=True)
    out, names = [], set()
    for i, m in enumerate(entries):
        where = f"{key}[{i}]"
        model = MODEL.fill(m, path, where, _Model(names))
        try:
            cfg = parse_host_config(model.doc, path)
        except SchemaError as exc:
            raise InputError(f"{path}: {where}.{_strip(exc, path)}") from None
        out.append(HostModel(i, model.name, model.count, model.doc, cfg))
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


@dataclass
class _Entry:
    """An inventory entry being read: a VM template, with its count or its weight."""
    where: str
    img: Any = None
    image: str = ""
    memory_mib: int = 0
    count: int = 1
    weight: float = 1.0
    domain: str = "default"
    nosharepages: bool = False
    locked: bool = False
    name: str = ""

    def vm(self) -> Vm:
        return Vm(self.name, self.image, self.memory_mib, self.domain, self.nosharepages,
                  self.locked, self.where, self.img)


def _entry_image(value: Any, path: str, key: str, t: _Entry) -> None:
    t.img = expect_image(value, path, key)
    t.image = _image_ref(t.img, value)


def _entry_memory(value: Any, path: str, key: str, t: _Entry) -> None:
    t.memory_mib = t.img.memory_mib if value is ABSENT else expect_mib(value, path, key)
    try:
        t.img.class_pages(t.memory_mib)
    except ValueError as exc:
        raise fail(path, key, f"too small for image {t.img.name!r} ({exc})") from None


def _entry_name(value: Any, path: str, key: str, t: _Entry) -> None:
    t.name = expect_str(t.img.name if value is ABSENT else value, path, key, "a non-empty name prefix")


_IMAGE, _MEMORY, _NAME = (rule("image", apply=_entry_image, required=True),
                          rule("memory", apply=_entry_memory), rule("name", apply=_entry_name))
_FLAGS = (rule("domain", expect_domain, default="default"),
          rule("nosharepages", expect_bool, default=False),
          rule("locked", expect_bool, default=False))
VM = Section(_IMAGE, _MEMORY, rule("count", expect_int, 1, 1_000_000, default=1), *_FLAGS, _NAME)
MIX = Section(_IMAGE, _MEMORY, rule("weight", expect_number, 0.0, lo_open=True, default=1), *_FLAGS, _NAME)


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


@dataclass
class _Inventory:
    """The inventory being read: its VMs so far and their names."""
    names: _Names
    vms: list[Vm] = field(default_factory=list)


def _inline_vms(value: Any, path: str, key: str, inv: _Inventory) -> None:
    for i, e in enumerate(expect_list(value, path, key, "VMs")):
        t = VM.fill(e, path, f"{key}[{i}]", _Entry(f"{key}[{i}]"))
        inv.vms.extend(inv.names.numbered(t.vm()) for _ in range(t.count))


@dataclass
class _Generate:
    count: int = 0
    seed: int = 1
    mix: list[_Entry] = field(default_factory=list)


def _generate_mix(value: Any, path: str, key: str, g: _Generate) -> None:
    mix = expect_list(value, path, key, "{image, memory, weight, ...}", nonempty=True)
    g.mix = [MIX.fill(e, path, f"{key}[{i}]", _Entry(f"{key}[{i}]")) for i, e in enumerate(mix)]


GENERATE = Section(
    rule("count", expect_int, 1, 1_000_000, required=True),
    rule("seed", expect_int, 0, 2**32 - 1, default=1),
    rule("mix", apply=_generate_mix, required=True),
)


def _generate(value: Any, path: str, key: str, inv: _Inventory) -> None:
    if value is ABSENT:
        return
    g = GENERATE.fill(value, path, key, _Generate())
    w = np.array([t.weight for t in g.mix]) / sum(t.weight for t in g.mix)
    picks = np.random.default_rng(g.seed).choice(len(g.mix), size=g.count, p=w)
    inv.vms.extend(inv.names.numbered(g.mix[int(i)].vm()) for i in picks)


def _libvirt_hosts(value: Any, path: str, key: str, inv: _Inventory) -> None:
    for i, e in enumerate(expect_list(value, path, key, "{file, image, ...}")):
        inv.vms.extend(_libvirt(e, path, f"{key}[{i}]", inv.names))


INVENTORY = Section(
    rule("vms", apply=_inline_vms, default=[]),
    rule("generate", apply=_generate),
    rule("libvirt", apply=_libvirt_hosts, default=[]),
)


def _inventory(inv: Any, path: str, key: str) -> list[Vm]:
    vms = INVENTORY.fill(inv, path, key, _Inventory(_Names(path))).vms
    if not vms:
        raise fail(path, key, "no VMs (give vms, generate or libvirt)")
    return vms


@dataclass
class _LibvirtHost:
    """An ``inventory.libvirt[i]`` entry being read."""
    file: Path | None = None
    guests: list = field(default_factory=list)
    image: Any = None                    # the default image, as written
    img: Any = None
    domain: str = "default"
    state: str = "running"


def _libvirt_file(value: Any, path: str, key: str, h: _LibvirtHost) -> None:
    f = expect_str(value, path, key, "the path of a host YAML written by `vmhost import libvirt`")
    h.file = Path(f) if Path(f).is_absolute() else Path(path).resolve().parent / f
    if not h.file.is_file():
        raise fail(path, key, f"no such file {f!r}")
    try:
        h.guests = load_config(h.file).guests
    except InputError as exc:
        raise fail(path, key, str(exc)) from None


def _libvirt_image(value: Any, path: str, key: str, h: _LibvirtHost) -> None:
    if value is not ABSENT and value is not None:
        h.image, h.img = value, expect_image(value, path, key)


LIBVIRT = Section(
    rule("file", apply=_libvirt_file, required=True),
    rule("image", apply=_libvirt_image),
    rule("domain", expect_domain, default="default"),
    rule("state", expect_enum, ("running", "all"), default="running"),
)


def _libvirt(e: Any, path: str, key: str, names: _Names) -> list[Vm]:
    from guests.images import ImageError
    h = LIBVIRT.fill(e, path, key, _LibvirtHost())
    p, guests, state, default, default_img, domain = h.file, h.guests, h.state, h.image, h.img, h.domain
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

def _checked_duration(value: Any, path: str, key: str) -> Any:
    """The duration as written (each host's simulation parses it), once checked."""
    parse_duration_ns(value, path, key)
    return value


def _settle(value: Any, path: str, key: str) -> dict | None:
    """The settle mapping as written (each host's simulation parses it), once checked."""
    if value is None:
        return None
    parse_settle(value, path, key)
    return dict(value)


SIMULATION = Section(
    rule("resolution", expect_int, 1, 1 << 16, default=1),
    rule("seed", expect_int, 0, 2**32 - 1, default=1),
    rule("settle", _settle),
    rule("write_period", _checked_duration),
    rule("boot", expect_enum, BOOTS, default="staggered"),
)


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


# ------------------------------------------------------------------------------------------
# the document's sections, in the order they are read

@dataclass
class _Document:
    """A fleet document being read."""
    models: list[HostModel] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)
    placement: _Placement = field(default_factory=_Placement)
    sim: Simulation = field(default_factory=Simulation)
    sweep: _Sweep | None = None


SCENARIO = Section(              # what one scenario reads (a sweep's scenario: its copy of these)
    rule("hosts", _models, attr="models", required=True),
    rule("inventory", _inventory, attr="vms", required=True),
    rule("placement", expect_section, PLACEMENT, _Placement, default=None),
    rule("simulation", expect_section, SIMULATION, Simulation, attr="sim", default=None),
)
FLEET = Section(*SCENARIO.keys, rule("sweep", expect_section, SWEEP, _Sweep))
