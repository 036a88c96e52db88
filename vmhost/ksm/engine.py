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

ksmd itself (timing, batches, CPU cost) is in ``ksmd.py``; this module is the
state and the algorithms. Every method with a kernel counterpart carries its
name in its docstring.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

import numpy as np

from vmhost.ksm import fastscan, pages
from vmhost.ksm.checksum import SEEDS as _SEEDS, checksum, checksums, memcmp_key
from vmhost.ksm.items import (MmSlot, RMAP_ITEM_BYTES, RmapItems, SEQNR_MASK, STABLE_FLAG,
                              UNSTABLE_FLAG)
from vmhost.ksm.knobs import KNOBS_2_6_33, KNOBS_6_18, RUN_MERGE, RUN_OFFLINE, RUN_UNMERGE, Knobs
from vmhost.ksm.pages import EFAULT, ZERO_PAGE, find_mergeable_vma
from vmhost.ksm.keyindex import KeyIndex, ki_find
from vmhost.ksm.rbtree import NIL, IndexedRbTree, RbTree
from vmhost.ksm.stable import CHAIN, DUP, FREE, MIGRATE, NODE, StableNodes
from vmhost.mm import thp
from vmhost.mm.frames import NO_OWNER, PG_ANON, PG_COMPOUND, PG_KSM, PG_SWAPCACHE
from vmhost.mm.hooks import KsmHooks
from vmhost.mm.fault import retry_fault
from vmhost.mm.page_alloc import OutOfMemory
from vmhost.mm.vma import PTE_KSM_ZERO, PTE_PRESENT, PTE_ZERO, VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.mm import MM

PAGE_SIZE = 4096


def fastscan_seed(algorithm: str) -> int:
    """The checksum seed as a signed 64-bit value, for the compiled loop's parameter array."""
    seed = int(_SEEDS[algorithm])
    return seed - (1 << 64) if seed >= 1 << 63 else seed


COUNTER_NAMES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned",
                 "pages_skipped", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
WORK_NAMES = ("ptes_walked", "checksums", "tree_compares", "merges", "dups_walked")


class Counters:
    """The global counters of /sys/kernel/mm/ksm, in one array the compiled scan updates too.

    (The derived ones, pages_volatile and general_profit, are properties of Ksm.)
    """

    def __init__(self) -> None:
        self.a = np.zeros(len(COUNTER_NAMES), dtype=np.int64)


for _i, _name in enumerate(COUNTER_NAMES):
    setattr(Counters, _name, property(lambda self, i=_i: int(self.a[i]),
                                      lambda self, v, i=_i: self.a.__setitem__(i, v)))


class Ksm(KsmHooks):
    def __init__(self, host: "Host"):
        self.host = host
        self.profile = host.profile
        self.knobs = Knobs()
        self.c = Counters()
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
        self._uh = np.full(1024, NIL, dtype=np.int32)
        self._ulog = np.zeros(1024, dtype=np.int32)
        self._ulog_len = np.zeros(1, dtype=np.int64)
        self._cand_cache: dict[int, tuple[int, np.ndarray]] = {}
        self.zero_checksum = checksum(0, self.profile.ksm_checksum)
        self.wakeup: Callable[[], None] = lambda: None   # set by ksmd
        self.work = np.zeros(len(WORK_NAMES), dtype=np.int64)   # operations done (CPU model)
        self.fast = True                        # use the compiled scan for the common cases
        host.ksm = self

    # ======================================================================================
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

    # ======================================================================================
    # keyhole references and stable node removal
    def get_page(self, node: int) -> int:
        """ksm_get_folio: the node's KSM page, or -1 after pruning a stale node."""
        pfn = int(self.nodes.kpfn[node])
        frames = self.host.frames
        if (frames.flags[pfn] & PG_KSM and frames.owner[pfn] == node
                and (frames.refcount[pfn] > 0 or frames.flags[pfn] & PG_SWAPCACHE)):
            self.nodes.unmark_stale(node)
            return pfn
        self.remove_node_from_stable_tree(node)
        return -1

    def remove_node_from_stable_tree(self, node: int) -> None:
        """Drop a node and un-count every rmap_item still listed on it."""
        it, items, c = int(self.nodes.hhead[node]), self.items, self.c
        while it != NIL:
            nxt = int(items.hnext[it])
            if nxt != NIL:
                c.pages_sharing -= 1
            else:
                c.pages_shared -= 1
            self._mm(it).ksm_merging_pages -= 1
            self.nodes.hlist_len[node] -= 1
            self._put_anon_vma(it)
            items.flags[it] = 0
            items.head[it] = NIL
            it = nxt
        self.nodes.hhead[node] = NIL
        self._unlink_node(node)
        self.nodes.free(node)

    def _unlink_node(self, node: int) -> None:
        """stable_node_dup_del, or off the migrate list."""
        kind = self.nodes.kind[node]
        if kind == MIGRATE:
            del self.nodes.migrate_nodes[node]
        elif kind == DUP:
            self.nodes.del_dup(node)
            self.c.stable_node_dups -= 1
        else:
            self.stable_trees[int(self.nodes.nid[node])].erase(node)

    def _free_chain(self, chain: int) -> None:
        self.stable_trees[int(self.nodes.nid[chain])].erase(chain)
        self.nodes.free(chain)
        self.c.stable_node_chains -= 1

    def _mm(self, item: int) -> "MM":
        return self.slot_of[int(self.items.mm[item])].mm

    def _put_anon_vma(self, item: int) -> None:
        av_id = int(self.items.anon_vma[item])
        if av_id >= 0:
            self.host.anon_vmas.put(self.host.anon_vmas.by_id[av_id])
            self.items.anon_vma[item] = -1

    def remove_rmap_item_from_tree(self, item: int) -> None:
        items, c = self.items, self.c
        flags = int(items.flags[item])
        if flags & STABLE_FLAG:
            node = int(items.head[item])
            if self.get_page(node) < 0:
                return                      # the stale node took this item's counts with it
            self._hlist_del(node, item)
            if self.nodes.hhead[node] != NIL:
                c.pages_sharing -= 1
            else:
                c.pages_shared -= 1
            self._mm(item).ksm_merging_pages -= 1
            self.nodes.hlist_len[node] -= 1
            self._put_anon_vma(item)
            items.head[item] = NIL
            items.flags[item] = 0
        elif flags & UNSTABLE_FLAG:
            age = (self.seqnr - flags) & SEQNR_MASK
            assert age <= 1, "an unstable rmap_item outlived its tree"
            if age == 0:
                if self._uhashed and self._unstable_clean():
                    fastscan.hash_remove(self._uh, items.tree_key, items.nid, item)
                    self._log_unstable(-item - 2)
                else:
                    self.build_unstable_trees()
                    self.unstable_trees[int(items.nid[item])].erase(item)
            c.pages_unshared -= 1
            items.flags[item] = 0

    def _hlist_del(self, node: int, item: int) -> None:
        items = self.items
        prev, nxt = int(items.hprev[item]), int(items.hnext[item])
        if prev == NIL:
            self.nodes.hhead[node] = nxt
        else:
            items.hnext[prev] = nxt
        if nxt != NIL:
            items.hprev[nxt] = prev
        items.hnext[item] = items.hprev[item] = NIL

    def stable_tree_append(self, item: int, node: int) -> None:
        """Add an rmap_item to a KSM page's list (at the head, like hlist_add_head)."""
        items, nodes = self.items, self.nodes
        nodes.hlist_len[node] += 1
        items.head[item] = node
        items.flags[item] |= STABLE_FLAG
        first = int(nodes.hhead[node])
        items.hnext[item] = first
        items.hprev[item] = NIL
        if first != NIL:
            items.hprev[first] = item
            self.c.pages_sharing += 1
        else:
            self.c.pages_shared += 1
        nodes.hhead[node] = item
        self._mm(item).ksm_merging_pages += 1

    # ======================================================================================
    # the stable tree
    def _candidate(self, node: int, extra: int = 0) -> bool:
        """is_page_sharing_candidate: has a mapping and room for one (more)."""
        n = int(self.nodes.hlist_len[node])
        return n > 0 and n + extra < self._mps()

    def _chain_lookup(self, node: int, tree: RbTree, prune: bool) -> tuple[int, int, int]:
        """__stable_node_chain: returns (tree node, chosen dup, its pfn or -1).

        For a plain node the dup is the node itself. For a chain the best dup is
        chosen (stable_node_dup); a chain left with one dup collapses into it.
        """
        nodes = self.nodes
        if nodes.kind[node] != CHAIN:
            return node, node, self.get_page(node)
        now = self.host.clock.now
        if prune and now >= nodes.prune_time[node] + self.knobs.stable_node_chains_prune_millisecs * 1_000_000:
            nodes.prune_time[node] = now
        else:
            prune = False
        found, found_len, found_pfn = NIL, 0, -1
        d = int(nodes.dhead[node])
        while d != NIL:
            nxt = int(nodes.dnext[d])
            self.work[fastscan.W_DUPS] += 1
            pfn = self.get_page(d)
            if pfn >= 0 and (found == NIL or (self._candidate(d) and (
                    not self._candidate(found) or nodes.hlist_len[d] > found_len))):
                found, found_len, found_pfn = d, int(nodes.hlist_len[d]), pfn
                if not prune and self._candidate(found):
                    break
            d = nxt
        if found == NIL:
            self._free_chain(node)
            return node, NIL, -1
        if nodes.dhead[node] == found and nodes.dnext[found] == NIL:
            nodes.del_dup(found)                  # the last dup replaces its chain
            nodes.kind[found] = NODE
            nodes.nid[found] = nodes.nid[node]
            tree.replace(node, found)
            nodes.free(node)
            self.c.stable_node_chains -= 1
            self.c.stable_node_dups -= 1
            return found, found, found_pfn
        if nodes.dhead[node] != found and self._candidate(found, 1):
            nodes.del_dup(found)
            nodes.add_dup(node, found)
        return node, found, found_pfn

    def _new_chain(self, node: int, tree: RbTree) -> int:
        """alloc_stable_node_chain: a chain takes ``node``'s place and ``node`` becomes its dup."""
        chain = self.nodes.alloc(CHAIN)
        self.nodes.prune_time[chain] = self.host.clock.now
        self.nodes.nid[chain] = self.nodes.nid[node]
        self.nodes.key[chain] = self.nodes.key[node]
        tree.replace(node, chain)
        self.nodes.add_dup(chain, node)
        self.c.stable_node_chains += 1
        self.c.stable_node_dups += 1
        return chain

    def stable_tree_search(self, pfn: int) -> int:
        """A KSM page identical to ``pfn`` with room for one more mapping, or -1."""
        frames, nodes = self.host.frames, self.nodes
        page_node = int(frames.owner[pfn]) if frames.flags[pfn] & PG_KSM else NIL
        if page_node != NIL and nodes.kind[page_node] != MIGRATE:
            return pfn                                   # a KSM page reached through a fork
        nid = self._nid_of_pfn(pfn)
        tree = self.stable_trees[nid]
        key = self._key(pfn)
        chains = self.profile.ksm_stable_node_chains
        if page_node == NIL and self.stable_indexed():
            return self._stable_lookup(pfn, key, nid, tree)
        while True:                                      # "again": restart after pruning
            cur, parent, go_left, restart = tree.root, NIL, False, False
            while cur != NIL:
                self.work[fastscan.W_COMPARES] += 1
                node, dup, tree_pfn = self._chain_lookup(cur, tree, prune=True)
                if tree_pfn < 0:
                    restart = True
                    break
                tkey = self._key(tree_pfn)
                parent = node
                if key < tkey:
                    cur, go_left = int(nodes.links.left[node]), True
                elif key > tkey:
                    cur, go_left = int(nodes.links.right[node]), False
                else:
                    if page_node != NIL and frames.mapcount[pfn] > 1:
                        return self._chain_append(page_node, node, dup, tree, nid, pfn)
                    if chains and not self._candidate(dup):
                        return -1                        # every copy is full: make a new one
                    tree_pfn = self.get_page(dup)
                    if tree_pfn < 0:
                        restart = True
                        break
                    if self._nid_of_pfn(int(nodes.kpfn[dup])) != nodes.nid[dup]:
                        return self._replace_misplaced(page_node, node, dup, tree, nid, pfn)
                    return tree_pfn
            if restart:
                continue
            if page_node == NIL:
                return -1
            del nodes.migrate_nodes[page_node]           # a migrated node finds its new home
            nodes.nid[page_node] = nid
            nodes.kind[page_node] = NODE
            tree.link(page_node, parent, go_left)
            return pfn if self._candidate(page_node) else -1

    def _stable_insert_walk(self, tree, key: int) -> tuple[int, bool, int]:
        """Walk to where ``key`` belongs (chain() on each node, restarting after a prune);
        returns (parent, go_left, the node with an equal key or NIL)."""
        nodes = self.nodes
        while True:
            cur, parent, go_left = tree.root, NIL, False
            while cur != NIL:
                self.work[fastscan.W_COMPARES] += 1
                node, dup, tree_pfn = self._chain_lookup(cur, tree, prune=False)
                if tree_pfn < 0:
                    break
                tkey = self._key(tree_pfn)
                parent = node
                if key < tkey:
                    cur, go_left = int(nodes.links.left[node]), True
                elif key > tkey:
                    cur, go_left = int(nodes.links.right[node]), False
                else:
                    return parent, go_left, node
            else:
                return parent, go_left, NIL

    def stable_indexed(self) -> bool:
        """True while a stable-tree walk can only meet plain, live nodes (no chain, nothing
        stale): then it has no side effects, and a key lookup gives the same answer."""
        return self.c.stable_node_chains == 0 and self.nodes.stale_count == 0

    def _stable_lookup(self, pfn: int, key: int, nid: int, tree) -> int:
        nodes = self.nodes
        node = int(ki_find(self.stable_index.slots, nodes.key, nodes.nid, np.uint64(key), nid))
        self.work[fastscan.W_COMPARES] += fastscan._depth(self.stable_index.count)
        if node == NIL or not self._candidate(node):
            return -1
        tree_pfn = self.get_page(node)
        if self._nid_of_pfn(int(nodes.kpfn[node])) != nodes.nid[node]:
            return self._replace_misplaced(NIL, node, node, tree, nid, pfn)
        return tree_pfn

    def _chain_append(self, page_node: int, node: int, dup: int, tree: RbTree, nid: int, pfn: int) -> int:
        """A migrated KSM page with several mappings joins its content's chain as a dup."""
        nodes = self.nodes
        if node == dup:
            node = self._new_chain(dup, tree)
        del nodes.migrate_nodes[page_node]
        nodes.nid[page_node] = nid
        nodes.add_dup(node, page_node)
        self.c.stable_node_dups += 1
        return pfn if self._candidate(page_node) else -1

    def _replace_misplaced(self, page_node: int, node: int, dup: int, tree: RbTree, nid: int,
                           pfn: int) -> int:
        """The matching KSM page itself migrated away: take its place, send it to migrate_nodes."""
        nodes = self.nodes
        result = -1
        if dup == node:
            if page_node != NIL:
                del nodes.migrate_nodes[page_node]
                nodes.nid[page_node] = nid
                nodes.kind[page_node] = NODE
                tree.replace(dup, page_node)
                result = pfn if self._candidate(page_node) else -1
            else:
                tree.erase(dup)
        else:
            nodes.del_dup(dup)
            self.c.stable_node_dups -= 1
            if page_node != NIL:
                del nodes.migrate_nodes[page_node]
                nodes.nid[page_node] = nid
                nodes.add_dup(node, page_node)
                self.c.stable_node_dups += 1
                result = pfn if self._candidate(page_node) else -1
        nodes.kind[dup] = MIGRATE
        nodes.migrate_nodes[dup] = None
        return result

    def stable_tree_insert(self, kpfn: int) -> int:
        """A node for a freshly made KSM page; a dup if its content is already there."""
        nodes = self.nodes
        nid = self._nid_of_pfn(kpfn)
        tree = self.stable_trees[nid]
        key = self._key(kpfn)
        if self.stable_indexed():
            equal = int(ki_find(self.stable_index.slots, nodes.key, nodes.nid, np.uint64(key), nid))
            parent, go_left, depth = fastscan.stable_insert_point(
                nodes.links.left, nodes.links.right, nodes.key, tree.root, np.uint64(key))
            self.work[fastscan.W_COMPARES] += depth
        else:
            parent, go_left, equal = self._stable_insert_walk(tree, key)
        if equal != NIL and not self.profile.ksm_stable_node_chains:
            return NIL                                   # 2.6.33: an equal node already exists
        new = nodes.alloc(NODE)
        nodes.kpfn[new] = kpfn
        nodes.key[new] = key
        nodes.nid[new] = nid
        if equal == NIL:
            tree.link(new, parent, go_left)
        else:
            chain = equal if nodes.kind[equal] == CHAIN else self._new_chain(equal, tree)
            nodes.add_dup(chain, new)
            self.c.stable_node_dups += 1
        self.host.frames.owner[kpfn] = new
        return new

    # ======================================================================================
    # the unstable tree
    def get_mergeable_page(self, item: int) -> int:
        mm = self._mm(item)
        vpn = int(self.items.address[item])
        vma = find_mergeable_vma(mm, vpn)
        if vma is None:
            return -1
        return pages.anon_page_at(self.host, vma, vpn - vma.start)

    def _unstable_hashed(self, item: int, pfn: int) -> tuple[int, int]:
        """The unstable tree as hash + log while nothing changed (see fastscan)."""
        items = self.items
        nid = self._nid_of_pfn(pfn)
        key = np.uint64(self._key(pfn))
        mask = len(self._uh) - 1
        t, h = fastscan.hash_find(self._uh, mask, items.tree_key, items.nid, key, nid)
        self.work[fastscan.W_COMPARES] += fastscan._depth(int(self._ulog_len[0]))
        if t != NIL:
            tpfn = int(items.tree_pfn[t])
            if tpfn == pfn:
                return NIL, -1
            if not self.knobs.merge_across_nodes and int(self.host.phys.node_of(tpfn)) != nid:
                return NIL, -1
            return int(t), tpfn
        items.flags[item] |= UNSTABLE_FLAG | (self.seqnr & SEQNR_MASK)
        items.nid[item] = nid
        items.tree_pfn[item] = pfn
        items.tree_key[item] = key
        items.tree_gen[item] = self._mm(item).data_gen
        self._uh[h] = item
        self._log_unstable(item)
        self.c.pages_unshared += 1
        return NIL, -1

    def _log_unstable(self, entry: int) -> None:
        n = int(self._ulog_len[0])
        if n == len(self._ulog):
            self._ulog = np.concatenate([self._ulog, np.zeros(n, dtype=np.int32)])
        self._ulog[n] = entry
        self._ulog_len[0] = n + 1

    def build_unstable_trees(self) -> None:
        """Turn the compiled loop's hash table and log into the real rbtrees (same shape)."""
        if not self._uhashed:
            return
        self._uhashed = False
        it, ln = self.items, self.items.links
        fastscan.replay_unstable(self._ulog, int(self._ulog_len[0]), it.tree_key, it.nid,
                                 ln.left, ln.right, ln.parent, ln.color, ln.roots)

    def _unstable_clean(self) -> bool:
        return int(self.host.changes[0]) == self._pass_changes

    def unstable_tree_search_insert(self, item: int, pfn: int) -> tuple[int, int]:
        """An identical page in the unstable tree (item, pfn); else insert ``item``."""
        if self._uhashed and self._unstable_clean():
            return self._unstable_hashed(item, pfn)
        self.build_unstable_trees()
        nid = self._nid_of_pfn(pfn)
        tree = self.unstable_trees[nid]
        links = self.items.links
        key = self._key(pfn)
        cur, parent, go_left = tree.root, NIL, False
        while cur != NIL:
            self.work[fastscan.W_COMPARES] += 1
            tree_pfn = self.get_mergeable_page(cur)
            if tree_pfn < 0 or tree_pfn == pfn:
                return NIL, -1          # a page vanished, or this very page reached by fork
            self.items.tree_pfn[cur] = tree_pfn          # still right under this generation
            self.items.tree_key[cur] = self._key(tree_pfn)
            self.items.tree_gen[cur] = self._mm(cur).data_gen
            tkey = self._key(tree_pfn)
            parent = cur
            if key < tkey:
                cur, go_left = int(links.left[cur]), True
            elif key > tkey:
                cur, go_left = int(links.right[cur]), False
            elif not self.knobs.merge_across_nodes and int(self.host.phys.node_of(tree_pfn)) != nid:
                return NIL, -1
            else:
                return cur, tree_pfn
        self.items.flags[item] |= UNSTABLE_FLAG | (self.seqnr & SEQNR_MASK)
        self.items.nid[item] = nid
        self.items.tree_pfn[item] = pfn
        self.items.tree_key[item] = key
        self.items.tree_gen[item] = self._mm(item).data_gen
        tree.link(item, parent, go_left)
        self.c.pages_unshared += 1
        return NIL, -1

    # ======================================================================================
    # merging
    def _merge_one(self, vma: Vma, off: int, pfn: int, kpfn: int | None, held: int = -1) -> int:
        """try_to_merge_one_page; ``kpfn`` None turns ``pfn`` itself into a KSM page.

        ``held`` is the other page ksmd holds a reference to: a huge page cannot
        be split while ksmd holds two of its pages, so that merge fails.
        """
        if pfn == kpfn:
            return 0
        frames = self.host.frames
        if not frames.flags[pfn] & (PG_ANON | PG_KSM):
            return EFAULT
        if frames.flags[pfn] & PG_COMPOUND:
            if held >= 0 and thp.same_folio(self.host, pfn, held):
                return EFAULT
            thp.split_huge_page(self.host, pfn)
        if pages.write_protect(self.host, vma, off, pfn):
            return EFAULT
        self.work[fastscan.W_MERGES] += 1
        if kpfn is None:
            frames.flags[pfn] = (frames.flags[pfn] & ~np.uint16(PG_ANON)) | PG_KSM
            frames.owner[pfn] = NO_OWNER          # the stable node is set by stable_tree_insert
            return 0
        if kpfn == ZERO_PAGE:
            if frames.content[pfn] != 0:
                return EFAULT
            rc = pages.replace(self.host, vma, off, pfn, kpfn)
            if rc == 0:
                vma.mm.ksm_zero_pages += 1
                self.c.ksm_zero_pages += 1
            return rc
        if frames.content[pfn] != frames.content[kpfn]:
            return EFAULT                         # pages_identical
        return pages.replace(self.host, vma, off, pfn, kpfn)

    def _merge_with_ksm_page(self, item: int, pfn: int, kpfn: int | None, held: int = -1) -> int:
        """try_to_merge_with_ksm_page: merge and take a reference on the VMA's anon_vma."""
        mm = self._mm(item)
        vpn = int(self.items.address[item])
        vma = find_mergeable_vma(mm, vpn)
        if vma is None:
            return EFAULT
        err = self._merge_one(vma, vpn - vma.start, pfn, kpfn, held)
        if err:
            return err
        self.remove_rmap_item_from_tree(item)
        self.host.anon_vmas.get(vma.anon_vma)
        self.items.anon_vma[item] = vma.anon_vma.id
        return 0

    def _break_cow(self, item: int) -> None:
        self._put_anon_vma(item)
        mm = self._mm(item)
        vpn = int(self.items.address[item])
        vma = find_mergeable_vma(mm, vpn)
        if vma is not None:
            pages.break_ksm(self.host, vma, vpn - vma.start)

    def _merge_with_zero_page(self, item: int, pfn: int) -> int:
        if self.knobs.use_zero_pages and int(self.items.oldchecksum[item]) == self.zero_checksum:
            mm = self._mm(item)
            vpn = int(self.items.address[item])
            vma = find_mergeable_vma(mm, vpn)
            if vma is None:
                return 0
            return self._merge_one(vma, vpn - vma.start, pfn, ZERO_PAGE)
        return EFAULT

    def cmp_and_merge_page(self, pfn: int, item: int) -> None:
        """One page: stable tree first, then the checksum rule, then the unstable tree."""
        frames, nodes, items = self.host.frames, self.nodes, self.items
        node = int(frames.owner[pfn]) if frames.flags[pfn] & PG_KSM else NIL
        if node != NIL:
            if nodes.kind[node] != MIGRATE and self._nid_of_pfn(int(nodes.kpfn[node])) != nodes.nid[node]:
                self._unlink_node(node)
                nodes.kind[node] = MIGRATE
                nodes.migrate_nodes[node] = None
            if nodes.kind[node] != MIGRATE and items.head[item] == node and items.flags[item] & STABLE_FLAG:
                return                                   # merged already: nothing to do
            self._merge_candidate(pfn, item, node)
            return
        self.remove_rmap_item_from_tree(item)
        self.work[fastscan.W_CHECKSUMS] += 1
        cs = int(checksums(frames.content[pfn:pfn + 1], self.profile.ksm_checksum)[0])
        if int(items.oldchecksum[item]) != cs:
            items.oldchecksum[item] = cs
            return                                       # volatile: changed since last visit
        self.after_checksum(pfn, item)

    def after_checksum(self, pfn: int, item: int) -> None:
        """The rest of a visit to an unchanged page: zero page, stable tree, unstable tree."""
        if self._merge_with_zero_page(item, pfn) == 0:
            return
        self._merge_candidate(pfn, item, NIL)

    def _merge_candidate(self, pfn: int, item: int, node: int) -> None:
        frames, items = self.host.frames, self.items
        kpfn = self.stable_tree_search(pfn)
        if kpfn == pfn and items.head[item] == node and items.flags[item] & STABLE_FLAG:
            return
        self.remove_rmap_item_from_tree(item)
        if kpfn >= 0:
            if self._merge_with_ksm_page(item, pfn, kpfn) == 0:
                self.stable_tree_append(item, int(frames.owner[kpfn]))
            return
        tree_item, tree_pfn = self.unstable_tree_search_insert(item, pfn)
        if tree_item == NIL:
            return
        if self._merge_with_ksm_page(item, pfn, None, held=tree_pfn) != 0:
            if thp.same_folio(self.host, pfn, tree_pfn):
                thp.split_huge_page(self.host, pfn)      # both in one huge page: split it now
            return
        if self._merge_with_ksm_page(tree_item, tree_pfn, pfn, held=pfn) != 0:
            self._break_cow(item)
            return
        new = self.stable_tree_insert(pfn)
        if new != NIL:
            self.stable_tree_append(tree_item, new)
            self.stable_tree_append(item, new)
        else:
            self._break_cow(tree_item)
            self._break_cow(item)

    # ======================================================================================
    # the scan
    def _should_skip(self, item: int, pfn: int) -> bool:
        """Smart scan: pages that never merge are visited less and less often."""
        if not (self.profile.ksm_smart_scan and self.knobs.smart_scan):
            return False
        if self.host.frames.flags[pfn] & PG_KSM:
            return False
        items = self.items
        age = int(items.age[item])
        if age != 255:
            items.age[item] = age + 1
        if age < 3:
            return False
        if items.remaining_skips[item] == 0:
            items.remaining_skips[item] = 1 if age <= 3 else 2 if age <= 5 else 4 if age <= 8 else 8
            return False
        self.c.pages_skipped += 1
        items.remaining_skips[item] -= 1
        self.remove_rmap_item_from_tree(item)
        return True

    def _next_item(self, slot: MmSlot, vpn: int) -> int:
        """get_next_rmap_item: the item for ``vpn``, freeing the ones before it."""
        items = self.items
        prev = self.prev_item
        cur = slot.rmap_list if prev == NIL else int(items.rnext[prev])
        while cur != NIL:
            addr = int(items.address[cur])
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
            size = 1 << max(10, (2 * self.items.capacity - 1).bit_length())
            if len(self._uh) != size:
                self._uh = np.full(size, NIL, dtype=np.int32)
            else:
                self._uh.fill(NIL)
            if len(self._ulog) < self.items.capacity:
                self._ulog = np.zeros(self.items.capacity, dtype=np.int32)
            self._ulog_len[0] = 0
        self._cand_cache.clear()
        self._pass_changes = int(self.host.changes[0])
        self.cursor = self.slots[0] if self.slots else None
        self.on_scan_start()
        return self.cursor is not None

    def on_scan_start(self) -> None:
        """Hook for the advisor (ksmd.py)."""

    def on_scan_end(self) -> None:
        """Hook for the advisor (ksmd.py)."""

    # The scan is scan_get_next_rmap_item + cmp_and_merge_page of mm/ksm.c, driven VMA by
    # VMA: the compiled loop (fastscan) takes the common visits, and every visit it cannot
    # finish is finished here from the stage it reached.
    STAGE_FRESH, STAGE_ITEM, STAGE_SKIPPED, STAGE_CHECKSUMMED = 0, 1, 2, 3
    _BAIL_STAGE = {fastscan.BAIL_BEFORE_ITEM: STAGE_FRESH, fastscan.BAIL_BEFORE_SKIP: STAGE_ITEM,
                   fastscan.BAIL_BEFORE_MERGE: STAGE_SKIPPED,
                   fastscan.BAIL_AFTER_CHECKSUM: STAGE_CHECKSUMMED}

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

    def do_scan(self, budget: int) -> int:
        """ksm_do_scan: process up to ``budget`` pages; a full-scan end also ends the batch."""
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
                    i, n, code, item = self._run_compiled(slot, vma, cand, i, budget - done)
                    done += n
                    if code in (fastscan.RUN_END, fastscan.RUN_BUDGET):
                        break
                    stage = self._BAIL_STAGE[code]
                done += self._scan_page(slot, vma, int(cand[i]), stage, item)
                i += 1
            if i >= len(cand):
                self.address = vma.end
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
        else:
            self.after_checksum(pfn, item)
        self.c.pages_scanned += 1
        return 1

    def _run_compiled(self, slot: MmSlot, vma: Vma, cand: np.ndarray, i: int, budget: int):
        items, nodes, frames, host = self.items, self.nodes, self.host.frames, self.host
        cursor = np.array([slot.rmap_list, self.prev_item, self.address], dtype=np.int64)
        params = np.array([self.seqnr, int(self.profile.ksm_smart_scan and self.knobs.smart_scan),
                           int(self.knobs.merge_across_nodes), int(self.knobs.use_zero_pages),
                           self.zero_checksum, int(fastscan_seed(self.profile.ksm_checksum)),
                           host.phys.block_pages,
                           int(host.changes[0] == self._pass_changes), int(self._uhashed),
                           int(self.c.stable_node_chains == 0 and nodes.stale_count == 0)],
                          dtype=np.int64)
        if self._uhashed and len(self._uh) < 2 * items.capacity:
            self.build_unstable_trees()           # the item pool grew past the table: use the tree
            params[fastscan.P_HASHED] = 0
        i, n, code, item = fastscan.scan_run(
            cand, i, budget, vma.start, vma.pte, vma.ptef, slot.mm.id, cursor,
            frames.content, frames.flags, frames.owner,
            items.mm, items.address, items.flags, items.oldchecksum, items.age,
            items.remaining_skips, items.head, items.rnext, items.nid, items.tree_pfn,
            items.tree_gen, items.tree_key, items.links.left, items.links.right,
            items.links.parent, items.links.color, items.links.roots,
            nodes.kind, nodes.kpfn, nodes.nid, nodes.key, nodes.links.left, nodes.links.right,
            nodes.links.roots, items.free_stack, items.free_top, self.c.a, host.mm_ksm,
            host.data_epoch, params, host.phys.block_node_array, self.work,
            self._uh, self._ulog, self._ulog_len, self.stable_index.slots,
            self.stable_index.count)
        slot.rmap_list, self.prev_item, self.address = int(cursor[0]), int(cursor[1]), int(cursor[2])
        return int(i), int(n), int(code), int(item)

    def should_run(self) -> bool:
        return bool(self.knobs.run & RUN_MERGE) and bool(self.slots) and not self.knobs.run & RUN_OFFLINE

    # ======================================================================================
    # registration: madvise, prctl, fork, exit
    def _drop_slot(self, slot: MmSlot) -> None:
        self.slots.remove(slot)
        del self.slot_of[slot.mm.id]
        slot.mm.ksm_mergeable = False
        slot.mm.ksm_merge_any = False

    def ksm_enter(self, mm: "MM") -> None:
        """__ksm_enter: a new slot goes just behind the cursor (at the tail during run=2)."""
        slot = MmSlot(mm)
        was_empty = not self.slots
        self.slot_of[mm.id] = slot
        if self.knobs.run & RUN_UNMERGE or self.cursor is None:
            self.slots.append(slot)
        else:
            self.slots.insert(self.slots.index(self.cursor), slot)
        mm.ksm_mergeable = True
        if was_empty:
            self.wakeup()

    def madvise(self, vma: Vma, mergeable: bool) -> int:
        if mergeable:
            if vma.flags & VmFlags.MERGEABLE or not vma.ksm_compatible:
                return 0
            if not vma.mm.ksm_mergeable:
                self.ksm_enter(vma.mm)
            vma.flags |= VmFlags.MERGEABLE
            return 0
        if not vma.flags & VmFlags.MERGEABLE:
            return 0
        if vma.anon_vma is not None:
            rc = self.unmerge_range(vma, 0, vma.pages)
            if rc:
                return rc
        vma.flags &= ~VmFlags.MERGEABLE
        vma.mm.touch_ptes()             # its pages stop being mergeable: scan caches are stale
        return 0

    def unmerge_range(self, vma: Vma, lo: int, hi: int) -> int:
        """unmerge_ksm_pages: break every KSM page and KSM zero page in [lo, hi)."""
        flags = vma.ptef[lo:hi]
        present = (flags & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT
        ksm = np.zeros(hi - lo, dtype=bool)
        ksm[present] = (self.host.frames.flags[vma.pte[lo:hi][present]] & PG_KSM) != 0
        targets = np.flatnonzero(ksm | ((flags & PTE_KSM_ZERO) != 0)) + lo
        try:
            for off in targets:
                # the unshare fault allocates like any fault: reclaim, then the OOM killer
                retry_fault(self.host, vma, lambda off=int(off): pages.break_ksm(self.host, vma, off))
        except OutOfMemory:
            return -errno.ENOMEM
        return 0

    def vma_created(self, vma: Vma) -> None:
        if vma.mm.ksm_merge_any and vma.ksm_compatible:
            vma.flags |= VmFlags.MERGEABLE

    def prctl_set_memory_merge(self, mm: "MM", enable: bool) -> int:
        """PR_SET_MEMORY_MERGE: merge-any on (every compatible VMA) or off (unmerge all)."""
        if enable:
            if mm.ksm_merge_any:
                return 0
            if not mm.ksm_mergeable:
                self.ksm_enter(mm)
            mm.ksm_merge_any = True
            for vma in mm.vmas:
                if vma.ksm_compatible:
                    vma.flags |= VmFlags.MERGEABLE
            return 0
        if not mm.ksm_merge_any:
            return 0
        for vma in mm.vmas:
            rc = self.madvise(vma, False)
            if rc:
                for v in mm.vmas:
                    if v.ksm_compatible:
                        v.flags |= VmFlags.MERGEABLE
                return rc
        mm.ksm_merge_any = False
        return 0

    def fork(self, parent: "MM", child: "MM") -> None:
        """ksm_fork: the child of a registered mm is registered; its counters start afresh."""
        child.ksm_merging_pages = 0
        child.ksm_rmap_items = 0
        child.ksm_zero_pages = parent.ksm_zero_pages      # the KSM zero PTEs were copied
        self.c.ksm_zero_pages += child.ksm_zero_pages
        if parent.ksm_mergeable:
            self.ksm_enter(child)
        else:
            child.ksm_merge_any = False

    def exit(self, mm: "MM") -> None:
        """__ksm_exit: free an idle slot now, else leave it right after the cursor for ksmd."""
        slot = self.slot_of.get(mm.id)
        if slot is None or slot is self.cursor:
            return
        self.slots.remove(slot)
        if slot.rmap_list == NIL:
            del self.slot_of[mm.id]
            mm.ksm_mergeable = False
            mm.ksm_merge_any = False
        else:
            at = 0 if self.cursor is None else self.slots.index(self.cursor) + 1
            self.slots.insert(at, slot)

    def zero_pages_unmapped(self, mm: "MM", count: int) -> None:
        mm.ksm_zero_pages -= count
        self.c.ksm_zero_pages -= count

    # ======================================================================================
    # rmap of KSM pages
    def rmap_walk(self, pfn: int, visit) -> int:
        """rmap_walk_ksm: each item's anon_vma, own mm first, then forked mms."""
        node = int(self.host.frames.owner[pfn])
        if node == NO_OWNER or self.nodes.kind[node] == FREE:
            return 0
        visited = 0
        items = self.items
        for search_new_forks in (False, True):
            it = int(self.nodes.hhead[node])
            while it != NIL:
                av = self.host.anon_vmas.by_id.get(int(items.anon_vma[it]))
                vpn = int(items.address[it])
                mm_id = int(items.mm[it])
                for vma in (list(av.vmas) if av is not None else ()):
                    if not vma.start <= vpn < vma.end or (vma.mm.id == mm_id) == search_new_forks:
                        continue
                    visited += 1
                    off = vpn - vma.start
                    if pages.anon_page_at(self.host, vma, off) == pfn and visit(vma, off) is False:
                        return visited
                it = int(items.hnext[it])
        return visited

    # ======================================================================================
    # run=2 and the knobs
    def unmerge_all(self) -> int:
        """unmerge_and_remove_all_rmap_items: break every merge, free every item, seqnr=0."""
        self.cursor = self.slots[0] if self.slots else None
        while self.cursor is not None:
            slot = self.cursor
            mm = slot.mm
            for vma in list(mm.vmas):
                if mm.exiting:
                    break
                if vma.flags & VmFlags.MERGEABLE and vma.anon_vma is not None:
                    rc = self.unmerge_range(vma, 0, vma.pages)
                    if rc:
                        self.cursor = None
                        return rc
            self.prev_item = NIL
            self._remove_trailing(slot, NIL)
            idx = self.slots.index(slot)
            self.cursor = self.slots[idx + 1] if idx + 1 < len(self.slots) else None
            if mm.exiting:
                self._drop_slot(slot)
        self.remove_all_stable_nodes()
        self.seqnr = 0
        return 0

    def _remove_stable_node(self, node: int) -> bool:
        """remove_stable_node: False (busy) when the KSM page is still mapped somewhere."""
        pfn = self.get_page(node)
        if pfn < 0:
            return True
        if self.host.frames.mapcount[pfn] > 0:
            return False
        self.host.frames.owner[pfn] = NO_OWNER
        self.remove_node_from_stable_tree(node)
        return True

    def remove_all_stable_nodes(self) -> bool:
        """Remove every stable node whose page is unmapped; False if any stays busy."""
        ok = True
        for nid, tree in enumerate(self.stable_trees):
            while tree.root != NIL:
                node = tree.root
                if self.nodes.kind[node] == CHAIN:
                    busy = any(not self._remove_stable_node(d) for d in self.nodes.dups(node))
                    if busy:
                        ok = False
                        break
                    self._free_chain(node)
                elif not self._remove_stable_node(node):
                    ok = False
                    break
        for node in list(self.nodes.migrate_nodes):
            if not self._remove_stable_node(node):
                ok = False
        return ok

    def write_knob(self, name: str, text) -> int:
        """A write to /sys/kernel/mm/ksm/NAME: 0 or -errno, effects applied."""
        available = KNOBS_6_18 if self.profile.ksm_advisor else KNOBS_2_6_33
        if name not in available:
            return -errno.ENOENT
        rc, value = self.knobs.parse(name, text)
        if rc:
            return rc
        k = self.knobs
        if name == "run":
            if k.run & RUN_OFFLINE:
                return -errno.EBUSY     # the writer would block until offlining ends
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
        if name in ("max_page_sharing", "merge_across_nodes"):
            if getattr(k, name) == value:
                return 0
            if k.run & RUN_OFFLINE:
                return -errno.EBUSY     # the writer would block until offlining ends
            if self.c.pages_shared or not self.remove_all_stable_nodes():
                return -errno.EBUSY
            setattr(k, name, value)
            return 0
        if name == "advisor_mode":
            if value != k.advisor_mode:
                k.advisor_mode = value
                k.pages_to_scan = k.advisor_min_pages_to_scan if value == "scan-time" else 100
                self.on_advisor_reset()
            return 0
        setattr(k, name, value)
        if name == "sleep_millisecs":
            self.wakeup()
        return 0

    def on_advisor_reset(self) -> None:
        """Hook for the advisor (ksmd.py)."""

    # ======================================================================================
    # consistency
    def check_invariants(self) -> list[str]:
        """Recount KSM's state from its structures and compare with the counters.

        - every item on a stable node's list points back at that node, and the node's length
          is the list's; shared/sharing are the nodes with items and the items beyond one;
        - unshared is the number of items flagged as in the unstable tree;
        - each mm's rmap_items and merging pages are its items and its items on stable lists;
        - ksm_zero_pages is the number of PTEs KSM pointed at the zero page;
        - a live node's KSM page points back at it, unless it was freed (stale, to be pruned).
        """
        problems: list[str] = []
        items, nodes, frames = self.items, self.nodes, self.host.frames
        live_items = np.flatnonzero(items.mm >= 0)
        flags = items.flags[live_items]
        stable = live_items[(flags & STABLE_FLAG) != 0]
        shared = sharing = 0
        on_lists = 0
        for node in np.flatnonzero((nodes.kind == NODE) | (nodes.kind == DUP) | (nodes.kind == MIGRATE)):
            n, it = 0, int(nodes.hhead[node])
            while it != NIL and n <= len(stable):
                if items.head[it] != node or not items.flags[it] & STABLE_FLAG:
                    problems.append(f"ksm: rmap_item {it} is on stable node {node}'s list but "
                                    "does not belong to it")
                n += 1
                it = int(items.hnext[it])
            if n != nodes.hlist_len[node]:
                problems.append(f"ksm: stable node {node} has {n} items listed, "
                                f"rmap_hlist_len {nodes.hlist_len[node]}")
            shared += n > 0
            sharing += max(n - 1, 0)
            on_lists += n
            pfn = int(nodes.kpfn[node])
            live = frames.flags[pfn] & PG_KSM and frames.owner[pfn] == node
            if not live and not nodes.stale[node] and frames.refcount[pfn] > 0:
                problems.append(f"ksm: stable node {node} lost its page {pfn} without being stale")
        if on_lists != len(stable):
            problems.append(f"ksm: {len(stable)} items flagged stable, {on_lists} on stable lists")
        c = self.c
        if (shared, sharing) != (c.pages_shared, c.pages_sharing):
            problems.append(f"ksm: counters say shared {c.pages_shared} sharing {c.pages_sharing}, "
                            f"the lists {shared} and {sharing}")
        unstable = int(np.count_nonzero(flags & UNSTABLE_FLAG))
        if unstable != c.pages_unshared:
            problems.append(f"ksm: pages_unshared {c.pages_unshared}, items flagged {unstable}")
        zero_ptes = sum(int(np.count_nonzero(v.ptef & PTE_KSM_ZERO)) for mm in self.host.live_mms()
                        for v in mm.vmas)
        if zero_ptes != c.ksm_zero_pages:
            problems.append(f"ksm: ksm_zero_pages {c.ksm_zero_pages}, KSM zero PTEs {zero_ptes}")
        for mm_id, slot in self.slot_of.items():
            mine = live_items[items.mm[live_items] == mm_id]
            merging = int(np.count_nonzero(items.flags[mine] & STABLE_FLAG))
            if (len(mine), merging) != (slot.mm.ksm_rmap_items, slot.mm.ksm_merging_pages):
                problems.append(f"ksm: mm {mm_id} counts {slot.mm.ksm_rmap_items} items and "
                                f"{slot.mm.ksm_merging_pages} merging, has {len(mine)} and {merging}")
        return problems

    # ======================================================================================
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
