"""The stable tree: KSM pages by content, their stable nodes, chains and dups.

Searching it (stable_tree_search), inserting a new KSM page (stable_tree_insert) and
the lazy upkeep a walk does on its way: a node whose page was freed is pruned when a
walk or a removal touches it (the "keyhole" check, get_page), and a chain's dups are
pruned and, when one is left, the chain collapses into it. While there is no chain and
no stale node, no walk can have a side effect, and a key lookup (stable_index) answers
for it.
"""

from __future__ import annotations

import numpy as np

from vmhost.ksm import fastscan
from vmhost.ksm.hlist import hlist_add_head, hlist_del
from vmhost.ksm.items import STABLE_FLAG
from vmhost.ksm.keyindex import ki_find
from vmhost.ksm.rbtree import NIL, RbTree
from vmhost.ksm.stable import CHAIN, DUP, MIGRATE, NODE
from vmhost.mm.frames import PG_KSM, PG_SWAPCACHE


class StableTreeMixin:
    """Part of :class:`vmhost.ksm.engine.Ksm` (see the module docstring)."""

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
        it, items = int(self.nodes.hhead[node]), self.items
        while it != NIL:
            nxt = int(items.hnext[it])
            self._uncount_stable_item(node, it, nxt != NIL)
            it = nxt
        self.nodes.hhead[node] = NIL
        self._unlink_node(node)
        self.nodes.free(node)

    def _uncount_stable_item(self, node: int, item: int, sharing: bool) -> None:
        """An rmap_item leaves KSM page ``node``: one less in pages_sharing (``sharing``: another
        item stays listed) or pages_shared, in its mm's merging pages and the node's list length;
        its anon_vma reference dropped, the item no longer in the stable tree."""
        if sharing:
            self.c.pages_sharing -= 1
        else:
            self.c.pages_shared -= 1
        self._mm(item).ksm_merging_pages -= 1
        self.nodes.hlist_len[node] -= 1
        self._put_anon_vma(item)
        self.items.set_flags(item, 0)
        self.items.head[item] = NIL

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

    def _hlist_del(self, node: int, item: int) -> None:
        hlist_del(self.nodes.hhead, self.items.hnext, self.items.hprev, int(node), int(item))

    def stable_tree_append(self, item: int, node: int) -> None:
        """Add an rmap_item to a KSM page's list (at the head, like hlist_add_head)."""
        items, nodes = self.items, self.nodes
        nodes.hlist_len[node] += 1
        items.head[item] = node
        items.mm_address[item] |= STABLE_FLAG
        if hlist_add_head(nodes.hhead, items.hnext, items.hprev, int(node), int(item)) != NIL:
            self.c.pages_sharing += 1
        else:
            self.c.pages_shared += 1
        self._mm(item).ksm_merging_pages += 1

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
        mps = self._mps()
        d = int(nodes.dhead[node])
        while d != NIL:
            nxt = int(nodes.dnext[d])
            self.work[fastscan.W_DUPS] += 1
            pfn = self.get_page(d)
            choice = fastscan.dup_choice(found, found_len, int(nodes.hlist_len[d]), mps) if pfn >= 0 else 0
            if choice != 0:
                found, found_len, found_pfn = d, int(nodes.hlist_len[d]), pfn
                if choice == 2 and not prune:
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
        node = int(ki_find(self.stable_index.slots, nodes.key, nodes.nid, np.uint64(key),
                           int(nid)))
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
            equal = int(ki_find(self.stable_index.slots, nodes.key, nodes.nid, np.uint64(key),
                                int(nid)))
            parent, go_left, depth = fastscan.insert_point(
                nodes.links.left, nodes.links.right, nodes.key, int(tree.root), np.uint64(key))
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
