"""anon_vma and anon_vma_chain: how an anonymous page finds the VMAs mapping it.

Every anonymous page points (``owner``) at the anon_vma it was created in, and
remembers its linear index. An anon_vma lists, through anon_vma_chain links
(AVCs), every VMA that may map its pages. Reverse mapping walks that list and
turns the index back into an address in each VMA.

Two eras are modelled (``Profile.anon_vma_chains``):

- Since 2.6.34 a forked child VMA is chained to every anon_vma of its parent
  VMA (so inherited pages stay findable) and gets an anon_vma of its own for
  the pages it creates or copies on write. A page a child COWed is then found
  by walking only that child's anon_vma: one VMA plus the child's own
  descendants, instead of the whole family. Since 3.19 a child first tries to
  adopt an ancestor anon_vma that no VMA uses any more and that has fewer than
  two children, which bounds growth under repeated forking.
- Up to 2.6.33 a whole fork family shared one anon_vma: every child VMA joined
  the parent's list, and pages the children COWed were stamped with that same
  anon_vma, so every walk visited every VMA of the family.

An anon_vma lives while a VMA is chained to it or a reference (KSM rmap_items,
descendants pinning their root) holds it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from vmhost.mm.vma import Vma


class AnonVma:
    __slots__ = ("id", "root", "parent", "refcount", "num_children", "num_active_vmas", "vmas")

    def __init__(self, id: int, parent: "AnonVma | None" = None):
        self.id = id
        self.parent = parent if parent is not None else self
        self.root = parent.root if parent is not None else self
        self.refcount = 1              # dropped when the last chained VMA goes
        self.num_children = 0 if parent is not None else 1   # a root is its own parent
        self.num_active_vmas = 0       # VMAs whose own anon_vma this is
        self.vmas: dict["Vma", None] = {}   # the AVC list (an interval tree in the kernel)

    def __repr__(self) -> str:
        return f"AnonVma({self.id}, root={self.root.id}, vmas={len(self.vmas)})"

    def vmas_covering(self, index: int) -> Iterator["Vma"]:
        """Chained VMAs whose page-offset range contains ``index`` (the interval query; the
        frame's ``index``, its low bits: ``Vma.offsets_of``)."""
        for vma in self.vmas:
            if vma.offsets_of(index) < vma.pages:
                yield vma


class AnonVmaRegistry:
    """All live anon_vmas by id (the value stored in a page's ``owner``)."""

    def __init__(self, chains: bool = True):
        self.chains = chains
        self.by_id: dict[int, AnonVma] = {}
        self._ids = itertools.count(1)

    def __getitem__(self, id: int) -> AnonVma:
        return self.by_id[id]

    def __len__(self) -> int:
        return len(self.by_id)

    def _new(self, parent: AnonVma | None = None) -> AnonVma:
        av = AnonVma(next(self._ids), parent)
        if parent is not None:
            av.root.refcount += 1
            parent.num_children += 1
        self.by_id[av.id] = av
        return av

    # -- linking ------------------------------------------------------------------------
    @staticmethod
    def _link(vma: "Vma", av: AnonVma) -> None:
        vma.chain.insert(0, av)        # same_vma list: newest first, root last
        av.vmas[vma] = None

    def prepare(self, vma: "Vma") -> AnonVma:
        """Give ``vma`` an anon_vma before its first anonymous page (anon_vma_prepare)."""
        if vma.anon_vma is None:
            av = self._new()
            self._link(vma, av)
            vma.anon_vma = av
            av.num_active_vmas += 1
        return vma.anon_vma

    def clone(self, dst: "Vma", src: "Vma") -> None:
        """``dst`` (a split-off part or a copy of ``src``) joins all of src's anon_vmas."""
        for av in reversed(src.chain):
            self._link(dst, av)
        dst.anon_vma = src.anon_vma
        if dst.anon_vma is not None:
            dst.anon_vma.num_active_vmas += 1

    def fork(self, child: "Vma", parent: "Vma") -> None:
        """Link a child VMA at fork (anon_vma_fork, or anon_vma_link before 2.6.34)."""
        if parent.anon_vma is None:
            return
        if not self.chains:
            self.clone(child, parent)          # one anon_vma for the whole family
            return
        for av in reversed(parent.chain):
            self._link(child, av)
        for av in reversed(child.chain):       # reuse an unused ancestor, oldest first (3.19+)
            if av.num_active_vmas == 0 and av.num_children < 2:
                child.anon_vma = av
                av.num_active_vmas += 1
                return
        own = self._new(parent.anon_vma)
        self._link(child, own)
        child.anon_vma = own
        own.num_active_vmas += 1

    def unlink(self, vma: "Vma") -> None:
        """Drop every AVC of a VMA going away (unlink_anon_vmas)."""
        if vma.anon_vma is not None:
            vma.anon_vma.num_active_vmas -= 1
        for av in vma.chain:
            del av.vmas[vma]
            if not av.vmas:
                self.put(av)
        vma.chain = []
        vma.anon_vma = None

    # -- references ---------------------------------------------------------------------
    def get(self, av: AnonVma) -> None:
        av.refcount += 1

    def put(self, av: AnonVma) -> None:
        """Drop a reference; an anon_vma with none left is freed, then its root's pin."""
        av.refcount -= 1
        if av.refcount > 0:
            return
        del self.by_id[av.id]
        av.parent.num_children -= 1
        if av.root is not av:
            self.put(av.root)
