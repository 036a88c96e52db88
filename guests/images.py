"""Guest images: what a guest's RAM holds, by content class, deterministic from a seed.

A catalog image (``guests/catalog/*.yaml``) describes a guest's memory as *content classes*:

==========  ==================================================================  ============
class       what                                                                shared by
==========  ==================================================================  ============
zero        pages that read as zero (free memory; Windows zeroes all of it)    (id 0)
kernel      kernel text and data                                                same kernel build
pagecache   page cache of packages (binaries, libraries, data files)           same package set
app         application data common to every instance of one application       same app
unique      per-guest data (heaps, buffers, logs)                               nobody
pattern     a few repeated fill patterns (poisoned/initialised memory)          same kernel build
==========  ==================================================================  ============

Each class has a size (``fraction`` of guest RAM, or ``mib``; the zero class gets the rest),
``distinct`` (fraction of its pages with distinct contents; below 1 the guest shares pages with
itself), ``pool`` (cross-guest classes: the population of pages the guest draws its pages from,
relative to its own; 1 = every guest holds the same pages, 2 = two guests overlap by about
half; a guest holds whole runs of the population, ``held_runs``, so that a guest at 1/N holds
the same part of it as at full size), a boot phase (``boot.touched``: fraction of the class's pages written at boot -- the host
allocates only those; a Windows guest zeroes all its RAM: ``zero.boot.touched: 1``) and a
steady-state write model (``steady.rate`` pages rewritten per second, over a hot set of
``steady.hot`` of the class's pages; a rewritten page gets content nobody else has).

Sharing domains: every non-zero content id is salted by the guest's ``domain`` (a tenant), so
guests in different domains never share a non-zero page (salted page sharing, as VMware does
by default since 2015). Content ids are 64-bit (``guests.interning``): the top byte names the
class, so different classes never collide; 0 is the zero page.

Imported dumps are images too: :func:`from_dump` wraps a ``guests.dumps.GuestImage`` whose
fingerprints are interned (one :class:`guests.interning.Interner` per run, so equal pages of
different dumps get equal ids); a mix entry naming an imported dump boots a
:class:`guests.dump_guest.DumpImage` (which :meth:`GuestMemory.build` hands its own pages), and
``guests.resolve`` is where a mix's ``image:`` value becomes one of these.

This module knows nothing about the host (``vmhost`` consumes :class:`GuestMemory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from guests.interning import Interner, key64, tagged
from guests.errors import InputError
from guests.schema import SchemaError, Section, expect_number, fail, nested, read_yaml, rule, sub
from hw.units import PAGES_PER_MIB

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"


@dataclass(frozen=True)
class ContentClass:
    """A content class: ``shared_by``, the image field whose value guests share its pages by
    (None: no guest shares them; the zero class is id 0); ``tag``, the ``guests.interning``
    tag of its content ids (the top byte, so that two classes never collide)."""
    name: str
    shared_by: str | None
    tag: str


#: The content classes, in layout order (the table above). Adding one is adding a row here
#: (with a new tag in ``guests.interning.TAGS``, and the field it is shared by in ``Image`` with its
#: row in ``IMAGE``).
CONTENT_CLASSES = (
    ContentClass("zero", None, ""),
    ContentClass("kernel", "kernel", "kernel"),
    ContentClass("pagecache", "packages", "pagecache"),
    ContentClass("app", "app", "app"),
    ContentClass("unique", None, "unique"),
    ContentClass("pattern", "kernel", "boot_fill"),
)
CLASSES = tuple(c.name for c in CONTENT_CLASSES)
SHARED_KEY = {c.name: c.shared_by for c in CONTENT_CLASSES if c.shared_by}
_TAG = {c.name: c.tag for c in CONTENT_CLASSES}
DEFAULT_CHUNK = 16            # pages per layout chunk (64 KiB): classes interleave in RAM
POOL_RUNS = 1024              # runs (files) a shared class's population is made of (held_runs)


class ImageError(InputError, ValueError):
    """A catalog entry that cannot be used (one-line message naming the file and field)."""


@dataclass
class ClassSpec:
    name: str
    fraction: float | None = None
    mib: float | None = None
    distinct: float = 1.0
    pool: float = 1.0
    boot_touched: float = 1.0
    steady_rate: float = 0.0      # pages rewritten per second
    steady_hot: float = 0.0       # fraction of the class's pages that are rewritten


@dataclass
class Image:
    name: str
    description: str
    memory_mib: int
    classes: dict[str, ClassSpec]
    kernel: str = "kernel"
    packages: str = "packages"
    app: str = "app"
    os: str = "linux"
    chunk_pages: int = DEFAULT_CHUNK
    assumptions: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    expect: dict = field(default_factory=dict)
    path: str | None = None

    def class_pages(self, memory_mib: int | None = None) -> dict[str, int]:
        """Pages of each class for a guest of ``memory_mib`` (default: the image's size)."""
        total = (memory_mib or self.memory_mib) * PAGES_PER_MIB
        out, used = {}, 0
        for name, c in self.classes.items():
            if name == "zero":
                continue
            n = int(round(c.mib * PAGES_PER_MIB)) if c.mib is not None else \
                int(round((c.fraction or 0.0) * total))
            out[name] = n
            used += n
        if used > total:
            raise ImageError(f"{self.path or self.name}: classes need {used} pages, the guest "
                             f"has {total}")
        out["zero"] = total - used
        return out

    def instantiate(self, name: str = "guest", seed: int = 0, domain: str = "default",
                    memory_mib: int | None = None) -> "GuestMemory":
        return GuestMemory.build(self, name, seed, domain, memory_mib or self.memory_mib)


# ------------------------------------------------------------------------------------------
# the image file: one rule per key (guests.schema.Section)

def _name(value, path: str, key: str, default: str) -> str:
    """A name (a string, or a number used as one); null is ``default``."""
    if value is None:
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise fail(path, key, "expected a non-empty name")
    return str(value)


def _whole(value, path: str, key: str, lo: int) -> int:
    """A whole number at least ``lo`` (written as an integer or as a float such as 64.0)."""
    v = expect_number(value, path, key, lo)
    if v != int(v):
        raise fail(path, key, f"{value!r} is not a whole number")
    return int(v)


def _strings(value, path: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise fail(path, key, "expected a list of strings")
    return list(value)


BOOT = Section(rule("touched", expect_number, 0, 1, attr="boot_touched"))
STEADY = Section(rule("rate", expect_number, 0, attr="steady_rate"),
                 rule("hot", expect_number, 0, 1, attr="steady_hot"))
CLASS = Section(                 # a ClassSpec's fields; the zero class needs no size
    rule("fraction", expect_number, 0, 1),
    rule("mib", expect_number, 0),
    rule("distinct", expect_number, 0, 1),
    rule("pool", expect_number, 1),
    rule("boot", apply=nested(BOOT)),
    rule("steady", apply=nested(STEADY)),
)
#: What a catalog entry tells its tests to expect (values kept as written; ``tests/guests/test_images.py``).
EXPECT = Section(*(rule(k) for k in ("zero_fraction", "ideal_sharing_3", "sharing_fraction_2",
                                      "self_fraction_min", "zero_touched_min",
                                      "cross_image_sharing_max", "measured")))


def _class(cname, value, path: str, key: str) -> ClassSpec:
    if cname not in CLASSES:
        raise fail(path, "classes", f"unknown class {cname!r} (known: {', '.join(CLASSES)})")
    spec = CLASS.fill(value or {}, path, key, ClassSpec(cname))
    if cname != "zero" and spec.fraction is None and spec.mib is None:
        raise fail(path, key, "needs fraction or mib")
    if spec.distinct == 0 and cname != "zero":
        raise fail(path, f"{key}.distinct", "must be above 0")
    return spec


def _classes(value, path: str, key: str) -> dict[str, ClassSpec]:
    if not isinstance(value, dict):
        raise fail(path, key, "a mapping of class name -> settings")
    classes = {c: _class(c, v, path, sub(key, str(c))) for c, v in value.items()}
    classes.setdefault("zero", ClassSpec("zero", boot_touched=0.0))
    return classes


def _expect(value, path: str, key: str) -> dict:
    return dict(EXPECT.check(value or {}, path, key))


IMAGE = Section(                 # an Image's fields, in the order they are read
    rule("name", _name, "", required=True),
    rule("description", _name, "", default=None),
    rule("memory_mib", _whole, 1, required=True),
    rule("classes", _classes, required=True),
    rule("kernel", _name, "kernel", default=None),
    rule("packages", _name, "packages", default=None),
    rule("app", _name, "app", default=None),
    rule("os", _name, "linux", default=None),
    rule("chunk_pages", _whole, 1, default=DEFAULT_CHUNK),
    rule("assumptions", _strings, default=[]),
    rule("sources", _strings, default=[]),
    rule("expect", _expect, default={}),
)


def parse_image(data: dict, path: str = "<image>") -> Image:
    """The image a catalog document describes; ImageError (one line: file, key, reason) if
    the document breaks the table above or its classes need more pages than the guest has."""
    try:
        img = Image(**vars(IMAGE.fill(data, path, "", SimpleNamespace())), path=path)
    except SchemaError as exc:
        raise ImageError(str(exc)) from None
    img.class_pages()            # validates the sizes
    return img


def load_image(path: str | Path) -> Image:
    """Read an image file (YAML; a duplicate key or an unknown field is an ImageError)."""
    try:
        data = read_yaml(path)
    except SchemaError as exc:
        raise ImageError(str(exc)) from None
    return parse_image(data, str(path))


def catalog(directory: str | Path | None = None) -> dict[str, Image]:
    """Every image of the catalog directory, by name."""
    d = Path(directory) if directory else CATALOG_DIR
    out = {}
    for p in sorted(d.glob("*.yaml")):
        img = load_image(p)
        if img.name in out:
            raise ImageError(f"{p}: image name {img.name!r} is also used by {out[img.name].path}")
        out[img.name] = img
    return out


def get_image(name: str) -> Image:
    cat = catalog()
    if name not in cat:
        raise ImageError(f"no guest image {name!r} (catalog: {', '.join(sorted(cat))})")
    return cat[name]


# --------------------------------------------------------------------------------------------
# One guest's memory


@dataclass
class GuestMemory:
    """The contents of one guest's RAM: per guest frame, its class, boot content and whether
    the guest writes it at boot; plus the steady-state writer."""

    name: str
    image: str
    seed: int
    domain: str
    pages: int
    class_names: tuple[str, ...]
    klass: np.ndarray            # (pages,) int8 index into class_names
    content: np.ndarray          # (pages,) uint64 content id after boot
    touched: np.ndarray          # (pages,) bool: written at boot (the host allocates it)
    steady: list[tuple[str, np.ndarray, float]] = field(default_factory=list)  # (class, hot gpfns, rate)
    _versions: int = 0
    _keys: dict = field(default_factory=dict, repr=False)     # stream keys, computed once

    def _key(self, *parts) -> int:
        k = self._keys.get(parts)
        if k is None:
            k = self._keys[parts] = key64(*parts)
        return k

    @classmethod
    def build(cls, img: Image, name: str, seed: int, domain: str, memory_mib: int) -> "GuestMemory":
        own = getattr(img, "build_memory", None)
        if own is not None:          # an image that knows its pages (guests.dump_guest)
            return own(name, seed, domain, memory_mib)
        sizes = img.class_pages(memory_mib)
        total = memory_mib * PAGES_PER_MIB
        rng = np.random.default_rng([seed & 0xFFFFFFFF, key64(name) & 0xFFFFFFFF])
        names = tuple(c for c in CLASSES if c in sizes)
        # layout: classes interleaved in chunks, in a seeded order
        chunk = img.chunk_pages
        labels = np.concatenate([np.full(sizes[c], i, dtype=np.int8) for i, c in enumerate(names)])
        nchunks = -(-total // chunk)
        pad = nchunks * chunk - total
        lab = np.concatenate([labels, np.full(pad, -1, dtype=np.int8)]).reshape(nchunks, chunk)
        klass = lab[rng.permutation(nchunks)].reshape(-1)
        klass = klass[klass >= 0]
        content = np.zeros(total, dtype=np.uint64)
        touched = np.zeros(total, dtype=bool)
        steady = []
        for i, cname in enumerate(names):
            spec = img.classes[cname]
            gpfns = np.flatnonzero(klass == i)
            n = len(gpfns)
            if n == 0:
                continue
            if cname != "zero":
                content[gpfns] = _class_ids(img, spec, cname, n, domain, name, seed, rng)
            k = int(round(spec.boot_touched * n))
            if k:
                touched[gpfns[np.sort(rng.choice(n, k, replace=False))]] = True
            if spec.steady_rate > 0 and spec.steady_hot > 0:
                hot = gpfns[np.sort(rng.choice(n, max(1, int(round(spec.steady_hot * n))),
                                               replace=False))]
                steady.append((cname, hot, spec.steady_rate))
        return cls(name, img.name, seed, domain, total, names, klass, content, touched, steady)

    # -- what the guest does --------------------------------------------------------------
    def boot_writes(self) -> tuple[np.ndarray, np.ndarray]:
        """Guest frames written at boot and their contents (zero pages written as 0)."""
        g = np.flatnonzero(self.touched)
        return g, self.content[g]

    def steady_step(self, now_ns: int, dt_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Writes of one period of ``dt_ns`` at ``now_ns``: deterministic in (seed, now)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(now_ns // 1000) & 0xFFFFFFFF,
                                     self._key(self.name) & 0xFFFFFFFF])
        gs, cs = [], []
        for cname, hot, rate in self.steady:
            expect = rate * dt_ns / 1e9
            n = int(expect) + (1 if rng.random() < expect - int(expect) else 0)
            if n <= 0:
                continue
            g = hot[rng.integers(0, len(hot), n)]
            self._versions += n
            # every rewrite gets a content never seen before: the guest's running count of
            # rewrites is unique on its own (times would overflow 64 bits within hours)
            ids = tagged("rewrite", self._key(self.domain, self.name, self.seed, cname),
                         np.arange(self._versions - n, self._versions))
            gs.append(g)
            cs.append(ids)
            self.content[g] = ids
        if not gs:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return np.concatenate(gs), np.concatenate(cs)

    def warm_writes(self) -> tuple[np.ndarray, np.ndarray]:
        """One rewrite of every frame of every hot set: where a guest that has run for a while
        stands (its hot frames hold contents of their own), without waiting for its writers."""
        gs, cs = [], []
        for cname, hot, _rate in self.steady:
            n = len(hot)
            self._versions += n
            ids = tagged("rewrite", self._key(self.domain, self.name, self.seed, cname),
                         np.arange(self._versions - n, self._versions))
            self.content[hot] = ids
            gs.append(hot)
            cs.append(ids)
        if not gs:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return np.concatenate(gs), np.concatenate(cs)

    # -- statistics -------------------------------------------------------------------------
    def class_counts(self) -> dict[str, int]:
        return {c: int(np.count_nonzero(self.klass == i)) for i, c in enumerate(self.class_names)}


def _class_ids(img: Image, spec: ClassSpec, cname: str, n: int, domain: str, guest: str,
               seed: int, rng) -> np.ndarray:
    """Content ids of a class's ``n`` pages in one guest."""
    distinct = max(1, int(math.ceil(spec.distinct * n)))
    if SHARED_KEY.get(cname) is None:                 # each guest's own
        stream = key64(cname, domain, img.name, guest, seed)
        pop = distinct
    else:
        stream = key64(cname, domain, getattr(img, SHARED_KEY[cname]))
        pop = int(math.ceil(distinct * spec.pool))
    # which of the population's contents this guest holds (the same ones when pool = 1)
    held = np.arange(distinct) if pop == distinct else \
        held_runs(pop, distinct, key64(stream, "held", guest, seed))
    # self-duplicates: the remaining pages repeat contents the guest already holds; repeats
    # are drawn by a key that does not depend on the guest, so that identical guests repeat
    # the same contents
    extra = n - distinct
    if extra > 0:
        dup_rng = np.random.default_rng(key64(stream, "dups") & 0xFFFFFFFF) if cname in SHARED_KEY \
            else rng
        if distinct <= 16:
            reps = held[np.arange(extra) % distinct]
        else:
            reps = held[np.sort(dup_rng.integers(0, distinct, extra))]
        idx = np.concatenate([held, reps])
    else:
        idx = held
    return tagged(_TAG[cname], stream, idx)


def held_runs(pop: int, distinct: int, key: int) -> np.ndarray:
    """The ``distinct`` contents (indices into a population of ``pop``) that one guest holds of
    a shared class: the population is cut into ``POOL_RUNS`` runs of consecutive contents (a
    run stands for a file or a group of files of the page cache or the application), the guest
    takes whole runs in an order drawn from ``key`` (the guest's own, not the resolution's:
    the same draw at every 1/N), and the first contents of one more run to make up the count.

    Two guests of one pool then share the runs both took; with ``pop / distinct = pool`` they
    share 1/pool of their contents on average, as they would drawing contents one by one, but
    which part they share is a property of the guests, not of how many pages stand for them: a
    guest simulated at 1/N holds the same runs as at full size, and the union of any guests'
    contents is the same fraction of the population at every resolution (within one content a
    run). Drawn one by one at 1/N, the overlap had a sampling noise of about 1/sqrt(pages):
    the ideal merging of density-mix's first 13 guests spread over 0.43% of the host's capacity
    from 1/512 to 1/16 (1/512 the highest), which moved its counts; in runs, 0.14% from 1/1024
    to 1/1 and 0.05% from 1/256 to 1/1. A population of fewer than POOL_RUNS contents (a small
    class at a coarse resolution: linux-server's app class coarser than 1/128) has one content
    a run, and its draw is not the full-size one's.

    The price: two guests' overlap varies with the runs they drew (1024 runs: about 12% of the
    overlap, one standard deviation, for a pool of 5), where contents drawn one by one at full
    size overlap almost exactly by the mean; a page cache shares in files, not in pages."""
    runs = min(POOL_RUNS, pop)
    edges = np.arange(runs + 1, dtype=np.int64) * pop // runs
    order = np.random.default_rng(key).permutation(runs)
    sizes = np.diff(edges)[order]
    whole = int(np.searchsorted(np.cumsum(sizes), distinct, side="right"))
    parts = [np.arange(edges[j], edges[j + 1]) for j in order[:whole].tolist()]
    rest = distinct - int(sizes[:whole].sum())
    if rest > 0:
        j = int(order[whole])
        parts.append(np.arange(edges[j], edges[j] + rest))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def from_dump(image, interner: Interner, name: str = "dump", domain: str = "default",
              zero_touched: bool = False) -> GuestMemory:
    """A ``guests.dumps.GuestImage`` as guest memory: content ids from the interner; frames
    with non-zero contents are written at boot, zero frames too if ``zero_touched``."""
    from guests.interning import salt_domain
    ids = salt_domain(interner.intern_image(image), domain)
    pages = int(image.pfn.max()) + 1 if image.pages else 0
    content = np.zeros(pages, dtype=np.uint64)
    pfn = image.pfn.astype(np.int64)
    content[pfn] = ids
    touched = np.zeros(pages, dtype=bool)
    touched[pfn] = (ids != 0) | zero_touched
    klass = np.where(content == 0, 0, 1).astype(np.int8)
    return GuestMemory(name, image.header.get("source", {}).get("path", "dump"), 0, domain, pages,
                       ("zero", "dump"), klass, content, touched)


def sharing(memories: list[GuestMemory]) -> dict:
    """Ideal sharing among the boot contents of the touched pages (excluding zero pages):
    total, per guest (self) and across guests, as fractions of all guest memory too."""
    allc = np.concatenate([m.content[m.touched] for m in memories])
    nz = allc[allc != 0]
    total_pages = sum(m.pages for m in memories)
    ideal = int(len(nz) - len(np.unique(nz)))
    self_s = 0
    for m in memories:
        c = m.content[m.touched]
        c = c[c != 0]
        self_s += int(len(c) - len(np.unique(c)))
    return {"pages": total_pages, "nonzero": int(len(nz)), "ideal_sharing": ideal,
            "self_sharing": self_s, "inter_sharing": ideal - self_s,
            "sharing_fraction": ideal / total_pages if total_pages else 0.0,
            "self_fraction_of_sharing": self_s / ideal if ideal else 1.0}
