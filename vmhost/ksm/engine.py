"""The KSM engine: mm_slots, the scan cursor, the stable and unstable trees, merging.

This follows mm/ksm.c entity for entity (read its overview comment first if
you know it; if you do not, here is the whole idea):

- Processes register memory with madvise(MADV_MERGEABLE) or prctl; each
  registered mm gets an ``MmSlot`` on a circular list that ksmd walks.
- ksmd visits every anonymous page of every mergeable VMA in turn, recording
  each in an rmap_item. A page whose checksum changed since the last visit is
  "volatile" and left alone. A stable page is first looked up in the *stable
  tree* (KSM pages, write-protected, sorted by content): if an identical KSM
  page has room, the page is merged into it. Otherwise it is looked up in the
  *unstable tree* (pages seen unchanged for one pass, not protected, rebuilt
  every pass): an identical page there is merged with this one into a new KSM
  page, which moves to the stable tree; no match inserts this page.
- A KSM page is shared by at most max_page_sharing mappings; more copies of
  one content become several KSM pages ("dups") under a "chain" node.
- Counters only move when ksmd (or run=2) touches things: a write that breaks
  a KSM page is counted one pass later, when ksmd meets its rmap_item.

This module holds the state (``Ksm``: knobs, counters, rmap_items, stable
nodes, trees, slots and cursor); the algorithms are split by concern into
mixins: ``stable_tree``, ``unstable_tree``, ``merge`` (cmp_and_merge_page),
``scan`` (the cursor and ksm_do_scan, with the compiled loop in ``fastscan``),
``registration`` (madvise, prctl, fork, exit, run=2, rmap) and
``consistency`` (the invariant checker's part). ksmd itself (timing, batches,
CPU cost) is in ``ksmd.py``. Every method with a kernel counterpart carries
its name in its docstring.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

import numpy as np

from hw.units import PAGE_SIZE
from vmhost.ksm.checksum import checksum, memcmp_key
from vmhost.ksm.consistency import ConsistencyMixin
from vmhost.ksm import fastscan
from vmhost.ksm.counters import COUNTER_NAMES, WORK_NAMES
from vmhost.ksm.items import (RMAP_ITEM_BYTES, SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG, MmSlot,
                              RmapItems)
from vmhost.ksm import knobs as knob_table
from vmhost.ksm.keyindex import KeyIndex
from vmhost.ksm.knobs import RUN_MERGE, RUN_OFFLINE, RUN_UNMERGE, Knobs
from vmhost.ksm.merge import MergeMixin
from vmhost.ksm.notifier import NotifierMixin
from vmhost.ksm.rbtree import NIL, IndexedRbTree, RbTree
from vmhost.ksm.registration import RegistrationMixin
from vmhost.ksm.scan import ScanMixin
from vmhost.ksm.stable import StableNodes
from vmhost.ksm.stable_tree import StableTreeMixin
from vmhost.ksm.unstable_tree import LOG_MIN, UnstableTreeMixin
from vmhost.ksm.vma_registry import VmaRegistry
from vmhost.mm.hooks import KsmHooks
from vmhost.mm.vma import VmFlags

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.mm import MM






class Counters:
    """The global counters of /sys/kernel/mm/ksm, in one array the compiled scan updates too.

    (The derived ones, pages_volatile and general_profit, are properties of Ksm.)
    """

    def __init__(self) -> None:
        self.a = np.zeros(len(COUNTER_NAMES), dtype=np.int64)


for _i, _name in enumerate(COUNTER_NAMES):
    setattr(Counters, _name, property(lambda self, i=_i: int(self.a[i]),
                                      lambda self, v, i=_i: self.a.__setitem__(i, v)))


class Ksm(StableTreeMixin, UnstableTreeMixin, MergeMixin, ScanMixin, RegistrationMixin,
          ConsistencyMixin, NotifierMixin, KsmHooks):
    """The KSM of one host: its state, counters and knobs; the algorithms are in the mixins."""

    def __init__(self, host: "Host"):
        self.host = host
        self.profile = host.profile
        self.knobs = Knobs()
        self.c = Counters()
        self.waiting_writes: list[tuple[str, str]] = []   # knob writes blocked by offlining
        self.waited_writes: list[tuple[str, str, int]] = []  # ... and how they ended (rc)
        nr_nodes = host.topology.node_count
        self.items = RmapItems(trees=nr_nodes)
        self.nodes = StableNodes(trees=nr_nodes)
        self.stable_index = KeyIndex(self.nodes)
        self.stable_trees = [IndexedRbTree(self.nodes.links, i, self.stable_index)
                             for i in range(nr_nodes)]
        host.frames.on_ksm_freed = self.nodes.mark_stale
        self.unstable_trees = [RbTree(self.items.links, i) for i in range(nr_nodes)]
        self.slots: list[MmSlot] = []           # ksm_mm_head's list, in scan order
        self.slot_of: dict[int, MmSlot] = {}    # mm id -> slot (mm_slots_hash)
        self.cursor: MmSlot | None = None       # ksm_scan.mm_slot; None is the list head
        self.address = 0                        # ksm_scan.address (a virtual page number)
        self.prev_item = NIL                    # ksm_scan.rmap_list: item before the next one
        self.seqnr = 0                          # ksm_scan.seqnr == full_scans
        self._saw_mergeable = False
        self._pass_changes = 0
        self._uhashed = False                   # unstable tree kept as hash + log (fastscan)
        self._uh = np.full(2 * LOG_MIN, NIL, dtype=np.int32)     # twice the log at least
        self._ulog = np.zeros(LOG_MIN, dtype=np.int32)
        self._ulog_len = np.zeros(2, dtype=np.int64)       # words, erasures (fastscan)
        self._eff_chain = np.zeros(128, dtype=np.int32)     # scratch for the compiled walk
        self._eff_found = np.zeros(128, dtype=np.int32)
        self._eff_prune = np.zeros(128, dtype=np.bool_)
        self._freed = np.zeros(1 << 16, dtype=np.int64)      # frames freed by compiled merges
        self._freed_n = np.zeros(1, dtype=np.int64)
        self._av_delta = np.zeros(64, dtype=np.int64)       # anon_vma references compiled code
                                                            # took (+) and dropped (-), by id
        self.vma_registry = VmaRegistry()                  # page tables for compiled merges
        self._cand_cache: dict[int, tuple[int, np.ndarray]] = {}
        self.zero_checksum = checksum(0, self.profile.ksm_checksum)
        self.wakeup: Callable[[], None] = lambda: None   # set by ksmd
        self.work = np.zeros(len(WORK_NAMES), dtype=np.int64)   # operations done (CPU model)
        self.fast = True                        # use the compiled scan for the common cases
        self.bails = np.zeros(fastscan.N_CODES, dtype=np.int64)   # visits the compiled scan left to Python, by code
        host.ksm = self

    # derived counters
    def work_counts(self) -> dict[str, int]:
        """Operations done so far, by name (the CPU model's inputs)."""
        return {name: int(v) for name, v in zip(WORK_NAMES, self.work)}

    @property
    def rmap_items(self) -> int:
        return self.items.count

    @property
    def pages_volatile(self) -> int:
        c = self.c
        return max(self.items.count - c.pages_shared - c.pages_sharing - c.pages_unshared, 0)

    @property
    def general_profit(self) -> int:
        return ((self.c.pages_sharing + self.c.ksm_zero_pages) * PAGE_SIZE
                - self.items.count * RMAP_ITEM_BYTES)

    def _mps(self) -> int:
        """max_page_sharing in force (unlimited before stable node chains existed)."""
        return self.knobs.max_page_sharing if self.profile.ksm_stable_node_chains else 1 << 62

    def _nid_of_pfn(self, pfn: int) -> int:
        """get_kpfn_nid: the tree a page belongs to."""
        if self.knobs.merge_across_nodes:
            return 0
        return int(self.host.phys.node_of(pfn))

    def _key(self, pfn: int) -> int:
        return memcmp_key(int(self.host.frames.content[pfn]))

    def _mm(self, item: int) -> "MM":
        return self.slot_of[self.items.mm_of(item)].mm

    def _put_anon_vma(self, item: int) -> None:
        av_id = int(self.items.anon_vma[item])
        if av_id >= 0:
            self.host.anon_vmas.put(self.host.anon_vmas.by_id[av_id])
            self.items.anon_vma[item] = -1

    def remove_rmap_item_from_tree(self, item: int) -> None:
        items, c = self.items, self.c
        flags = items.flags_of(item)
        if flags & STABLE_FLAG:
            node = int(items.head[item])
            if self.get_page(node) < 0:
                return                      # the stale node took this item's counts with it
            self._hlist_del(node, item)
            self._uncount_stable_item(node, item, self.nodes.hhead[node] != NIL)
        elif flags & UNSTABLE_FLAG:
            age = (self.seqnr - flags) & SEQNR_MASK
            assert age <= 1, "an unstable rmap_item outlived its tree"
            if age == 0:
                if self._uhashed and self._unstable_clean():
                    self._unstable_log_room(fastscan.ERASE_WORDS)
                    fastscan.hash_remove(self._uh, items.tree_key, items.nid, int(item))
                    assert self._ulog_len[0] + fastscan.ERASE_WORDS <= len(self._ulog)
                    fastscan.log_erasure(self._ulog, self._ulog_len, int(item), int(items.nid[item]))
                else:
                    self.build_unstable_trees()
                    self.unstable_trees[int(items.nid[item])].erase(item)
            c.pages_unshared -= 1
            items.set_flags(item, 0)
            items.anon_vma[item] = -1           # its nid (a union)

    def on_scan_start(self) -> None:
        """Hook for the advisor (ksmd.py)."""

    def on_scan_end(self) -> None:
        """Hook for the advisor (ksmd.py)."""

    def should_run(self) -> bool:
        return bool(self.knobs.run & RUN_MERGE) and bool(self.slots) and not self.knobs.run & RUN_OFFLINE

    def write_knob(self, name: str, text) -> int:
        """A write to /sys/kernel/mm/ksm/NAME: 0 or -errno, effects applied."""
        if name not in knob_table.available(self.profile):
            return -errno.ENOENT
        rc, value = self.knobs.parse(name, text)
        if rc:
            return rc
        k = self.knobs
        apply = knob_table.BY_NAME[name].apply
        if apply in ("run", "tree") and k.run & RUN_OFFLINE:
            # the writer blocks (wait_while_offlining) until memory offlining ends; it is
            # completed then, by the memory notifier (ksm/notifier.py)
            self.waiting_writes.append((name, text))
            return 0
        if apply == "run":
            if k.run != value:
                k.run = value
                if value & RUN_UNMERGE:
                    rc = self.unmerge_all()
                    if rc:
                        k.run = 0
                        return rc
            if value & RUN_MERGE:
                self.wakeup()
            return 0
        if apply == "tree":
            if getattr(k, name) == value:
                return 0
            if self.c.pages_shared or not self.remove_all_stable_nodes():
                return -errno.EBUSY
            setattr(k, name, value)
            return 0
        if apply == "advisor":
            if value != k.advisor_mode:
                k.advisor_mode = value
                k.pages_to_scan = k.advisor_min_pages_to_scan if value == "scan-time" \
                    else knob_table.BY_NAME["pages_to_scan"].default
                self.on_advisor_reset()
            return 0
        setattr(k, name, value)
        if apply == "wake":
            self.wakeup()
        return 0

    def on_advisor_reset(self) -> None:
        """Hook for the advisor (ksmd.py)."""

    # statistics
    def stats(self) -> dict:
        c = self.c
        return {
            "full_scans": self.seqnr, "pages_scanned": c.pages_scanned, "pages_skipped": c.pages_skipped,
            "pages_shared": c.pages_shared, "pages_sharing": c.pages_sharing,
            "pages_unshared": c.pages_unshared, "pages_volatile": self.pages_volatile,
            "ksm_zero_pages": c.ksm_zero_pages, "stable_node_chains": c.stable_node_chains,
            "stable_node_dups": c.stable_node_dups, "general_profit": self.general_profit,
        }

    @staticmethod
    def ksm_stat(mm: "MM") -> dict:
        """/proc/PID/ksm_stat of one mm."""
        return {
            "ksm_rmap_items": mm.ksm_rmap_items,
            "ksm_zero_pages": mm.ksm_zero_pages,
            "ksm_merging_pages": mm.ksm_merging_pages,
            "ksm_process_profit": (mm.ksm_merging_pages + mm.ksm_zero_pages) * PAGE_SIZE
                                  - mm.ksm_rmap_items * RMAP_ITEM_BYTES,
            "ksm_merge_any": mm.ksm_merge_any,
            "ksm_mergeable": any(v.flags & VmFlags.MERGEABLE for v in mm.vmas),
        }
