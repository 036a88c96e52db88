"""The scan: the cursor over mm_slots, VMAs and rmap_items, batch by batch.

scan_get_next_rmap_item's walk, get_next_rmap_item's list upkeep, smart scan and
ksm_do_scan, with the compiled loop taking the common visits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vmhost.ksm import fastscan, pages
from vmhost.ksm.checksum import SEEDS
from vmhost.ksm.items import MmSlot, check_item_range
from vmhost.ksm.rbtree import NIL
from vmhost.mm.frames import PG_KSM
from vmhost.mm.vma import VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.mm.mm import MM


def fastscan_seed(algorithm: str) -> int:
    """The checksum seed as a signed 64-bit value, for the compiled loop's parameter array."""
    seed = int(SEEDS[algorithm])
    return seed - (1 << 64) if seed >= 1 << 63 else seed


class ScanMixin:
    """Part of :class:`vmhost.ksm.engine.Ksm` (see the module docstring)."""

    def _should_skip(self, item: int, pfn: int) -> bool:
        """Smart scan: pages that never merge are visited less and less often."""
        if not (self.profile.ksm_smart_scan and self.knobs.smart_scan):
            return False
        if self.host.frames.flags[pfn] & PG_KSM:
            return False
        items = self.items
        smart, skip = fastscan.smart_step(int(items.smart[item]))
        items.smart[item] = smart
        if skip:
            self.c.pages_skipped += 1
            self.remove_rmap_item_from_tree(item)
        return skip

    def _next_item(self, slot: MmSlot, vpn: int) -> int:
        """get_next_rmap_item: the item for ``vpn``, freeing the ones before it."""
        items = self.items
        prev = self.prev_item
        cur = slot.rmap_list if prev == NIL else int(items.rnext[prev])
        while cur != NIL:
            addr = items.vpn_of(cur)
            if addr == vpn:
                return cur
            if addr > vpn:
                break
            nxt = int(items.rnext[cur])
            self._unlink_item(slot, prev, nxt)
            self.remove_rmap_item_from_tree(cur)
            self._free_item(cur)
            cur = nxt
        new = items.alloc(slot.mm.id, vpn)
        slot.mm.ksm_rmap_items += 1
        items.rnext[new] = cur
        self._unlink_item(slot, prev, new)
        return new

    def _unlink_item(self, slot: MmSlot, prev: int, nxt: int) -> None:
        if prev == NIL:
            slot.rmap_list = nxt
        else:
            self.items.rnext[prev] = nxt

    def _free_item(self, item: int) -> None:
        self._mm(item).ksm_rmap_items -= 1
        self.items.free(item)

    def _remove_trailing(self, slot: MmSlot, prev: int) -> None:
        cur = slot.rmap_list if prev == NIL else int(self.items.rnext[prev])
        self._unlink_item(slot, prev, NIL)
        while cur != NIL:
            nxt = int(self.items.rnext[cur])
            self.remove_rmap_item_from_tree(cur)
            self._free_item(cur)
            cur = nxt

    def _candidates(self, vma: Vma) -> np.ndarray:
        """Offsets of the VMA's pages a visit may find anonymous, kept while the pass is in
        the VMA (batches resume in it) and rebuilt when its page tables change."""
        cached = self._cand_cache.get(id(vma))
        if cached is None or cached[0] != vma.mm.pt_gen or cached[2] is not vma:
            cached = (vma.mm.pt_gen, pages.candidate_offsets(self.host, vma), vma)
            self._cand_cache[id(vma)] = cached
        return cached[1]

    def _start_full_scan(self) -> bool:
        if not self.knobs.merge_across_nodes:
            for node in list(self.nodes.migrate_nodes):
                self.get_page(node)
        for tree in self.unstable_trees:
            tree.clear()
        self._uhashed = self.fast
        if self._uhashed:
            # the log sized for the tree this pass can build: every item not on a KSM page
            # may go in once (erasures log more entries: the log then grows, with the table)
            c = self.c
            self._size_unstable_hash(self.items.count - c.pages_shared - c.pages_sharing)
        self._cand_cache.clear()
        self._pass_changes = int(self.host.changes[0])
        self.cursor = self.slots[0] if self.slots else None
        self.on_scan_start()
        return self.cursor is not None

    # The scan is scan_get_next_rmap_item + cmp_and_merge_page of mm/ksm.c, driven VMA by
    # VMA: the compiled loop (fastscan) takes the common visits, and every visit it cannot
    # finish is finished here from the stage it reached.
    STAGE_FRESH, STAGE_ITEM, STAGE_SKIPPED, STAGE_CHECKSUMMED, STAGE_STABLE_MISSED = 0, 1, 2, 3, 4

    _BAIL_STAGE = {fastscan.BAIL_BEFORE_ITEM: STAGE_FRESH, fastscan.BAIL_BEFORE_SKIP: STAGE_ITEM,
                   fastscan.BAIL_BEFORE_MERGE: STAGE_SKIPPED,
                   fastscan.BAIL_AFTER_CHECKSUM: STAGE_CHECKSUMMED,
                   fastscan.BAIL_AFTER_STABLE: STAGE_STABLE_MISSED}

    def _next_mergeable_vma(self, mm: "MM") -> Vma | None:
        """The next VM_MERGEABLE VMA with an anon_vma at or after the cursor's address."""
        for vma in mm.vmas_overlapping(self.address, 1 << 62):
            if not vma.flags & VmFlags.MERGEABLE:
                continue
            self._saw_mergeable = True
            if self.address < vma.start:
                self.address = vma.start
            if vma.anon_vma is None:
                self.address = vma.end
                continue
            check_item_range(mm.id, vma.end)       # what an rmap_item's word can hold
            return vma
        return None

    def _end_of_mm(self, slot: MmSlot) -> None:
        """Free trailing items, drop a slot without mergeable VMAs, move the cursor on."""
        if slot.mm.exiting:
            self.prev_item, self._saw_mergeable = NIL, False
        self._remove_trailing(slot, self.prev_item)
        idx = self.slots.index(slot)
        nxt = self.slots[idx + 1] if idx + 1 < len(self.slots) else None
        if not self._saw_mergeable:
            self._drop_slot(slot)
        self.cursor = nxt
        if nxt is not None:
            self.address, self.prev_item, self._saw_mergeable = 0, NIL, False
        else:
            self.on_scan_end()
            self.seqnr += 1

    def do_scan(self, budget: int, pace=None) -> int:
        """ksm_do_scan: process up to ``budget`` pages; a full-scan end also ends the batch.

        ``pace`` (ksmd's, ``vmhost.ksm.ksmd.Pace``): the compiled loop may run ksmd's next
        batches at once (``fastscan.scan_ahead``); the pages returned are then the last batch's."""
        done = 0
        while done < budget:
            if self.cursor is None:
                if not self.slots or not self._start_full_scan():
                    break
                self.address, self.prev_item, self._saw_mergeable = 0, NIL, False
            slot = self.cursor
            vma = None if slot.mm.exiting else self._next_mergeable_vma(slot.mm)
            if vma is None:
                self._end_of_mm(slot)
                if self.cursor is None:
                    break
                continue
            cand = self._candidates(vma)
            i = int(np.searchsorted(cand, self.address - vma.start))
            while i < len(cand) and done < budget:
                stage = self.STAGE_FRESH
                item = NIL
                if self.fast:
                    ahead = pace.batches if pace is not None else 0
                    i, n, code, item = self._run_compiled(slot, vma, cand, i, budget, done, pace)
                    done = n if pace is not None and pace.batches != ahead else done + n
                    if code in (fastscan.RUN_END, fastscan.RUN_BUDGET):
                        break
                    stage = self._BAIL_STAGE[code]
                    self.bails[code] += 1
                    if stage == self.STAGE_FRESH:      # the compiled loop counted this PTE, and
                        self.work[fastscan.W_PTES] -= 1    # _scan_page counts it from the start
                done += self._scan_page(slot, vma, int(cand[i]), stage, item)
                i += 1
            if i >= len(cand):
                self.address = vma.end
                self._cand_cache.pop(id(vma), None)     # this pass is done with the VMA
        return done

    def _scan_page(self, slot: MmSlot, vma: Vma, off: int, stage: int, item: int) -> int:
        """One visit, from ``stage`` on; returns 1 if the page was processed (pages_scanned)."""
        pfn = pages.anon_page_at(self.host, vma, off)
        if stage == self.STAGE_FRESH:
            self.work[fastscan.W_PTES] += 1
            if pfn < 0:
                return 0
            vpn = vma.start + off
            item = self._next_item(slot, vpn)
            self.prev_item = item
            self.address = vpn + 1
        if stage <= self.STAGE_ITEM and self._should_skip(item, pfn):
            return 0
        if stage <= self.STAGE_SKIPPED:
            self.cmp_and_merge_page(pfn, item)
        elif stage == self.STAGE_CHECKSUMMED:
            self.after_checksum(pfn, item)
        else:
            self.after_stable_miss(pfn, item)
        self.c.pages_scanned += 1
        return 1

    def _scan_params(self) -> np.ndarray:
        host, nodes = self.host, self.nodes
        p = np.zeros(fastscan.N_PARAMS, dtype=np.int64)
        p[fastscan.P_SEQNR] = self.seqnr
        p[fastscan.P_SMART] = int(self.profile.ksm_smart_scan and self.knobs.smart_scan)
        p[fastscan.P_ACROSS] = int(self.knobs.merge_across_nodes)
        p[fastscan.P_USE_ZERO] = int(self.knobs.use_zero_pages)
        p[fastscan.P_ZERO_SUM] = self.zero_checksum
        p[fastscan.P_SEED] = fastscan_seed(self.profile.ksm_checksum)
        p[fastscan.P_BLOCK_PAGES] = host.phys.block_pages
        p[fastscan.P_CLEAN] = int(host.changes[0] == self._pass_changes)
        p[fastscan.P_HASHED] = int(self._uhashed)
        p[fastscan.P_STABLE_INDEXED] = int(self.c.stable_node_chains == 0
                                           and nodes.stale_count == 0)
        p[fastscan.P_NOW] = host.clock.now
        p[fastscan.P_PRUNE_NS] = self.knobs.stable_node_chains_prune_millisecs * 1_000_000
        p[fastscan.P_MPS] = min(self._mps(), 1 << 62)
        p[fastscan.P_CHAINS] = int(self.profile.ksm_stable_node_chains)
        return p

    def _run_compiled(self, slot: MmSlot, vma: Vma, cand: np.ndarray, i: int, budget: int,
                      done: int = 0, pace=None):
        items, host = self.items, self.host
        cursor = np.array([slot.rmap_list, self.prev_item, self.address], dtype=np.int64)
        if self._uhashed:
            self._unstable_log_room(fastscan.ERASE_WORDS)   # a full log would stop the compiled loop
        self._unstable_hash_covers_items()
        if self.stable_index.needs_rebuild():
            self.stable_index.grow()
        if self.nodes.free_top[0] == 0:
            self.nodes.grow()
        registry = self.vma_registry.current(self)
        if len(self._av_delta) < self.vma_registry.anon_vma_ids:
            self._av_delta = np.zeros(2 * self.vma_registry.anon_vma_ids, dtype=np.int64)
        state = fastscan.ScanState(
            self._scan_params(), self.c.a, self.work, host.mm_ksm, host.phys.block_node_array,
            self._uh, self._ulog, self._ulog_len, self._eff_chain,
            self._eff_found, self._eff_prune, self._freed, self._freed_n, self._av_delta)
        groups = (fastscan.frame_arrays(host.frames), fastscan.item_arrays(items),
                  fastscan.node_arrays(self.nodes, self.stable_index), state, registry)
        args = (cand, i, budget - done, vma.start, vma.pte, vma.ptef, slot.mm.id, cursor,
                bool(vma.flags & VmFlags.LOCKED), vma.anon_vma.id)
        if pace is None:
            i, n, code, item = fastscan.scan_run(*groups, *args)
        else:
            listed = self._cand_cache.get(id(vma))
            gen = listed[0] if listed is not None and listed[1] is cand else -1
            i, n, code, item = fastscan.scan_ahead(*groups, cand, i, budget, *args[3:],
                                                   *pace.arrays(host.clock, done, gen),
                                                   host.pt_epoch)
            pace.ran_ahead(host.clock)
        slot.rmap_list, self.prev_item = int(cursor[0]), int(cursor[1])
        self.address = int(cursor[2])
        self._settle_compiled_merges()
        return int(i), int(n), int(code), int(item)

    def _settle_compiled_merges(self) -> None:
        """What the compiled merges leave to Python: freeing frames, anon_vma references."""
        n = int(self._freed_n[0])
        if n:
            self.host.allocator.free_in_order(self._freed[:n].copy())
            self._freed_n[0] = 0
        changed = np.flatnonzero(self._av_delta)
        if len(changed):
            anon_vmas = self.host.anon_vmas
            for av_id, d in zip(changed.tolist(), self._av_delta[changed].tolist()):
                av = anon_vmas.by_id[av_id]
                av.refcount += max(d, 0)
                for _ in range(-d):
                    anon_vmas.put(av)
            self._av_delta[changed] = 0
