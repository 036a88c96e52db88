"""A VM's expected KSM savings on a host, from its image's content classes (no simulation).

Placement has to compare thousands of (VM, host) pairs, so it cannot build guest memories;
it predicts, from the same class parameters that :class:`guests.images.GuestMemory` draws
contents from, what KSM would merge at steady state:

* a class of ``n`` pages, written at boot with probability ``t`` and rewritten (a hot page,
  given contents nobody has) with probability ``h``, has ``m = n t (1 - h)`` mergeable
  resident pages; a guest writes its hot set once at boot (the simulation's warm start), so
  ``n (1 - (1 - t)(1 - h))`` pages are resident before ksmd merges anything (all if locked);
* zero pages all merge (into one KSM page, or the zero page): ``m`` saved;
* a class with ``D0 = ceil(distinct n)`` distinct contents, each repeated ``n / D0`` times,
  keeps ``D = D0 (1 - (1 - f)^(n / D0))`` distinct contents among its ``f = t (1 - h)``
  resident fraction: ``m - D`` pages saved inside the guest (self-sharing);
* a cross-guest class (kernel, pattern, page cache, application data) draws its contents
  from a population shared by every guest of the same sharing domain and the same kernel
  build / package set / application (the content salt of :mod:`guests.images`), ``pool``
  times the guest's own: a guest holds a given content of the population resident with
  probability ``a = f / pool``. A new guest's contents are already on the host with
  probability ``1 - prod(1 - a_j)`` over the guests there, which is what it saves.

Guests with ``nosharepages`` save nothing and add nothing. The estimate errs low: a hot page
counts as never merged, although a slowly written one may stay merged between rewrites. Not
modelled: merge_across_nodes=0
on multi-node hosts (one copy per node), ksmd not reaching steady state, THP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from guests.images import SHARED_KEY
from hw.units import PAGES_PER_MIB



@dataclass(frozen=True)
class SavingsProfile:
    """What one VM brings to a host, for the estimate."""
    pages: int                                      # configured memory
    boot_pages: float                               # resident before any merging
    self_saved: float                               # pages saved inside the guest
    shared: tuple[tuple[tuple, float, float], ...]  # (content key, distinct resident D, a)


def savings_profile(img, memory_mib: int, domain: str, mergeable: bool, locked: bool = False) -> SavingsProfile:
    pages = memory_mib * PAGES_PER_MIB
    sizes = img.class_pages(memory_mib)
    written = sum(n * (1.0 - (1.0 - img.classes[c].boot_touched) * (1.0 - _hot(img.classes[c])))
                  for c, n in sizes.items())
    boot = float(pages) if locked else written
    if not mergeable:
        return SavingsProfile(pages, boot, 0.0, ())
    self_saved, shared = 0.0, []
    for cname, n in sizes.items():
        if n == 0:
            continue
        spec = img.classes[cname]
        h = _hot(spec)
        f = spec.boot_touched * (1.0 - h)
        m = n * f
        if cname == "zero":
            self_saved += m
            continue
        d0 = max(1, math.ceil(spec.distinct * n))
        d = d0 * (1.0 - (1.0 - f) ** (n / d0))
        self_saved += m - d
        if cname in SHARED_KEY:
            key = (cname, domain, getattr(img, SHARED_KEY[cname]))
            shared.append((key, d, f / spec.pool))
    return SavingsProfile(pages, boot, self_saved, tuple(shared))


def _hot(spec) -> float:
    """The fraction of a class's pages its steady-state writers rewrite."""
    return spec.steady_hot if spec.steady_rate > 0 else 0.0


@dataclass
class HostEstimate:
    """The running estimate for one host: for each content population, the probability that
    a given content of it is on none of the host's guests."""
    absent: dict[tuple, float] = field(default_factory=dict)
    saved: float = 0.0

    def saving(self, p: SavingsProfile) -> float:
        """Pages KSM would save by merging ``p``'s guest into this host."""
        return p.self_saved + self.cross_saving(p)

    def cross_saving(self, p: SavingsProfile) -> float:
        return sum(d * (1.0 - self.absent.get(k, 1.0)) for k, d, _a in p.shared)

    def add(self, p: SavingsProfile) -> None:
        self.saved += self.saving(p)
        for k, _d, a in p.shared:
            self.absent[k] = self.absent.get(k, 1.0) * (1.0 - min(a, 1.0))
