"""The analytic curves: (a) no KSM and (c) ideal merging, from the guests' own contents.

(a) a guest's footprint is the frames it writes (boot writes plus its steady-state hot set;
all of its RAM if locked); with host THP (``always`` or ``madvise``, QEMU madvises guest RAM)
every 2 MiB range it touches is a whole huge page. (c) merges every identical page: the
distinct non-zero contents of all mergeable guests (a hot-set frame is counted as its own
content: it is rewritten with contents nobody has) plus the zero page handling: one KSM page
(``use_zero_pages=0``) or none (``use_zero_pages=1``); non-mergeable guests count their whole
footprint. Both are counted at the simulated scale; the caller scales them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hw.units import HPAGE_PAGES


def distinct(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a``, by a sort (numpy 2's ``np.unique`` hashes, which
    took 10 s of a 3 x 4 GiB density run for what a sort does in a fraction of a second)."""
    s = np.sort(a)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


@dataclass
class GuestFacts:
    footprint: int          # frames allocated without merging (simulated scale)
    mergeable: bool
    contents: np.ndarray    # non-zero content ids of resident mergeable frames (boot contents;
                            # hot frames get a content of their own)
    zero_frames: int        # resident frames reading zero (mergeable guests)


def guest_facts(gm, entry, thp: bool) -> GuestFacts:
    """What guest memory ``gm`` of mix entry ``entry`` needs without KSM and merged ideally."""
    res = gm.touched.copy()
    hot = np.zeros(gm.pages, dtype=bool)
    for _c, frames, _rate in gm.steady:
        hot[frames] = True
    res |= hot
    if entry.locked:
        res[:] = True
    if thp and not entry.locked:
        ranges = distinct(np.flatnonzero(res) // HPAGE_PAGES)
        footprint = int(sum(min(HPAGE_PAGES, gm.pages - r * HPAGE_PAGES) for r in ranges.tolist()))
    else:
        footprint = int(res.sum())
    mergeable = not entry.nosharepages
    cont = gm.content.copy()
    idx = np.flatnonzero(res)
    c = cont[idx]
    hot_r = hot[idx]
    # a hot frame is rewritten with contents nobody has: a distinct marker per frame
    from guests.interning import key64
    salt = np.uint64(key64("density-hot", gm.name, gm.seed) | 1)
    with np.errstate(over="ignore"):
        c = np.where(hot_r, (idx.astype(np.uint64) + np.uint64(1)) * salt | np.uint64(1), c)
    return GuestFacts(footprint, mergeable, c[c != 0], int(np.count_nonzero(c == 0)))


def curve_pages(facts: list[GuestFacts], use_zero_pages: bool):
    """(guests, no-KSM pages, ideal pages) for the first 1, 2, ... guests (simulated scale)."""
    noksm = 0
    seen = np.zeros(0, dtype=np.uint64)
    nonmerge = 0
    zero_any = False
    for n, f in enumerate(facts, start=1):
        noksm += f.footprint
        if f.mergeable:
            seen = distinct(np.concatenate([seen, f.contents]))
            zero_any = zero_any or f.zero_frames > 0
        else:
            nonmerge += f.footprint
        yield n, noksm, len(seen) + nonmerge + (1 if zero_any and not use_zero_pages else 0)


def ideal_now(guests, use_zero_pages: bool) -> int:
    """Every identical page of the live guests' present contents merged (simulated scale)."""
    ids, other, zero = [], 0, False
    for g in guests:
        if not g.qp.proc.alive:
            continue
        c = g.gm.content[g.written]
        if g.entry.locked:
            c = g.gm.content
        if g.entry.nosharepages:
            other += len(c)
            continue
        zero = zero or bool((c == 0).any())
        ids.append(c[c != 0])
    n = len(distinct(np.concatenate(ids))) if ids else 0
    return n + other + (1 if zero and not use_zero_pages else 0)
