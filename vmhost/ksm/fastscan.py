"""The compiled part of ksmd's scan: page visits, merges included, at native speed.

A full scan visits every anonymous page of every mergeable VMA. ``scan_run`` does a run of
one VMA's pages on the same arrays the Python engine uses, passed as named groups
(``FrameArrays``, ``ItemArrays``, ``NodeArrays``, ``ScanState`` and the registry of
mergeable VMAs, ``vma_registry.VmaArrays``): it finds or creates each page's rmap_item
(get_next_rmap_item), applies smart scan, the checksum rule, looks the page up in the stable
tree (by key while the tree has no chain and no stale node, else walking it, chains and
dups included) and in the unstable tree, and merges: into an existing KSM page, or two
pages into a new KSM page with its stable node inserted in the tree (the other page's PTE
is reached through the VMA registry).

Whenever a visit needs anything more (a stale stable node to prune, a chain to collapse, a
new chain, a KSM zero page, a huge page to split, a page in the swap cache, a pinned page
whose merge must be undone, a pool running dry) it stops *before the step that needs it*,
with nothing of that step done, and returns a bail code naming how far it got; the engine
finishes that visit in Python (``Ksm._scan_page``, the reference path) and calls back in.
The rules both paths share are written once, here and in ``checksum``: the smart-scan
skip (``smart_skip``), the checksum (``checksum_of``), the memcmp key, the unstable tree's
hash form, and every constant is imported from the module that defines it.

The unstable tree is rebuilt from empty every full scan, and while nothing in any address
space changes, a search of it can only end at the node whose key equals the page's (no
node on the way can have lost its page or its contents). So until the first change of a
pass, the compiled loop keeps the unstable tree as a hash table plus a log of insertions and
erasures; the real rbtree is built from the log (``replay_unstable``, the same operations in
the same order, hence the same shape) the moment anything needs the tree itself.

Page tables reach this code as 32-bit PTEs (``vmhost.mm.vma.PTE_DTYPE``, through
``vma_registry.page_tables``). numba keys its on-disk cache of this file by this file
alone: a change of a dtype or a helper compiled in from another module must come with a
change of this file, or a stale cache runs the old code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vmhost.ksm.arraygroup import group, prefetch
from vmhost.ksm.checksum import checksum_of, memcmp_key_of
from vmhost.ksm.counters import (C_CHAINS, C_DUPS, C_SCANNED, C_SHARED, C_SHARING, C_SKIPPED,
                                 C_UNSHARED, W_CHECKSUMS, W_COMPARES, W_DUPS, W_MERGES, W_PTES)
from vmhost.ksm.items import (SEQNR_MASK, SMART_AGE_MAX, SMART_SKIPS_SHIFT, STABLE_FLAG,
                              UNSTABLE_FLAG, freed_word, item_flags,
                              item_mm, item_vpn, pack_item, with_flags)
from vmhost.ksm.hlist import hlist_add_head, hlist_del
from vmhost.ksm.keyindex import EMPTY, TOMB, ki_find, ki_insert, ki_locate, key_mix, slot_of
from vmhost.ksm.rbtree import NIL, rb_erase, rb_link, rb_replace
from vmhost.ksm.stable import CHAIN, DUP, FREE, MIGRATE, NODE
from vmhost.ksm.vma_registry import find_vma, page_tables
from vmhost.mm.frames import (NO_OWNER, PG_ANON, PG_COMPOUND, PG_DIRTY, PG_KSM, PG_MLOCKED,
                              PG_SWAPCACHE)
from vmhost.mm.vma import PTE_DIRTY, PTE_PRESENT, PTE_WRITE, PTE_YOUNG, PTE_ZERO

# scan_run's return codes
RUN_END, RUN_BUDGET = 0, 1
BAIL_BEFORE_ITEM, BAIL_BEFORE_SKIP, BAIL_BEFORE_MERGE, BAIL_AFTER_CHECKSUM = 2, 3, 4, 5
BAIL_AFTER_STABLE = 6       # the stable tree had nothing: Python goes on with the unstable tree
N_CODES = 7
LOOKAHEAD = 16               # visits ahead that scan_run starts fetching a page's frame
ERASE_WORDS = 2              # an erasure in the unstable tree's log: -item - 2, -nid - 2
                             # (ulog_len: [words, erasures]; a hashed search counts the tree's
                             # depth as that of a tree of the log's records, words - erasures)

# the parameter array
(P_SEQNR, P_SMART, P_ACROSS, P_USE_ZERO, P_ZERO_SUM, P_SEED, P_BLOCK_PAGES, P_CLEAN, P_HASHED,
 P_STABLE_INDEXED, P_NOW, P_PRUNE_NS, P_MPS, P_CHAINS, N_PARAMS) = range(15)


FrameArrays, FrameArraysType = group(
    "FrameArrays", ("content", "flags", "owner", "mapcount", "refcount", "index"),
    "The page frames' arrays (``mm.frames``).", __name__)
ItemArrays, ItemArraysType = group(
    "ItemArrays", ("mm_address", "oldchecksum", "smart", "head",
                   "hnext", "hprev", "anon_vma", "nid", "rnext", "tree_key", "left", "right",
                   "parent", "color", "roots", "free_list"),
    "The rmap_items' arrays and the unstable trees' links (``items``).", __name__)
NodeArrays, NodeArraysType = group(
    "NodeArrays", ("kind", "kpfn", "prune_time", "hlist_len", "hhead", "nid", "chain", "dhead",
                   "dnext", "dprev", "key", "stale", "stale_state", "left", "right", "parent",
                   "color", "roots", "free_stack", "free_top", "ki_slots", "ki_state"),
    "The stable nodes' arrays, the stable trees' links and the key index.", __name__)
ScanState, ScanStateType = group(
    "ScanState", ("params", "cnt", "work", "mm_ksm", "block_node", "uh", "ulog",
                  "ulog_len", "eff_chain", "eff_found", "eff_prune", "freed", "freed_n",
                  "av_delta"),
    "The scan's parameters, counters and scratch tables.", __name__)


#: a helper only compiled code calls: no Python entry point is made for it (numba would
#: otherwise compile one per helper, unpacking every group it takes)
inner = njit(cache=True, nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)

_WD = PTE_WRITE | PTE_DIRTY
_CLEAN_RO = np.uint8(~_WD & 0xFF)
_NOT_ANON = np.uint16(~PG_ANON & 0xFFFF)
_NOT_MLOCKED = np.uint16(~PG_MLOCKED & 0xFFFF)


def frame_arrays(frames) -> FrameArrays:
    return FrameArrays(frames.content, frames.flags, frames.owner, frames.mapcount,
                       frames.refcount, frames.index)


def item_arrays(items) -> ItemArrays:
    ln = items.links
    return ItemArrays(items.mm_address, items.oldchecksum, items.smart, items.head, items.hnext, items.hprev, items.anon_vma,
                      items.nid, items.rnext, items.tree_key,
                      ln.left, ln.right, ln.parent, ln.color, ln.roots, items.free_list)


def node_arrays(nodes, index) -> NodeArrays:
    ln = nodes.links
    return NodeArrays(nodes.kind, nodes.kpfn, nodes.prune_time, nodes.hlist_len, nodes.hhead,
                      nodes.nid, nodes.chain, nodes.dhead, nodes.dnext, nodes.dprev, nodes.key,
                      nodes.stale, nodes.stale_state, ln.left, ln.right, ln.parent, ln.color,
                      ln.roots,
                      nodes.free_stack, nodes.free_top, index.slots, index.state)


@njit(cache=True, nogil=True)
def _depth(n):
    """About how many nodes a search of an n-node red-black tree compares with."""
    d = 0
    while n > 0:
        n >>= 1
        d += 1
    return d


def depth(n: int) -> int:
    return int(_depth(n))


@njit(cache=True, nogil=True)
def smart_skip(age, skips):
    """Smart scan's rule for a page that is not a KSM page (should_skip_rmap_item):
    returns (new age, new remaining_skips, skip it this time)."""
    if age != 255:
        new_age = age + 1
    else:
        new_age = age
    if age < 3:
        return new_age, skips, False
    if skips == 0:
        if age <= 3:
            return new_age, 1, False
        if age <= 5:
            return new_age, 2, False
        if age <= 8:
            return new_age, 4, False
        return new_age, 8, False
    return new_age, skips - 1, True


@njit(cache=True, nogil=True)
def smart_step(smart):
    """``smart_skip`` on an rmap_item's ``smart`` byte (its age in the low bits, saturating
    at ``SMART_AGE_MAX``, and its remaining_skips in the high bits): returns (the new byte,
    skip it this time). The rule tells no age above 8 from another (skip_age), so an age
    kept to SMART_AGE_MAX decides as the kernel's u8 age does."""
    age, skips, skip = smart_skip(np.int64(smart & SMART_AGE_MAX),
                                  np.int64(smart >> SMART_SKIPS_SHIFT))
    return min(age, SMART_AGE_MAX) | (skips << SMART_SKIPS_SHIFT), skip


@njit(cache=True, nogil=True)
def dup_choice(found, found_len, hl, mps):
    """stable_node_dup's choice among a chain's dups: 0 if a dup with ``hl`` mappings does not
    replace the one found so far (``found``, with ``found_len`` mappings; NIL: none yet), 1 if
    it does, 2 if it does and is a sharing candidate (is_page_sharing_candidate: a mapping and
    room for one more), where a walk that does not prune stops."""
    sharable = hl > 0 and hl < mps
    if found == NIL or (sharable and (not (found_len > 0 and found_len < mps) or hl > found_len)):
        return 2 if sharable else 1
    return 0


@njit(cache=True, nogil=True)
def hash_tag(key, nid, mask):
    """The bits above an item's id in its slot of the hashed unstable tree (a table of
    ``mask + 1`` slots, more than any item id): those of the low 31 bits of (key, tree)'s mix.
    A search reads the key of an item whose slot has its tag only, 1 in 2**(31 - log2 of the
    table's size) of the others (the table may then be up to half full, one slot an item)."""
    return np.int64(key_mix(np.uint64(key), np.int64(nid)) & np.uint64(0x7FFFFFFF)) & ~mask


@njit(cache=True, nogil=True)
def hash_entry(item, key, nid, mask):
    """What the slot of ``item`` (key ``key`` in tree ``nid``) holds: its tag and its id."""
    return hash_tag(key, nid, mask) | item


@njit(cache=True, nogil=True)
def hash_find(uh, mask, it_key, it_nid, key, nid):
    """The unstable-tree item with this key in tree ``nid`` (or NIL), and the slot where it
    is or where it would be inserted (the first tombstone on the way, else the empty slot);
    an item is in the slot ``hash_entry`` gives it."""
    h = slot_of(np.uint64(key), np.int64(nid), np.int64(mask))
    tag = hash_tag(key, nid, mask)
    free = -1
    while uh[h] != EMPTY:
        e = uh[h]
        if e == TOMB:
            if free < 0:
                free = h
        elif (e & ~mask) == tag:
            t = e & mask
            if it_key[t] == key and it_nid[t] == nid:
                return t, h
        h = (h + 1) & mask
    return NIL, (free if free >= 0 else h)


@njit(cache=True, nogil=True)
def log_erasure(ulog, ulog_len, item, nid):
    """An erasure in the hashed unstable tree's log: ``-item-2``, then ``-nid-2`` (the tree it
    left: once out of it the item may hold an anon_vma in that field), ``ERASE_WORDS`` words;
    the caller made room. ``ulog_len``: words, erasures."""
    n = ulog_len[0]
    ulog[n] = -item - 2
    ulog[n + 1] = -nid - 2
    ulog_len[0] = n + ERASE_WORDS
    ulog_len[1] += 1


@njit(cache=True, nogil=True)
def hashed_search_compares(ulog_len):
    """The compares a search of the hashed unstable tree is charged: the depth of a tree of
    as many nodes as the log has records (its words less the erasures' second words)."""
    return _depth(ulog_len[0] - ulog_len[1])


@njit(cache=True, nogil=True)
def hash_remove(uh, it_key, it_nid, item):
    mask = uh.shape[0] - 1
    h = slot_of(it_key[item], np.int64(it_nid[item]), np.int64(mask))
    entry = hash_entry(item, it_key[item], it_nid[item], mask)
    while uh[h] != entry:
        h = (h + 1) & mask
    uh[h] = TOMB


@njit(cache=True, nogil=True)
def hash_rebuild(uh, log, n, it_key, it_nid, it_word, seqnr):
    """Fill the empty table ``uh`` with the items of this pass's unstable tree (scan number
    ``seqnr``, its low byte) that the first ``n`` entries of the log inserted, once each (an
    item freed and allocated again may be inserted twice in a pass; keys in the tree are
    unique, so the one found under its key is itself)."""
    mask = uh.shape[0] - 1
    want = UNSTABLE_FLAG | seqnr
    for j in range(n):
        item = log[j]               # an erasure's two words are both negative
        if item < 0 or item_flags(it_word[item]) & (UNSTABLE_FLAG | SEQNR_MASK) != want:
            continue
        t, h = hash_find(uh, np.int64(mask), it_key, it_nid, it_key[item], np.int64(it_nid[item]))
        if t == NIL:
            uh[h] = hash_entry(item, it_key[item], it_nid[item], mask)


@njit(cache=True, nogil=True)
def insert_point(left, right, keys, root, key):
    """Where a new key goes in a tree whose nodes' keys are ``keys`` (no side effects on the
    way: a stable tree of plain live nodes, or an unstable tree rebuilt from its log);
    returns (parent, go_left, nodes compared)."""
    cur = root
    at = NIL
    go_left = False
    d = 0
    while cur != NIL:
        d += 1
        at = cur
        if key < keys[cur]:
            cur = left[cur]
            go_left = True
        else:
            cur = right[cur]
            go_left = False
    return at, go_left, d


@njit(cache=True, nogil=True)
def replay_unstable(log, n, it_key, it_nid, it_word, il, ir, ipar, icol, uroots):
    """Build the unstable rbtrees from the log: insertions (item) and erasures (-item-2 and
    then -nid-2), keys as they are now: nothing changed since they were logged, or the log
    would have ended (an item the log holds twice must have kept its key). An rmap_item's links and its nid are its stable fields too
    (``items``: unions): an item the log erases may have joined a stable node's list since.
    So each insertion goes into the tree its item's next erasure names (logged with it), or,
    never erased, the tree the item is in now; each erasure leaves the tree it names; and
    afterwards every erased item gets back the ``anon_vma`` (nid) it holds now and, if no
    longer in the tree, its links."""
    records = 0
    erased = 0
    j = 0
    while j < n:
        records += 1
        if log[j] < 0:
            erased += 1
            j += ERASE_WORDS
        else:
            j += 1
    pos = np.empty(records, dtype=np.int64)        # each record's place in the log
    nids = np.empty(records, dtype=np.int64)       # the tree of each insertion
    saved = np.empty((erased, 4), dtype=il.dtype)  # an erased item's fields as they are now
    r = 0
    k = 0
    j = 0
    while j < n:
        pos[r] = j
        r += 1
        if log[j] < 0:
            item = -log[j] - 2
            saved[k, 0], saved[k, 1], saved[k, 2] = il[item], ir[item], ipar[item]
            saved[k, 3] = it_nid[item]
            k += 1
            j += ERASE_WORDS
        else:
            j += 1
    for r in range(records - 1, -1, -1):           # it_nid: the tree of the item's next erasure
        j = pos[r]
        if log[j] < 0:
            it_nid[-log[j] - 2] = -log[j + 1] - 2
        else:
            nids[r] = it_nid[log[j]]
    for r in range(records):
        j = pos[r]
        item = log[j]
        if item < 0:
            rb_erase(il, ir, ipar, icol, uroots, np.int64(-log[j + 1] - 2), np.int64(-item - 2))
            continue
        nid = nids[r]
        at, go_left, _ = insert_point(il, ir, it_key, np.int64(uroots[nid]), it_key[item])
        rb_link(il, ir, ipar, icol, uroots, np.int64(nid), np.int64(item), np.int64(at), go_left)
    k = 0
    for r in range(records):
        j = pos[r]
        if log[j] < 0:
            item = -log[j] - 2
            it_nid[item] = saved[k, 3]
            if not it_word[item] & UNSTABLE_FLAG:
                il[item], ir[item], ipar[item] = saved[k, 0], saved[k, 1], saved[k, 2]
            k += 1


@inner
def unstable_erase(IT, S, item, hashed):
    """remove_rmap_item_from_tree for an item in this pass's unstable tree: out of the hash
    table (logged, with its nid: once out of the tree the item may hold an anon_vma in that
    field) while the tree is hashed, else out of the rbtree. False, with nothing done, if the
    log is full."""
    if hashed:
        if S.ulog_len[0] + ERASE_WORDS > S.ulog.shape[0]:
            return False
        hash_remove(S.uh, IT.tree_key, IT.nid, np.int64(item))
        log_erasure(S.ulog, S.ulog_len, np.int64(item), np.int64(IT.nid[item]))
    else:
        rb_erase(IT.left, IT.right, IT.parent, IT.color, IT.roots, np.int64(IT.nid[item]),
                 np.int64(item))
    return True


@inner
def _leave_unstable(IT, S, item, fl, seqnr, hashed, clean):
    """remove_rmap_item_from_tree for an item flagged UNSTABLE (flags ``fl``): out of this
    pass's tree if it went in this pass, and un-counted. False, with nothing done, when
    leaving the tree needs Python (the hashed tree must be built first, or its log is
    full)."""
    if ((seqnr - fl) & SEQNR_MASK) == 0:
        if (hashed and not clean) or not unstable_erase(IT, S, item, hashed):
            return False
    S.cnt[C_UNSHARED] -= 1
    IT.mm_address[item] = with_flags(IT.mm_address[item], 0)
    IT.anon_vma[item] = -1              # its nid (a union)
    return True


@inner
def mergeable_page(F, V, mm, address):
    """get_mergeable_page: the anonymous (or KSM) page mapped at ``address`` of ``mm`` in a
    mergeable VMA, or -1 (UnstableTreeMixin.get_mergeable_page)."""
    tv = find_vma(V, mm, address)
    if tv < 0:
        return -1
    toff = address - V.start[tv]
    tpte, tptef = page_tables(V, np.int64(tv))
    if (tptef[toff] & (PTE_PRESENT | PTE_ZERO)) != PTE_PRESENT:
        return -1
    tpfn = tpte[toff]
    if (F.flags[tpfn] & (PG_ANON | PG_KSM)) == 0:
        return -1
    return tpfn


@inner
def _put_one(F, S, pfn):
    """One mapping and its reference dropped from an ordinary page (not huge, not in the
    swap cache); a page left unreferenced is cleared and handed back for Python to free."""
    F.mapcount[pfn] -= 1
    F.refcount[pfn] -= 1
    if F.mapcount[pfn] != 0:
        return
    F.flags[pfn] &= _NOT_MLOCKED
    if F.refcount[pfn] == 0:
        F.content[pfn] = 0
        F.flags[pfn] = 0
        F.owner[pfn] = NO_OWNER
        F.index[pfn] = 0
        S.freed[S.freed_n[0]] = pfn
        S.freed_n[0] += 1


@inner
def stable_append(IT, ND, S, item, node):
    """stable_tree_append: the item goes at the head of the KSM page's list."""
    ND.hlist_len[node] += 1
    IT.head[item] = node
    IT.mm_address[item] |= STABLE_FLAG
    if hlist_add_head(ND.hhead, IT.hnext, IT.hprev, np.int64(node), np.int64(item)) != NIL:
        S.cnt[C_SHARING] += 1
    else:
        S.cnt[C_SHARED] += 1
    S.mm_ksm[item_mm(IT.mm_address[item]), 1] += 1


@inner
def _write_protect(F, ptef, off, pfn):
    """write_protect_page on an ordinary page (the pin was checked by the caller)."""
    flags = ptef[off]
    if flags & _WD:
        if flags & PTE_DIRTY:
            F.flags[pfn] |= PG_DIRTY
        ptef[off] = flags & _CLEAN_RO


@inner
def _replace_page(F, S, pte, ptef, off, pfn, kpfn, locked):
    """replace_page: the PTE maps the KSM page instead, the old page loses a mapping."""
    S.work[W_MERGES] += 1
    F.mapcount[kpfn] += 1
    F.refcount[kpfn] += 1
    if locked:
        F.flags[kpfn] |= PG_MLOCKED
    pte[off] = kpfn
    ptef[off] = PTE_PRESENT | PTE_YOUNG
    _put_one(F, S, np.int64(pfn))


@inner
def _merge_into(F, IT, ND, S, node, item, off, pfn, pte, ptef, vma_locked, vma_anon_vma):
    """try_to_merge_with_ksm_page + stable_tree_append for an ordinary page, exactly as
    Ksm._merge_one and Ksm.stable_tree_append do it (the caller checked it is possible); the
    page's visit is counted as done."""
    S.cnt[C_SCANNED] += 1
    kp = ND.kpfn[node]
    if ptef[off] & _WD and F.mapcount[pfn] != F.refcount[pfn]:
        return                                        # pinned: the merge fails, retried later
    _write_protect(F, ptef, np.int64(off), np.int64(pfn))
    _replace_page(F, S, pte, ptef, np.int64(off), np.int64(pfn), np.int64(kp),
                  vma_locked)
    IT.anon_vma[item] = vma_anon_vma                  # a reference on the VMA's anon_vma
    S.av_delta[vma_anon_vma] += 1
    stable_append(IT, ND, S, np.int64(item), np.int64(node))


@inner
def _stable_insert_walk(F, ND, S, nid, key, mps):
    """Where stable_tree_insert links a new node for ``key`` when the tree may hold chains
    and stale nodes (Ksm._stable_insert_walk, chains looked up without pruning), first
    without side effects: returns (ok, parent, go_left, nodes compared, dups walked, dup
    moves to apply, recorded in S.eff_chain/eff_found, the node with an equal key or NIL).
    Not ok when the walk would prune a stale node, free or collapse a chain: that is
    Python's."""
    cur = ND.roots[nid]
    at = NIL
    go_left = False
    walked = 0
    dups = 0
    moves = 0
    while cur != NIL:
        walked += 1
        kind = ND.kind[cur]
        if kind == CHAIN:
            found = NIL
            found_len = 0
            d = ND.dhead[cur]
            while d != NIL:
                dups += 1
                kp = ND.kpfn[d]
                if (F.flags[kp] & PG_KSM) == 0 or F.owner[kp] != d:
                    return False, NIL, False, 0, 0, 0, NIL
                choice = dup_choice(np.int64(found), np.int64(found_len),
                                    np.int64(ND.hlist_len[d]), np.int64(mps))
                if choice != 0:
                    found = d
                    found_len = ND.hlist_len[d]
                    if choice == 2:
                        break
                d = ND.dnext[d]
            if found == NIL or (ND.dhead[cur] == found and ND.dnext[found] == NIL):
                return False, NIL, False, 0, 0, 0, NIL
            if ND.dhead[cur] != found and found_len > 0 and found_len + 1 < mps:
                if moves >= S.eff_chain.shape[0]:
                    return False, NIL, False, 0, 0, 0, NIL
                S.eff_chain[moves] = cur
                S.eff_found[moves] = found
                moves += 1
        elif kind == NODE:
            kp = ND.kpfn[cur]
            if (F.flags[kp] & PG_KSM) == 0 or F.owner[kp] != cur:
                return False, NIL, False, 0, 0, 0, NIL
        else:
            return False, NIL, False, 0, 0, 0, NIL
        at = cur
        tk = ND.key[cur]
        if key < tk:
            cur = ND.left[cur]
            go_left = True
        elif key > tk:
            cur = ND.right[cur]
            go_left = False
        else:
            return True, at, go_left, walked, dups, moves, cur
    return True, at, go_left, walked, dups, moves, NIL


@inner
def _move_dup_to_head(ND, chain, found):
    """The chain's dup ``found`` moves to the head of its list (hlist_del + hlist_add_head)."""
    hlist_del(ND.dhead, ND.dnext, ND.dprev, np.int64(chain), np.int64(found))
    hlist_add_head(ND.dhead, ND.dnext, ND.dprev, np.int64(chain), np.int64(found))


@inner
def _live(F, ND, node):
    """ksm_get_folio's keyhole: the node's page is still its KSM page."""
    kp = ND.kpfn[node]
    return kp >= 0 and (F.flags[kp] & PG_KSM) != 0 and F.owner[kp] == node


@inner
def _free_node(ND, node):
    """StableNodes.free."""
    if ND.stale[node]:
        ND.stale[node] = 0
        ND.stale_state[0] -= 1
    ND.kind[node] = FREE
    ND.free_stack[ND.free_top[0]] = node
    ND.free_top[0] += 1


@inner
def _tree_erase(ND, node):
    """IndexedRbTree.erase: out of its stable tree and out of the key index."""
    rb_erase(ND.left, ND.right, ND.parent, ND.color, ND.roots, np.int64(ND.nid[node]),
             np.int64(node))
    ND.ki_slots[ki_locate(ND.ki_slots, ND.key, ND.nid, np.int64(node))] = TOMB
    ND.ki_state[0] -= 1
    ND.ki_state[1] += 1


@inner
def _del_dup(ND, dup):
    """StableNodes.del_dup."""
    hlist_del(ND.dhead, ND.dnext, ND.dprev, np.int64(ND.chain[dup]), np.int64(dup))
    ND.chain[dup] = NIL


@inner
def _uncount_stable_item(IT, ND, S, node, item, sharing):
    """StableTreeMixin._uncount_stable_item: an rmap_item leaves KSM page ``node``, one less
    in pages_sharing (``sharing``: another item stays listed) or pages_shared; its anon_vma
    reference dropped."""
    if sharing:
        S.cnt[C_SHARING] -= 1
    else:
        S.cnt[C_SHARED] -= 1
    S.mm_ksm[item_mm(IT.mm_address[item]), 1] -= 1
    ND.hlist_len[node] -= 1
    av = IT.anon_vma[item]
    if av >= 0:
        S.av_delta[av] -= 1
        IT.anon_vma[item] = -1
    IT.mm_address[item] = with_flags(IT.mm_address[item], 0)
    IT.head[item] = NIL


@inner
def _remove_node(IT, ND, S, node):
    """remove_node_from_stable_tree for a plain node or a dup (a node on the migrate list is
    Python's): every rmap_item on it is un-counted and loses its anon_vma reference."""
    it = ND.hhead[node]
    while it != NIL:
        nxt = IT.hnext[it]
        _uncount_stable_item(IT, ND, S, np.int64(node), np.int64(it), nxt != NIL)
        it = nxt
    ND.hhead[node] = NIL
    if ND.kind[node] == DUP:
        _del_dup(ND, np.int64(node))
        S.cnt[C_DUPS] -= 1
    else:
        _tree_erase(ND, np.int64(node))
    _free_node(ND, np.int64(node))


@inner
def stable_remove(F, IT, ND, S, item):
    """remove_rmap_item_from_tree for an item on a stable node. False, with nothing done,
    when that node is stale and on the migrate list (Python's)."""
    node = IT.head[item]
    if not _live(F, ND, np.int64(node)):
        if ND.kind[node] == MIGRATE:
            return False
        _remove_node(IT, ND, S, np.int64(node))  # the stale node took this item's counts with it
        return True
    hlist_del(ND.hhead, IT.hnext, IT.hprev, np.int64(node), np.int64(item))
    _uncount_stable_item(IT, ND, S, np.int64(node), np.int64(item), ND.hhead[node] != NIL)
    return True


@inner
def _chain_lookup(F, IT, ND, S, chain, now, prune_ns, mps):
    """__stable_node_chain with pruning, as Ksm._chain_lookup(prune=True) does it, side
    effects included: returns (tree node, chosen dup); (NIL, NIL) when the chain was freed."""
    prune = now >= ND.prune_time[chain] + prune_ns
    if prune:
        ND.prune_time[chain] = now
    found = NIL
    found_len = 0
    d = ND.dhead[chain]
    while d != NIL:
        nxt = ND.dnext[d]
        S.work[W_DUPS] += 1
        if not _live(F, ND, np.int64(d)):
            _remove_node(IT, ND, S, np.int64(d))
            d = nxt
            continue
        choice = dup_choice(np.int64(found), np.int64(found_len), np.int64(ND.hlist_len[d]),
                            np.int64(mps))
        if choice != 0:
            found = d
            found_len = ND.hlist_len[d]
            if choice == 2 and not prune:
                break
        d = nxt
    if found == NIL:                                   # every dup was stale: free the chain
        _tree_erase(ND, np.int64(chain))
        _free_node(ND, np.int64(chain))
        S.cnt[C_CHAINS] -= 1
        return NIL, NIL
    if ND.dhead[chain] == found and ND.dnext[found] == NIL:
        _del_dup(ND, np.int64(found))                  # the last dup replaces its chain
        ND.kind[found] = NODE
        ND.nid[found] = ND.nid[chain]
        rb_replace(ND.left, ND.right, ND.parent, ND.color, ND.roots, np.int64(ND.nid[chain]),
                   np.int64(chain), np.int64(found))
        ND.ki_slots[ki_locate(ND.ki_slots, ND.key, ND.nid, np.int64(chain))] = found
        _free_node(ND, np.int64(chain))
        S.cnt[C_CHAINS] -= 1
        S.cnt[C_DUPS] -= 1
        return found, found
    if ND.dhead[chain] != found and found_len > 0 and found_len + 1 < mps:
        _move_dup_to_head(ND, np.int64(chain), np.int64(found))
    return chain, found


@inner
def _stable_search(F, IT, ND, S, nid, key, now, prune_ns, mps, chains):
    """stable_tree_search for a page that is not a KSM page, when the tree may hold chains
    and stale nodes, as Ksm.stable_tree_search walks it (merge_across_nodes=1): stale nodes
    met are pruned and the walk restarts, chains are pruned and collapsed on the way.
    Returns (the dup or node to merge into, or NIL)."""
    while True:
        cur = ND.roots[nid]
        restart = False
        while cur != NIL:
            S.work[W_COMPARES] += 1
            if ND.kind[cur] == CHAIN:
                node, dup = _chain_lookup(F, IT, ND, S, np.int64(cur), now, prune_ns, mps)
                if node == NIL:
                    restart = True
                    break
            else:
                if not _live(F, ND, np.int64(cur)):
                    _remove_node(IT, ND, S, np.int64(cur))
                    restart = True
                    break
                node = cur
                dup = cur
            tk = ND.key[node]
            if key < tk:
                cur = ND.left[node]
            elif key > tk:
                cur = ND.right[node]
            else:
                hl = ND.hlist_len[dup]
                if chains and not (hl > 0 and hl < mps):
                    return NIL                      # every copy is full: make a new one
                return dup
        if not restart:
            return NIL


@inner
def _alloc_node(ND, kind):
    """StableNodes.alloc: a node with every field at its initial value (the pool was
    checked by the caller)."""
    ND.free_top[0] -= 1
    new = ND.free_stack[ND.free_top[0]]
    ND.kind[new] = kind
    ND.kpfn[new] = -1
    ND.prune_time[new] = 0
    ND.hlist_len[new] = 0
    ND.hhead[new] = NIL             # and dhead: one array (StableNodes._ALIASES)
    ND.nid[new] = 0
    ND.chain[new] = NIL
    ND.dnext[new] = NIL
    ND.dprev[new] = NIL
    ND.key[new] = 0
    ND.stale[new] = 0
    return new


@inner
def _add_dup(ND, chain, dup):
    """StableNodes.add_dup: ``dup`` goes at the head of the chain's list."""
    ND.kind[dup] = DUP
    ND.chain[dup] = chain
    hlist_add_head(ND.dhead, ND.dnext, ND.dprev, np.int64(chain), np.int64(dup))


@inner
def _merge_pair(F, IT, ND, S, V, item, off, pfn, pte, ptef, vma_locked, vma_anon_vma,
                t, tpfn, nid, key, hashed, indexed, mps, chains, now):
    """The page of ``item`` and the unstable tree's page of ``t`` (same contents) become one
    new KSM page: try_to_merge_two_pages, stable_tree_insert, two stable_tree_appends, as
    Ksm._merge_candidate does them. Returns False, having changed nothing, when anything
    needs Python (a huge page, the swap cache, a pin on the tree's page, which makes Python
    undo the first merge, a pool or table that must grow first)."""
    if F.flags[pfn] & (PG_COMPOUND | PG_SWAPCACHE):
        return False
    tf = F.flags[tpfn]
    if (tf & PG_ANON) == 0 or (tf & (PG_KSM | PG_COMPOUND | PG_SWAPCACHE)) != 0:
        return False
    if (S.freed_n[0] >= S.freed.shape[0] or ND.free_top[0] == 0
            or 2 * (ND.ki_state[0] + ND.ki_state[1] + 1) > ND.ki_slots.shape[0]
            or (hashed and S.ulog_len[0] + ERASE_WORDS > S.ulog.shape[0])):
        return False
    tword = IT.mm_address[t]
    tv = find_vma(V, np.int64(item_mm(tword)), np.int64(item_vpn(tword)))
    if tv < 0:
        return False
    toff = item_vpn(tword) - V.start[tv]
    tpte, tptef = page_tables(V, np.int64(tv))
    if (tptef[toff] & (PTE_PRESENT | PTE_ZERO)) != PTE_PRESENT or tpte[toff] != tpfn:
        return False
    if F.content[tpfn] != F.content[pfn]:
        return False
    if ptef[off] & _WD and F.mapcount[pfn] != F.refcount[pfn]:
        return True                  # this page is pinned: the merge fails, nothing changes
    if tptef[toff] & _WD and F.mapcount[tpfn] != F.refcount[tpfn]:
        return False
    if indexed:
        at, go_left, d = insert_point(ND.left, ND.right, ND.key, np.int64(ND.roots[nid]),
                                      np.uint64(key))
        dups = 0
        moves = 0
        equal = ki_find(ND.ki_slots, ND.key, ND.nid, np.uint64(key), np.int64(nid))
        if equal == EMPTY:
            equal = NIL
    else:
        ok, at, go_left, d, dups, moves, equal = _stable_insert_walk(F, ND, S, nid, key, mps)
        if not ok:
            return False
    if equal != NIL and (not chains or (ND.kind[equal] != CHAIN and ND.free_top[0] < 2)):
        return False                 # 2.6.33 refuses a second node for a content; or no room
    # try_to_merge_one_page(page, NULL): this page becomes the KSM page
    _write_protect(F, ptef, np.int64(off), np.int64(pfn))
    S.work[W_MERGES] += 1
    F.flags[pfn] = (F.flags[pfn] & _NOT_ANON) | PG_KSM
    F.owner[pfn] = NO_OWNER
    IT.anon_vma[item] = vma_anon_vma
    S.av_delta[vma_anon_vma] += 1
    # try_to_merge_one_page(tree_page, page): the tree's page is replaced by it
    _write_protect(F, tptef, np.int64(toff), np.int64(tpfn))
    _replace_page(F, S, tpte, tptef, np.int64(toff), np.int64(tpfn), np.int64(pfn),
                  V.locked[tv])
    unstable_erase(IT, S, np.int64(t), hashed)
    S.cnt[C_UNSHARED] -= 1
    IT.mm_address[t] = with_flags(IT.mm_address[t], 0)
    IT.anon_vma[t] = V.anon_vma[tv]
    S.av_delta[V.anon_vma[tv]] += 1
    # stable_tree_insert: a new node, or a new dup of the content's node (all full)
    S.work[W_COMPARES] += d
    S.work[W_DUPS] += dups
    for e in range(moves):
        _move_dup_to_head(ND, np.int64(S.eff_chain[e]), np.int64(S.eff_found[e]))
    new = _alloc_node(ND, np.int64(NODE))
    ND.kpfn[new] = pfn
    ND.nid[new] = nid
    ND.key[new] = key
    if equal == NIL:
        rb_link(ND.left, ND.right, ND.parent, ND.color, ND.roots, np.int64(nid), np.int64(new),
                np.int64(at), go_left)
        if ki_insert(ND.ki_slots, ND.key, ND.nid, np.int64(new)):
            ND.ki_state[1] -= 1
        ND.ki_state[0] += 1
    else:
        chain = equal
        if ND.kind[equal] != CHAIN:               # alloc_stable_node_chain
            chain = _alloc_node(ND, np.int64(CHAIN))
            ND.prune_time[chain] = now
            ND.nid[chain] = ND.nid[equal]
            ND.key[chain] = ND.key[equal]
            rb_replace(ND.left, ND.right, ND.parent, ND.color, ND.roots, np.int64(nid),
                       np.int64(equal), np.int64(chain))
            ND.ki_slots[ki_locate(ND.ki_slots, ND.key, ND.nid, np.int64(equal))] = chain
            _add_dup(ND, np.int64(chain), np.int64(equal))
            S.cnt[C_CHAINS] += 1
            S.cnt[C_DUPS] += 1
        _add_dup(ND, np.int64(chain), np.int64(new))
        S.cnt[C_DUPS] += 1
    F.owner[pfn] = new
    stable_append(IT, ND, S, np.int64(t), np.int64(new))
    stable_append(IT, ND, S, np.int64(item), np.int64(new))
    return True


@njit(cache=True, nogil=True)
def scan_run(F, IT, ND, S, V, cand, i, budget, vma_start, pte, ptef, mm_id, cursor,
             vma_locked, vma_anon_vma):
    """Visit candidate pages ``cand[i:]`` of one VMA until done, out of budget, or a bail.

    ``cursor`` is [slot rmap_list head, previous item, address] and is updated in place.
    Returns (index of the next candidate, pages processed, code, rmap_item of a bail).
    """
    params = S.params
    seqnr = params[P_SEQNR]
    smart = params[P_SMART] != 0
    across = params[P_ACROSS] != 0
    use_zero = params[P_USE_ZERO] != 0
    zero_sum = np.uint32(params[P_ZERO_SUM])
    seed = np.uint64(params[P_SEED])
    block_pages = params[P_BLOCK_PAGES]
    clean = params[P_CLEAN] != 0        # nothing changed since the unstable tree was emptied
    hashed = params[P_HASHED] != 0      # the unstable tree is still a hash table and a log
    now = params[P_NOW]
    prune_ns = params[P_PRUNE_NS]
    mps = params[P_MPS]
    chains = params[P_CHAINS] != 0
    block_node = S.block_node
    # the arrays every visit reads, bound once (a group's field is otherwise re-read from
    # memory after every store: the compiler cannot tell the group from the arrays)
    f_flags, f_content, f_owner = F.flags, F.content, F.owner
    it_word, it_rnext, it_head = IT.mm_address, IT.rnext, IT.head
    it_smart, it_oldchecksum = IT.smart, IT.oldchecksum
    it_tree_key, it_nid = IT.tree_key, IT.nid
    nd_kind, nd_kpfn, nd_nid, nd_key = ND.kind, ND.kpfn, ND.nid, ND.key
    nd_ki_slots, nd_stale_state = ND.ki_slots, ND.stale_state
    cnt = S.cnt
    work = S.work
    uh = S.uh
    mask = uh.shape[0] - 1
    processed = 0
    n = cand.shape[0]
    ki_mask = nd_ki_slots.shape[0] - 1
    while i < n:
        if processed >= budget:
            return i, processed, RUN_BUDGET, NIL
        # what later visits will read at random, fetched ahead: a page's frame, then its
        # stable node (a KSM page) or the hash slots its key will probe
        if i + LOOKAHEAD < n:
            ahead = pte[cand[i + LOOKAHEAD]]
            prefetch(f_flags, ahead)
            prefetch(f_owner, ahead)
        if i + LOOKAHEAD // 2 < n and across:
            ahead = pte[cand[i + LOOKAHEAD // 2]]
            if ahead >= 0:
                if f_flags[ahead] & PG_KSM:
                    prefetch(nd_kind, f_owner[ahead])
                else:
                    ahead_key = memcmp_key_of(f_content[ahead])
                    prefetch(nd_ki_slots, slot_of(ahead_key, np.int64(0), np.int64(ki_mask)))
                    if hashed:
                        prefetch(uh, slot_of(ahead_key, np.int64(0), np.int64(mask)))
        # while no chain and no stale node exist, a stable-tree walk has no side effects (the
        # compiled merges make no stale node, but may make the first chain)
        indexed = nd_stale_state[0] == 0 and cnt[C_CHAINS] == 0
        off = cand[i]
        work[W_PTES] += 1
        if (ptef[off] & (PTE_PRESENT | PTE_ZERO)) != PTE_PRESENT:
            i += 1
            continue
        pfn = pte[off]
        pflags = f_flags[pfn]
        if (pflags & (PG_ANON | PG_KSM)) == 0:
            i += 1
            continue
        vpn = vma_start + off

        # -- get_next_rmap_item: free items before vpn, find or create the one at vpn ----
        prev = cursor[1]
        cur = cursor[0] if prev == NIL else it_rnext[prev]
        item = NIL
        while cur != NIL:
            a = item_vpn(it_word[cur])
            if a == vpn:
                item = cur
                break
            if a > vpn:
                break
            fl = item_flags(it_word[cur])
            if fl & STABLE_FLAG:
                if not stable_remove(F, IT, ND, S, np.int64(cur)):
                    return i, processed, BAIL_BEFORE_ITEM, NIL
                fl = 0
            if fl & UNSTABLE_FLAG and ((seqnr - fl) & SEQNR_MASK) == 0:
                if (hashed and not clean) or not unstable_erase(IT, S, np.int64(cur), hashed):
                    return i, processed, BAIL_BEFORE_ITEM, NIL
            nxt = it_rnext[cur]
            if prev == NIL:
                cursor[0] = nxt
            else:
                it_rnext[prev] = nxt
            if fl & UNSTABLE_FLAG:
                cnt[C_UNSHARED] -= 1
                IT.anon_vma[cur] = -1       # its nid (a union)
            S.mm_ksm[item_mm(it_word[cur]), 0] -= 1
            it_word[cur] = freed_word(it_word[cur])
            it_rnext[cur] = IT.free_list[0]
            IT.free_list[0] = cur
            IT.free_list[1] += 1
            cur = nxt
        if item == NIL:
            if IT.free_list[1] == 0:
                return i, processed, BAIL_BEFORE_ITEM, NIL     # the pool must grow first
            item = IT.free_list[0]
            IT.free_list[0] = it_rnext[item]
            IT.free_list[1] -= 1
            it_word[item] = pack_item(np.int64(mm_id), np.int64(vpn))
            it_oldchecksum[item] = 0
            it_smart[item] = 0
            it_head[item] = NIL
            IT.hnext[item] = NIL
            IT.hprev[item] = NIL
            IT.anon_vma[item] = -1        # and nid: one array (RmapItems._ALIASES)
            it_tree_key[item] = 0
            S.mm_ksm[mm_id, 0] += 1
            it_rnext[item] = cur
            if prev == NIL:
                cursor[0] = item
            else:
                it_rnext[prev] = item
        cursor[1] = item
        cursor[2] = vpn + 1
        is_ksm = (pflags & PG_KSM) != 0
        ifl = item_flags(it_word[item])

        # -- smart scan ----------------------------------------------------------------------
        if (ifl & STABLE_FLAG) and not is_ksm:              # its KSM page was left (COW)
            if not stable_remove(F, IT, ND, S, np.int64(item)):
                return i, processed, BAIL_BEFORE_SKIP, item
            ifl = 0
        if smart and not is_ksm:
            smart_now, skip = smart_step(np.int64(it_smart[item]))
            if skip and ifl & UNSTABLE_FLAG:
                if not _leave_unstable(IT, S, np.int64(item), np.int64(ifl), seqnr, hashed, clean):
                    return i, processed, BAIL_BEFORE_SKIP, item
            it_smart[item] = smart_now
            if skip:
                cnt[C_SKIPPED] += 1
                i += 1
                continue

        # -- cmp_and_merge_page ----------------------------------------------------------------
        nid = 0 if across else block_node[pfn // block_pages]
        if is_ksm:
            node = f_owner[pfn]
            if (node != NIL and (nd_kind[node] == NODE or nd_kind[node] == DUP)
                    and (ifl & STABLE_FLAG) and it_head[item] == node
                    and (across or block_node[nd_kpfn[node] // block_pages] == nd_nid[node])):
                cnt[C_SCANNED] += 1
                processed += 1
                i += 1
                continue
            if not (across and node != NIL and (nd_kind[node] == NODE or nd_kind[node] == DUP)):
                return i, processed, BAIL_BEFORE_MERGE, item
            # a KSM page this item does not hold yet (reached through fork): stable_tree_search
            # gives the page itself, and the item joins its node
            if ifl & STABLE_FLAG:
                if not stable_remove(F, IT, ND, S, np.int64(item)):
                    return i, processed, BAIL_BEFORE_MERGE, item
            elif ifl & UNSTABLE_FLAG:
                if not _leave_unstable(IT, S, np.int64(item), np.int64(ifl), seqnr, hashed, clean):
                    return i, processed, BAIL_BEFORE_MERGE, item
            IT.anon_vma[item] = vma_anon_vma
            S.av_delta[vma_anon_vma] += 1
            stable_append(IT, ND, S, np.int64(item), np.int64(node))
            cnt[C_SCANNED] += 1
            processed += 1
            i += 1
            continue
        if ifl & UNSTABLE_FLAG:
            if not _leave_unstable(IT, S, np.int64(item), np.int64(ifl), seqnr, hashed, clean):
                return i, processed, BAIL_BEFORE_MERGE, item
        work[W_CHECKSUMS] += 1
        content = f_content[pfn]
        cs = checksum_of(content, seed)
        if it_oldchecksum[item] != cs:
            it_oldchecksum[item] = cs
            cnt[C_SCANNED] += 1
            processed += 1
            i += 1
            continue
        if use_zero and cs == zero_sum:
            return i, processed, BAIL_AFTER_CHECKSUM, item

        key = memcmp_key_of(content)
        target = NIL                    # the KSM page (its node) to merge into, if any
        if not indexed and across:
            # the stable tree walked as Python walks it, pruning and collapsing on the way;
            # what could need Python after it is checked first
            if (pflags & (PG_COMPOUND | PG_SWAPCACHE)) != 0 or S.freed_n[0] >= S.freed.shape[0]:
                return i, processed, BAIL_AFTER_CHECKSUM, item
            target = _stable_search(F, IT, ND, S, np.int64(nid), key, now, prune_ns, mps,
                                    chains)
            if target != NIL:
                _merge_into(F, IT, ND, S, np.int64(target), np.int64(item), np.int64(off),
                            np.int64(pfn), pte, ptef, vma_locked, vma_anon_vma)
                processed += 1
                i += 1
                continue
            cur = NIL
        elif indexed:
            # no chain and no stale node: a miss needs only plain, live nodes on the path
            target = ki_find(nd_ki_slots, nd_key, nd_nid, np.uint64(key), np.int64(nid))
            if target == EMPTY:
                target = NIL
            work[W_COMPARES] += _depth(np.int64(ND.ki_state[0]))
            cur = NIL
        else:
            cur = ND.roots[nid]
        walked = 0                      # a bail hands the walk to Python, which counts it then
        dups_seen = 0
        effects = 0                     # chain upkeep to apply once the walk needs nothing else
        while cur != NIL:
            walked += 1
            kind = nd_kind[cur]
            if kind == CHAIN:
                # stable_node_dup, first without side effects: a stale dup, a collapse or an
                # empty chain is left to Python; pruning times and moves to the head of the
                # chain are applied below once the whole walk is known to need nothing else
                prune = now >= ND.prune_time[cur] + prune_ns
                found = NIL
                found_len = 0
                d = ND.dhead[cur]
                while d != NIL:
                    dups_seen += 1
                    kp = nd_kpfn[d]
                    if (f_flags[kp] & PG_KSM) == 0 or f_owner[kp] != d:
                        return i, processed, BAIL_AFTER_CHECKSUM, item
                    choice = dup_choice(np.int64(found), np.int64(found_len),
                                        np.int64(ND.hlist_len[d]), np.int64(mps))
                    if choice != 0:
                        found = d
                        found_len = ND.hlist_len[d]
                        if choice == 2 and not prune:
                            break
                    d = ND.dnext[d]
                if found == NIL or (ND.dhead[cur] == found and ND.dnext[found] == NIL):
                    return i, processed, BAIL_AFTER_CHECKSUM, item
                move = ND.dhead[cur] != found and found_len > 0 and found_len + 1 < mps
                if prune or move:
                    S.eff_chain[effects] = cur
                    S.eff_found[effects] = found if move else NIL
                    S.eff_prune[effects] = prune
                    effects += 1
            elif kind == NODE:
                kp = nd_kpfn[cur]
                if (f_flags[kp] & PG_KSM) == 0 or f_owner[kp] != cur:
                    return i, processed, BAIL_AFTER_CHECKSUM, item    # stale: prune in Python
            else:
                return i, processed, BAIL_AFTER_CHECKSUM, item
            tk = nd_key[cur]
            if key < tk:
                cur = ND.left[cur]
            elif key > tk:
                cur = ND.right[cur]
            else:
                target = found if kind == CHAIN else cur
                break
        if target != NIL and not (ND.hlist_len[target] > 0 and ND.hlist_len[target] < mps):
            if not (indexed or chains):
                return i, processed, BAIL_AFTER_CHECKSUM, item
            target = NIL                # every copy is full: the unstable tree makes a new one
        if target != NIL:
            # merge into that KSM page here only in the plain case; anything else is Python's
            if ((not across and block_node[nd_kpfn[target] // block_pages] != nd_nid[target])
                    or (pflags & (PG_COMPOUND | PG_SWAPCACHE)) != 0
                    or S.freed_n[0] >= S.freed.shape[0]):
                return i, processed, BAIL_AFTER_CHECKSUM, item
        for e in range(effects):
            chain = S.eff_chain[e]
            if S.eff_prune[e]:
                ND.prune_time[chain] = now
            found = S.eff_found[e]
            if found != NIL:                                   # move the dup to the head
                _move_dup_to_head(ND, np.int64(chain), np.int64(found))
        work[W_DUPS] += dups_seen
        if target != NIL:
            work[W_COMPARES] += walked
            _merge_into(F, IT, ND, S, np.int64(target), np.int64(item), np.int64(off),
                        np.int64(pfn), pte, ptef, vma_locked, vma_anon_vma)
            processed += 1
            i += 1
            continue
        work[W_COMPARES] += walked
        walked = 0
        # unstable tree: search, or insert this item; two equal pages merge
        if hashed:
            if not clean:
                return i, processed, BAIL_AFTER_STABLE, item    # the tree must be built now
            d = hashed_search_compares(S.ulog_len)
            t, h = hash_find(uh, np.int64(mask), it_tree_key, it_nid, np.uint64(key),
                             np.int64(nid))
            if t == NIL:
                if S.ulog_len[0] >= S.ulog.shape[0] or item > mask:    # log full; an id the
                    return i, processed, BAIL_AFTER_STABLE, item       # table cannot hold
                it_word[item] = with_flags(it_word[item], UNSTABLE_FLAG | (seqnr & SEQNR_MASK))
                it_nid[item] = nid
                it_tree_key[item] = key
                uh[h] = hash_entry(item, np.uint64(key), np.int64(nid), mask)
                S.ulog[S.ulog_len[0]] = item
                S.ulog_len[0] += 1
                cnt[C_UNSHARED] += 1
            else:
                tpfn = mergeable_page(F, V, np.int64(item_mm(it_word[t])),
                                      np.int64(item_vpn(it_word[t])))
                if tpfn >= 0 and tpfn != pfn and (across or block_node[tpfn // block_pages] == nid):
                    if not _merge_pair(F, IT, ND, S, V, np.int64(item), np.int64(off),
                                       np.int64(pfn), pte, ptef, vma_locked, vma_anon_vma,
                                       np.int64(t), np.int64(tpfn), np.int64(nid), key, hashed,
                                       indexed, mps, chains, now):
                        return i, processed, BAIL_AFTER_STABLE, item
            work[W_COMPARES] += d
            cnt[C_SCANNED] += 1
            processed += 1
            i += 1
            continue
        cur = IT.roots[nid]
        at = NIL
        go_left = False
        aborted = False
        merged = False
        while cur != NIL:
            walked += 1
            if clean:
                # nothing changed since it was inserted: its page and key are as they were
                # (its page is looked up below only if the keys are equal)
                tk = it_tree_key[cur]
                tpfn = NIL
            else:
                tpfn = mergeable_page(F, V, np.int64(item_mm(it_word[cur])),
                                      np.int64(item_vpn(it_word[cur])))
                if tpfn < 0 or tpfn == pfn:
                    aborted = True              # the page went, or it is this very page (fork)
                    break
                tk = memcmp_key_of(f_content[tpfn])
                it_tree_key[cur] = tk
            at = cur
            if key < tk:
                cur = IT.left[cur]
                go_left = True
                continue
            if key > tk:
                cur = IT.right[cur]
                go_left = False
                continue
            if tpfn == NIL:
                tpfn = mergeable_page(F, V, np.int64(item_mm(it_word[cur])),
                                      np.int64(item_vpn(it_word[cur])))
            if tpfn < 0 or tpfn == pfn:
                aborted = True                  # our own page, through fork
            elif not across and block_node[tpfn // block_pages] != nid:
                aborted = True
            elif _merge_pair(F, IT, ND, S, V, np.int64(item), np.int64(off), np.int64(pfn), pte,
                             ptef, vma_locked, vma_anon_vma, np.int64(cur), np.int64(tpfn),
                             np.int64(nid), key, hashed, indexed, mps, chains, now):
                merged = True
            else:
                return i, processed, BAIL_AFTER_STABLE, item    # two pages to merge: Python
            break
        work[W_COMPARES] += walked
        if not aborted and not merged:
            it_word[item] = with_flags(it_word[item], UNSTABLE_FLAG | (seqnr & SEQNR_MASK))
            it_nid[item] = nid
            it_tree_key[item] = key
            rb_link(IT.left, IT.right, IT.parent, IT.color, IT.roots, np.int64(nid),
                    np.int64(item), np.int64(at), go_left)
            cnt[C_UNSHARED] += 1
        cnt[C_SCANNED] += 1
        processed += 1
        i += 1
    return i, processed, RUN_END, NIL


# ksmd's pacing for scan_ahead: int64 and float64 arrays (``vmhost.ksm.ksmd`` fills them)
(PACE_NOW, PACE_HORIZON, PACE_SLEEP_NS, PACE_DONE, PACE_CAND_GEN, PACE_BATCHES, PACE_CPU_NS,
 N_PACE_I) = range(8)
(PACE_BEFORE_NS, PACE_THP_NS, PACE_PAGE_NS, PACE_BATCH_NS, N_PACE_F) = range(5)


@njit(cache=True, nogil=True)
def scan_ahead(F, IT, ND, S, V, cand, i, budget, vma_start, pte, ptef, mm_id, cursor,
               vma_locked, vma_anon_vma, pace_i, pace_f, cost_w, pt_epoch):
    """``scan_run`` for the rest of ksmd's batch (``pace_i[PACE_DONE]`` pages of it done);
    then, while a batch ends inside this VMA with its budget spent and ksmd's next wake-up
    (now + the batch's CPU time, as ``Ksmd`` charges it, + the sleep) falls before the clock's
    horizon, the next batch at once. Every batch sees its own wake-up time (``P_NOW``).
    ``pace_i`` gets the whole batches run ahead (count, CPU time) and the wake-up time of the
    last one, the one returned (as scan_run returns it) for ksmd to finish and charge; a pool
    or table that must grow first ends the run ahead, as a full scan's end does (it is Python's),
    and so does a change of the mm's page tables (``pt_epoch``, the host's) since ``cand``
    was listed (``PACE_CAND_GEN``: the next batch would list the candidates again)."""
    work = S.work
    done0 = pace_i[PACE_DONE]
    while True:
        i, n, code, item = scan_run(F, IT, ND, S, V, cand, i, budget - done0, vma_start, pte,
                                    ptef, mm_id, cursor, vma_locked, vma_anon_vma)
        if code != RUN_BUDGET:
            return i, n, code, item
        wn = 0.0                    # the sum Ksmd._work_ns takes, in its order
        for j in range(cost_w.shape[0]):
            wn += work[j] * cost_w[j]
        wn += pace_f[PACE_THP_NS]
        cost = np.int64(wn - pace_f[PACE_BEFORE_NS] + (done0 + n) * pace_f[PACE_PAGE_NS]
                        + pace_f[PACE_BATCH_NS])
        when = pace_i[PACE_NOW] + cost + pace_i[PACE_SLEEP_NS]
        if (when >= pace_i[PACE_HORIZON] or pt_epoch[mm_id] != pace_i[PACE_CAND_GEN]
                or ND.free_top[0] == 0
                or 2 * (ND.ki_state[0] + ND.ki_state[1] + 1) > ND.ki_slots.shape[0]):
            return i, n, code, item
        pace_i[PACE_BATCHES] += 1
        pace_i[PACE_CPU_NS] += cost
        pace_i[PACE_NOW] = when
        pace_f[PACE_BEFORE_NS] = wn
        S.params[P_NOW] = when
        done0 = 0
