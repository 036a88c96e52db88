"""KSM's side of memory hot(un)plug and page migration.

``KsmMemoryNotifier`` is KSM's memory-notifier callback (priority 100; it
never vetoes), registered on the host's memory notifier chain
(``vmhost.mm.hotplug``):

- MEM_GOING_OFFLINE: KSM_RUN_OFFLINE is set in ``run``. ksmd parks before
  its next batch (``Ksm.should_run`` is False while it is set) and ``run``
  reads 4 plus its old value. Writes of ``run``, ``max_page_sharing`` and
  ``merge_across_nodes`` wait (wait_while_offlining): the engine queues them
  and they complete, in order, when the offline ends or is cancelled. On the
  2.6.33 profile the kernel held ksm_thread_mutex across the whole offline;
  the effect modelled is the same: ksmd parked and knob writes blocked from
  GOING_OFFLINE to the end.
- MEM_OFFLINE: every stable node -- plain node, dup of a chain, or node
  waiting on migrate_nodes -- whose kpfn lies in the offlined pfn range is
  removed without touching its page (``remove_node_from_stable_tree``
  un-counts its rmap_items); a chain left without dups is freed. Live KSM
  pages were migrated out before (their kpfn moved with them), so what is
  pruned here are stale nodes of KSM pages already freed, whose kpfn would
  otherwise point into memory that no longer exists. Then the flag is
  cleared and ksmd woken.
- MEM_CANCEL_OFFLINE: the flag is cleared and ksmd woken.
- online events: nothing.

``ksm_migrate_pages`` is folio_migrate_ksm for a batch: the stable node of
each migrated KSM page now points at the new frame.

``NotifierMixin`` gives the engine the hooks core mm calls for these
(``vmhost.mm.hooks``): the notifier, migration, and the swap-in copy rule's
questions (is a stable node live, is ``run`` unmerging).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vmhost.ksm.knobs import RUN_OFFLINE, RUN_UNMERGE
from vmhost.ksm.rbtree import NIL
from vmhost.ksm.stable import CHAIN, DUP, FREE, MIGRATE, NODE

if TYPE_CHECKING:
    from vmhost.ksm.engine import Ksm

KSM_CALLBACK_PRI = 100


class KsmMemoryNotifier:
    priority = KSM_CALLBACK_PRI
    name = "ksm"

    def __init__(self, ksm: "Ksm"):
        self.ksm = ksm
        self.last_pruned = 0

    def __call__(self, event: str, start_pfn: int, nr_pages: int) -> int:
        knobs = self.ksm.knobs
        if event == "GOING_OFFLINE":
            knobs.run |= RUN_OFFLINE
        elif event == "OFFLINE":
            self.last_pruned = prune_range(self.ksm, start_pfn, start_pfn + nr_pages)
            self._resume()
        elif event == "CANCEL_OFFLINE":
            self.last_pruned = 0
            self._resume()
        return 0

    def _resume(self) -> None:
        knobs = self.ksm.knobs
        if knobs.run & RUN_OFFLINE:
            knobs.run &= ~RUN_OFFLINE
            waiting, self.ksm.waiting_writes = self.ksm.waiting_writes, []
            for name, text in waiting:        # the blocked writers go on, in order
                self.ksm.waited_writes.append((name, text, self.ksm.write_knob(name, text)))
            if self.ksm.should_run():
                self.ksm.wakeup()


def prune_range(ksm: "Ksm", start_pfn: int, end_pfn: int) -> int:
    """ksm_check_stable_tree: remove every stable node whose kpfn is in [start_pfn, end_pfn).

    Returns how many nodes (plain, dups and migrate_nodes entries) were removed.
    """
    nodes = ksm.nodes
    live = nodes.live()
    kinds = nodes.kind[live]
    kpfn = nodes.kpfn[live]
    hit = live[np.isin(kinds, (NODE, DUP, MIGRATE)) & (kpfn >= start_pfn) & (kpfn < end_pfn)]
    chains = {int(nodes.chain[n]) for n in hit if nodes.kind[n] == DUP}
    removed = 0
    for node in hit.tolist():
        if nodes.kind[node] == FREE:
            continue
        ksm.remove_node_from_stable_tree(node)
        removed += 1
    for chain in sorted(chains):
        if nodes.kind[chain] == CHAIN and nodes.dhead[chain] == NIL:
            ksm._free_chain(chain)
    return removed


def ksm_migrate_pages(ksm: "Ksm", old: np.ndarray, new: np.ndarray) -> int:
    """folio_migrate_ksm: each migrated KSM page's stable node takes the new pfn.

    The new frames already carry the old ones' owner (the node) and PG_KSM. A frame
    whose node no longer names it (stale) is left alone: nothing points at it.
    Returns how many nodes were updated.
    """
    nodes = ksm.nodes
    owners = ksm.host.frames.owner[new].astype(np.int64)
    valid = (owners >= 0) & (owners < nodes.capacity)
    valid[valid] &= nodes.kind[owners[valid]] != FREE
    valid[valid] &= nodes.kpfn[owners[valid]] == old[valid]
    nodes.kpfn[owners[valid]] = new[valid]
    return int(valid.sum())


class NotifierMixin:
    """The engine's side of the hooks core mm calls around hotplug, migration and swap-in
    (``vmhost.mm.hooks.KsmHooks``)."""

    def memory_notifier(self) -> KsmMemoryNotifier:
        if getattr(self, "_memory_notifier", None) is None:
            self._memory_notifier = KsmMemoryNotifier(self)
        return self._memory_notifier

    def migrate_pages(self, old: np.ndarray, new: np.ndarray) -> None:
        ksm_migrate_pages(self, old, new)

    def stable_node_live(self, pfn: int) -> bool:
        nodes = self.nodes
        node = int(self.host.frames.owner[pfn])
        if node < 0 or node >= nodes.capacity:
            return False
        return int(nodes.kind[node]) != 0 and int(nodes.kpfn[node]) == pfn

    def unmerging(self) -> bool:
        return bool(self.knobs.run & RUN_UNMERGE)

    def run_state(self) -> int:
        return int(self.knobs.run)
