"""A real guest's memory dump used as a guest image: the guest's RAM is the dump's pages.

A density or fleet mix entry naming an image file written by ``vmhost guests import``
(``image: dumps/web1.vmimg``) boots guests whose memory is that dump, page for page: every
non-zero page of the dump is written at boot with the content id of its 128-bit fingerprint
(:func:`guests.interning.fingerprint_ids`, the same in every process, salted by the guest's
sharing domain), and the dump's zero pages are left untouched (the host never allocates them,
as with a guest that never wrote them; a dump cannot tell a zeroed page from one never used).
Guest frames are the dump's RAM pages in guest-physical order, packed (the PC holes a dump
leaves out are not frames); the guest's memory is the dump's RAM rounded up to a MiB.

Every guest booted from one dump holds the same pages: N of them share everything but
nothing of their own. That is right for clones of one snapshot; for N different VMs of one
kind, fit a profile (``vmhost guests profile``, :mod:`guests.profile`) and use that instead.
A dump guest has no steady-state writer.

:class:`DumpImage` is a :class:`guests.images.Image` (so the fleet's placement estimate
reads it as one): a ``zero`` class (untouched) and a ``kernel``-slot class holding the
non-zero pages with the dump's own self-sharing, keyed by the dump's digest, so that guests of
the same dump share all of it and guests of different dumps share nothing in the *estimate*
(the simulation matches pages by content, so it sees what different dumps really share).

At resolution N (density's ``resolution``) a guest keeps 1/N of the dump's pages: the non-zero
pages whose content id falls in one of N hash buckets (all copies of a content are kept or
dropped together, so self- and cross-guest sharing keep their proportions; a content with
very many copies makes this noisy at large N), then zero pages up to the scaled size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from guests.images import PAGES_PER_MIB, ClassSpec, GuestMemory, Image, ImageError
from guests.interning import fingerprint_ids, mix64, salt_domain


@dataclass
class DumpImage(Image):
    """A dump's pages as a guest image (see the module doc)."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))   # per RAM page
    dump_pages: int = 0          # RAM pages in the dump
    dump_mib: int = 0            # the guest's memory at full scale (the dump's, in MiB)
    digest: str = ""

    def class_pages(self, memory_mib: int | None = None) -> dict[str, int]:
        mem = memory_mib or self.memory_mib
        if mem != self.dump_mib and self.memory_mib == self.dump_mib:
            raise ImageError(f"{self.path}: a guest booted from a dump has the dump's memory, "
                             f"{self.dump_mib} MiB (asked for {mem} MiB)")
        return super().class_pages(mem)

    def instantiate(self, name: str = "guest", seed: int = 0, domain: str = "default",
                    memory_mib: int | None = None) -> GuestMemory:
        return self.build_memory(name, seed, domain, memory_mib or self.memory_mib)

    def build_memory(self, name: str, seed: int, domain: str, memory_mib: int) -> GuestMemory:
        """The guest's memory; ``memory_mib`` below the dump's means a resolution
        (dump_mib / memory_mib, a whole number)."""
        r = self.dump_mib // memory_mib if memory_mib else 0
        if r < 1 or r * memory_mib != self.dump_mib:
            raise ImageError(f"{self.path}: a guest booted from a dump of {self.dump_mib} MiB "
                             f"cannot have {memory_mib} MiB (only the dump's size / N)")
        pages = memory_mib * PAGES_PER_MIB
        ids = self.ids
        if r > 1:
            nz = ids != 0
            keep = _sample_nonzero(ids, r) & nz
            kept_nz = int(keep.sum())
            if kept_nz > pages:                 # a bucket far above 1/N: cut it to size
                keep[np.flatnonzero(keep)[pages:]] = False
                kept_nz = pages
            zeros = np.flatnonzero(~nz)
            want = min(pages - kept_nz, zeros.size)
            if want > 0:                        # zero frames evenly spread, as in the dump
                keep[zeros[np.linspace(0, zeros.size - 1, want).round().astype(np.int64)]] = True
            ids = ids[keep]
        content = np.zeros(pages, dtype=np.uint64)
        content[:ids.size] = salt_domain(ids, domain)
        touched = content != 0
        klass = np.where(touched, 1, 0).astype(np.int8)
        return GuestMemory(name, self.name, seed, domain, pages, ("zero", "kernel"), klass,
                           content, touched)


def _sample_nonzero(ids: np.ndarray, r: int) -> np.ndarray:
    """Which pages a guest keeps at resolution r (1 in r in expectation, per content): all
    copies of a content with fewer than r copies when its hash falls in bucket 0 of r (equal
    pages of other guests go the same way), every r-th copy of a content with more."""
    with np.errstate(over="ignore"):
        bucket = mix64(ids ^ np.uint64(0x5DEECE66D)) % np.uint64(r)
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    start = np.ones(s.size, dtype=bool)
    start[1:] = s[1:] != s[:-1]
    first = np.flatnonzero(start)
    counts = np.diff(np.append(first, s.size))
    group = np.cumsum(start) - 1
    rank = np.arange(s.size) - first[group]
    many = counts[group] >= r
    keep_sorted = np.where(many, rank % r == 0, bucket[order] == 0)
    keep = np.empty(ids.size, dtype=bool)
    keep[order] = keep_sorted
    return keep


def load_dump_image(path: str | os.PathLike) -> DumpImage:
    """An image file of ``vmhost guests import`` as a :class:`DumpImage`; DumpError if the
    file is not one."""
    from guests.dumps import load_fingerprints, sharing_stats
    gi = load_fingerprints(path)
    order = np.argsort(gi.pfn, kind="stable")
    fp, zero = gi.fingerprint[order], gi.zero[order]
    ids = np.where(zero, np.uint64(0), fingerprint_ids(fp))
    n = int(ids.size)
    if n == 0:
        raise ImageError(f"{path}: the image holds no RAM pages")
    st = sharing_stats(fp, zero)
    mib = -(-n // PAGES_PER_MIB)
    total = mib * PAGES_PER_MIB
    nonzero = st["nonzero_pages"]
    digest = hashlib.sha256(np.ascontiguousarray(fp).tobytes()).hexdigest()[:16]
    classes = {"zero": ClassSpec("zero", boot_touched=0.0)}
    if nonzero:
        classes["kernel"] = ClassSpec("kernel", fraction=nonzero / total,
                                      distinct=st["distinct_nonzero"] / nonzero, pool=1.0)
    name = os.path.basename(str(path))
    return DumpImage(name=name, description=f"memory dump {gi.header.get('source', {}).get('path', path)}",
                     memory_mib=mib, classes=classes, kernel=f"dump:{digest}",
                     path=os.path.abspath(str(path)), ids=ids, dump_pages=n, dump_mib=mib,
                     digest=digest)
