"""The compiled part of ksmd's scan: the common cases of a page visit, at native speed.

A full scan visits every anonymous page of every mergeable VMA. Most visits
end in one of a few simple ways: the page is a KSM page already merged by
this rmap_item; its checksum changed (volatile); smart scan skips it; or it
is new to this pass and goes into the unstable tree. ``scan_run`` does exactly
these, over a run of one VMA's pages, on the same arrays the Python engine
uses (rmap_items, stable nodes, both trees, frames, page tables, counters).

Whenever a visit needs anything more (a merge, a stale stable node, a chain,
a KSM zero page, an rmap_item on a stable node, a cached unstable-tree frame
that may be out of date, the item pool running dry) it stops *before the step
that needs it* and returns a bail code naming how far it got; the engine
finishes that visit in Python (``Ksm._scan_page``) and calls back in. Both
paths apply the same rules in the same order, so the result is identical to a
pure-Python scan; ``tests/test_fastscan.py`` replays the trace corpus both
ways to prove it.

The unstable tree is rebuilt from empty every full scan, and while nothing in
any address space changes, a search of it can only end at the node whose key
equals the page's (no node on the way can have lost its page or its
contents). So until the first change of a pass, the compiled loop keeps the
unstable tree as a hash table plus a log of insertions; the real rbtree is
built from the log (``replay_unstable``, the same insertions in the same
order, hence the same shape) the moment anything needs the tree itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vmhost.ksm.keyindex import EMPTY, TOMB, ki_find, slot_of
from vmhost.ksm.rbtree import NIL, rb_erase, rb_link

# scan_run's return codes
RUN_END, RUN_BUDGET = 0, 1
BAIL_BEFORE_ITEM, BAIL_BEFORE_SKIP, BAIL_BEFORE_MERGE, BAIL_AFTER_CHECKSUM = 2, 3, 4, 5

# indices of the engine's counter array
C_SHARED, C_SHARING, C_UNSHARED, C_SCANNED, C_SKIPPED, C_ZERO, C_CHAINS, C_DUPS = range(8)
# indices of the work counters (the CPU model's inputs)
W_PTES, W_CHECKSUMS, W_COMPARES, W_MERGES, W_DUPS = range(5)
# params
(P_SEQNR, P_SMART, P_ACROSS, P_USE_ZERO, P_ZERO_SUM, P_SEED, P_BLOCK_PAGES, P_CLEAN, P_HASHED,
 P_STABLE_INDEXED, P_NOW, P_PRUNE_NS, P_MPS) = range(13)

_PRESENT, _ZERO = 1, 4                      # PTE_PRESENT, PTE_ZERO
_PG_ANON, _PG_KSM, _PG_SWAPCACHE, _PG_DIRTY, _PG_MLOCKED = 1, 2, 4, 8, 16
_PG_COMPOUND = (1 << 10) | (1 << 11)
_WRITE, _DIRTY, _YOUNG = 2, 64, 32            # PTE_WRITE, PTE_DIRTY, PTE_YOUNG
_STABLE, _UNSTABLE, _SEQ = 0x200, 0x100, 0xFF
_NODE, _DUP, _CHAIN = 1, 2, 3              # stable node kinds: plain, a dup, a chain
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True, inline="always")
def checksum_of(content, seed):
    """The same 32-bit mix as vmhost.ksm.checksum.checksums."""
    x = content + seed
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    x = x ^ (x >> np.uint64(31))
    return np.uint32(x >> np.uint64(32))


@njit(cache=True, nogil=True, inline="always")
def memcmp_key(content):
    """Byte-swapped content id: its order is memcmp's order of the page."""
    x = content
    x = ((x & np.uint64(0x00000000FFFFFFFF)) << np.uint64(32)) | (x >> np.uint64(32))
    x = ((x & np.uint64(0x0000FFFF0000FFFF)) << np.uint64(16)) | ((x >> np.uint64(16)) & np.uint64(0x0000FFFF0000FFFF))
    x = ((x & np.uint64(0x00FF00FF00FF00FF)) << np.uint64(8)) | ((x >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF))
    return x



@njit(cache=True, nogil=True, inline="always")
def _depth(n):
    """About how many nodes a search of an n-node red-black tree compares with."""
    d = 0
    while n > 0:
        n >>= 1
        d += 1
    return d


@njit(cache=True, nogil=True)
def hash_find(uh, mask, it_key, it_nid, key, nid):
    """The unstable-tree item with this key in tree ``nid`` (or NIL), and the slot where it
    is or where it would be inserted (the first tombstone on the way, else the empty slot)."""
    h = slot_of(key, nid, mask)
    free = -1
    while uh[h] != EMPTY:
        t = uh[h]
        if t == TOMB:
            if free < 0:
                free = h
        elif it_key[t] == key and it_nid[t] == nid:
            return t, h
        h = (h + 1) & mask
    return NIL, (free if free >= 0 else h)


@njit(cache=True, nogil=True)
def hash_remove(uh, it_key, it_nid, item):
    mask = uh.shape[0] - 1
    h = slot_of(it_key[item], it_nid[item], mask)
    while uh[h] != item:
        h = (h + 1) & mask
    uh[h] = TOMB


@njit(cache=True, nogil=True)
def insert_point(left, right, keys, root, key):
    """Where a new key goes in a tree whose nodes' keys are ``keys`` (no side effects on the
    way: a stable tree of plain live nodes, or an unstable tree rebuilt from its log);
    returns (parent, go_left, nodes compared)."""
    cur = root
    at = NIL
    go_left = False
    depth = 0
    while cur != NIL:
        depth += 1
        at = cur
        if key < keys[cur]:
            cur = left[cur]
            go_left = True
        else:
            cur = right[cur]
            go_left = False
    return at, go_left, depth


@njit(cache=True, nogil=True)
def replay_unstable(log, n, it_key, it_nid, il, ir, ipar, icol, uroots):
    """Build the unstable rbtrees from the log: insertions (item) and erasures (-item-2),
    keys as they were when logged (nothing changed in between, or the log would have ended)."""
    for j in range(n):
        item = log[j]
        if item < 0:
            item = -item - 2
            rb_erase(il, ir, ipar, icol, uroots, it_nid[item], item)
            continue
        nid = it_nid[item]
        at, go_left, _ = insert_point(il, ir, it_key, uroots[nid], it_key[item])
        rb_link(il, ir, ipar, icol, uroots, nid, item, at, go_left)


@njit(cache=True, nogil=True)
def _merge_into(node, item, mm_id, off, pfn, pte, ptef, vma_locked, vma_anon_vma,
                f_flags, f_owner, f_mapcount, f_refcount, f_content, f_index,
                it_flags, it_head, it_hnext, it_hprev, it_anon_vma, n_kpfn, n_hlen, n_hhead,
                cnt, mm_ksm, work, freed, freed_n, av_gets):
    """try_to_merge_with_ksm_page + stable_tree_append for an ordinary page (the plain case:
    not a huge page, not in the swap cache), exactly as Ksm._merge_one and
    Ksm.stable_tree_append do it; the freed frame and the anon_vma reference are handed
    back for Python to settle (allocator, anon_vma refcount)."""
    kp = n_kpfn[node]
    flags = ptef[off]
    if flags & (_WRITE | _DIRTY):                     # write_protect_page
        if f_mapcount[pfn] != f_refcount[pfn]:
            return                                    # pinned: the merge fails, retried later
        if flags & _DIRTY:
            f_flags[pfn] |= _PG_DIRTY
        ptef[off] = flags & ~np.uint8(_WRITE | _DIRTY)
    work[W_MERGES] += 1
    f_mapcount[kp] += 1                               # replace_page
    f_refcount[kp] += 1
    if vma_locked:
        f_flags[kp] |= _PG_MLOCKED
    pte[off] = kp
    ptef[off] = _PRESENT | _YOUNG
    f_mapcount[pfn] -= 1
    f_refcount[pfn] -= 1
    if f_mapcount[pfn] == 0:
        f_flags[pfn] &= ~np.uint16(_PG_MLOCKED)
    if f_refcount[pfn] == 0:                          # the old page is free (Python frees it)
        f_content[pfn] = 0
        f_flags[pfn] = 0
        f_owner[pfn] = -1
        f_index[pfn] = 0
        freed[freed_n[0]] = pfn
        freed_n[0] += 1
    it_anon_vma[item] = vma_anon_vma                  # a reference on the VMA's anon_vma
    av_gets[0] += 1
    n_hlen[node] += 1                                 # stable_tree_append
    it_head[item] = node
    it_flags[item] |= _STABLE
    first = n_hhead[node]
    it_hnext[item] = first
    it_hprev[item] = NIL
    if first != NIL:
        it_hprev[first] = item
        cnt[C_SHARING] += 1
    else:
        cnt[C_SHARED] += 1
    n_hhead[node] = item
    mm_ksm[mm_id, 1] += 1


@njit(cache=True, nogil=True)
def scan_run(cand, i, budget, vma_start, pte, ptef, mm_id, cursor,
             f_content, f_flags, f_owner,
             it_mm, it_addr, it_flags, it_sum, it_age, it_skips, it_head, it_rnext, it_nid,
             it_tpfn, it_tgen, it_key, il, ir, ipar, icol, uroots,
             n_kind, n_kpfn, n_nid, n_key, nl, nr, sroots,
             free_stack, free_top, cnt, mm_ksm, pt_epoch, params, block_node, work,
             uh, ulog, ulog_len, sindex, stable_count,
             n_dhead, n_dnext, n_dprev, n_hlen, n_prune, eff_chain, eff_found, eff_prune,
             f_mapcount, f_refcount, f_index, it_hnext, it_hprev, it_anon_vma, n_hhead,
             vma_locked, vma_anon_vma, freed, freed_n, av_gets):
    """Visit candidate pages ``cand[i:]`` of one VMA until done, out of budget, or a bail.

    ``cursor`` is [slot rmap_list head, previous item, address] and is updated in place.
    Returns (index of the next candidate, pages processed, code, rmap_item of a bail).
    """
    seqnr = params[P_SEQNR]
    smart = params[P_SMART] != 0
    across = params[P_ACROSS] != 0
    use_zero = params[P_USE_ZERO] != 0
    zero_sum = np.uint32(params[P_ZERO_SUM])
    seed = np.uint64(params[P_SEED])
    block_pages = params[P_BLOCK_PAGES]
    clean = params[P_CLEAN] != 0        # nothing changed since the unstable tree was emptied
    hashed = params[P_HASHED] != 0      # the unstable tree is still a hash table and a log
    indexed = params[P_STABLE_INDEXED] != 0   # no chain, no stale node: look stable keys up
    stable_depth = _depth(stable_count)
    now = params[P_NOW]
    prune_ns = params[P_PRUNE_NS]
    mps = params[P_MPS]
    mask = uh.shape[0] - 1
    processed = 0
    n = cand.shape[0]
    while i < n:
        if processed >= budget:
            return i, processed, RUN_BUDGET, NIL
        off = cand[i]
        work[W_PTES] += 1
        if (ptef[off] & (_PRESENT | _ZERO)) != _PRESENT:
            i += 1
            continue
        pfn = pte[off]
        pflags = f_flags[pfn]
        if (pflags & (_PG_ANON | _PG_KSM)) == 0:
            i += 1
            continue
        vpn = vma_start + off

        # -- get_next_rmap_item: free items before vpn, find or create the one at vpn ----
        prev = cursor[1]
        cur = cursor[0] if prev == NIL else it_rnext[prev]
        item = NIL
        while cur != NIL:
            a = it_addr[cur]
            if a == vpn:
                item = cur
                break
            if a > vpn:
                break
            fl = it_flags[cur]
            if fl & _STABLE:
                return i, processed, BAIL_BEFORE_ITEM, NIL     # freeing it touches a stable node
            nxt = it_rnext[cur]
            if prev == NIL:
                cursor[0] = nxt
            else:
                it_rnext[prev] = nxt
            if fl & _UNSTABLE:
                if ((seqnr - fl) & _SEQ) == 0:
                    if hashed:
                        return i, processed, BAIL_BEFORE_ITEM, NIL
                    rb_erase(il, ir, ipar, icol, uroots, it_nid[cur], cur)
                cnt[C_UNSHARED] -= 1
            mm_ksm[it_mm[cur], 0] -= 1
            it_mm[cur] = -1
            free_stack[free_top[0]] = cur
            free_top[0] += 1
            cur = nxt
        if item == NIL:
            if free_top[0] == 0:
                return i, processed, BAIL_BEFORE_ITEM, NIL     # the pool must grow first
            free_top[0] -= 1
            item = free_stack[free_top[0]]
            it_mm[item] = mm_id
            it_addr[item] = vpn
            it_flags[item] = 0
            it_sum[item] = 0
            it_age[item] = 0
            it_skips[item] = 0
            it_head[item] = NIL
            it_nid[item] = 0
            it_tpfn[item] = -1
            it_tgen[item] = -1
            it_key[item] = 0
            il[item] = NIL
            ir[item] = NIL
            ipar[item] = NIL
            mm_ksm[mm_id, 0] += 1
            it_rnext[item] = cur
            if prev == NIL:
                cursor[0] = item
            else:
                it_rnext[prev] = item
        cursor[1] = item
        cursor[2] = vpn + 1
        is_ksm = (pflags & _PG_KSM) != 0
        ifl = it_flags[item]

        # -- smart scan ----------------------------------------------------------------------
        if (ifl & _STABLE) and not is_ksm:
            return i, processed, BAIL_BEFORE_SKIP, item       # leaving a stable node: Python
        if smart and not is_ksm:
            age = it_age[item]
            if age != 255:
                it_age[item] = age + 1
            if age >= 3:
                if it_skips[item] == 0:
                    if age <= 3:
                        it_skips[item] = 1
                    elif age <= 5:
                        it_skips[item] = 2
                    elif age <= 8:
                        it_skips[item] = 4
                    else:
                        it_skips[item] = 8
                else:
                    cnt[C_SKIPPED] += 1
                    it_skips[item] -= 1
                    if ifl & _UNSTABLE:
                        if ((seqnr - ifl) & _SEQ) == 0:
                            if hashed:
                                return i, processed, BAIL_BEFORE_SKIP, item
                            rb_erase(il, ir, ipar, icol, uroots, it_nid[item], item)
                        cnt[C_UNSHARED] -= 1
                        it_flags[item] = 0
                    i += 1
                    continue

        # -- cmp_and_merge_page ----------------------------------------------------------------
        nid = 0 if across else block_node[pfn // block_pages]
        if is_ksm:
            node = f_owner[pfn]
            if (node != NIL and (n_kind[node] == _NODE or n_kind[node] == _DUP)
                    and (ifl & _STABLE) and it_head[item] == node
                    and (across or block_node[n_kpfn[node] // block_pages] == n_nid[node])):
                cnt[C_SCANNED] += 1
                processed += 1
                i += 1
                continue
            return i, processed, BAIL_BEFORE_MERGE, item
        if ifl & _UNSTABLE:
            if ((seqnr - ifl) & _SEQ) == 0:
                if hashed:
                    return i, processed, BAIL_BEFORE_MERGE, item
                rb_erase(il, ir, ipar, icol, uroots, it_nid[item], item)
            cnt[C_UNSHARED] -= 1
            it_flags[item] = 0
        work[W_CHECKSUMS] += 1
        content = f_content[pfn]
        cs = checksum_of(content, seed)
        if it_sum[item] != cs:
            it_sum[item] = cs
            cnt[C_SCANNED] += 1
            processed += 1
            i += 1
            continue
        if use_zero and cs == zero_sum:
            return i, processed, BAIL_AFTER_CHECKSUM, item

        key = memcmp_key(content)
        # stable tree: a miss needs only plain, live nodes on the path
        target = NIL                    # the KSM page (its node) to merge into, if any
        if indexed:
            target = ki_find(sindex, n_key, n_nid, key, nid)
            if target == EMPTY:
                target = NIL
            work[W_COMPARES] += stable_depth
            cur = NIL
        else:
            cur = sroots[nid]
        walked = 0                      # a bail hands the walk to Python, which counts it then
        dups_seen = 0
        effects = 0                     # chain upkeep to apply once the walk needs nothing else
        while cur != NIL:
            walked += 1
            kind = n_kind[cur]
            if kind == _CHAIN:
                # stable_node_dup, first without side effects: a stale dup, a collapse or an
                # empty chain is left to Python; pruning times and moves to the head of the
                # chain are applied below once the whole walk is known to need nothing else
                prune = now >= n_prune[cur] + prune_ns
                found = NIL
                found_len = 0
                d = n_dhead[cur]
                while d != NIL:
                    dups_seen += 1
                    kp = n_kpfn[d]
                    if (f_flags[kp] & _PG_KSM) == 0 or f_owner[kp] != d:
                        return i, processed, BAIL_AFTER_CHECKSUM, item
                    hl = n_hlen[d]
                    sharable = hl > 0 and hl < mps
                    if found == NIL or (sharable and (not (found_len > 0 and found_len < mps)
                                                      or hl > found_len)):
                        found = d
                        found_len = hl
                        if not prune and sharable:
                            break
                    d = n_dnext[d]
                if found == NIL or (n_dhead[cur] == found and n_dnext[found] == NIL):
                    return i, processed, BAIL_AFTER_CHECKSUM, item
                move = n_dhead[cur] != found and found_len > 0 and found_len + 1 < mps
                if prune or move:
                    eff_chain[effects] = cur
                    eff_found[effects] = found if move else NIL
                    eff_prune[effects] = prune
                    effects += 1
            elif kind == _NODE:
                kp = n_kpfn[cur]
                if (f_flags[kp] & _PG_KSM) == 0 or f_owner[kp] != cur:
                    return i, processed, BAIL_AFTER_CHECKSUM, item    # stale: prune in Python
            else:
                return i, processed, BAIL_AFTER_CHECKSUM, item
            tk = n_key[cur]
            if key < tk:
                cur = nl[cur]
            elif key > tk:
                cur = nr[cur]
            else:
                target = found if kind == _CHAIN else cur
                break
        if target != NIL:
            # merge into that KSM page here only in the plain case; anything else is Python's
            tl = n_hlen[target]
            if (not (tl > 0 and tl < mps)
                    or (not across and block_node[n_kpfn[target] // block_pages] != n_nid[target])
                    or (pflags & (_PG_COMPOUND | _PG_SWAPCACHE)) != 0
                    or freed_n[0] >= freed.shape[0]):
                return i, processed, BAIL_AFTER_CHECKSUM, item
        for e in range(effects):
            chain = eff_chain[e]
            if eff_prune[e]:
                n_prune[chain] = now
            found = eff_found[e]
            if found != NIL:                                   # move the dup to the head
                prev = n_dprev[found]
                nxt = n_dnext[found]
                if prev == NIL:
                    n_dhead[chain] = nxt
                else:
                    n_dnext[prev] = nxt
                if nxt != NIL:
                    n_dprev[nxt] = prev
                first = n_dhead[chain]
                n_dnext[found] = first
                n_dprev[found] = NIL
                if first != NIL:
                    n_dprev[first] = found
                n_dhead[chain] = found
        work[W_DUPS] += dups_seen
        if target != NIL:
            work[W_COMPARES] += walked
            _merge_into(target, item, mm_id, off, pfn, pte, ptef, vma_locked, vma_anon_vma,
                        f_flags, f_owner, f_mapcount, f_refcount, f_content, f_index,
                        it_flags, it_head, it_hnext, it_hprev, it_anon_vma, n_kpfn, n_hlen,
                        n_hhead, cnt, mm_ksm, work, freed, freed_n, av_gets)
            cnt[C_SCANNED] += 1
            processed += 1
            i += 1
            continue
        work[W_COMPARES] += walked
        walked = 0
        # unstable tree: search, or insert this item
        if hashed:
            if not clean:
                return i, processed, BAIL_AFTER_CHECKSUM, item    # the tree must be built now
            t, h = hash_find(uh, mask, it_key, it_nid, key, nid)
            if t == NIL:
                it_flags[item] = _UNSTABLE | (seqnr & _SEQ)
                it_nid[item] = nid
                it_tpfn[item] = pfn
                it_key[item] = key
                it_tgen[item] = pt_epoch[mm_id]
                uh[h] = item
                ulog[ulog_len[0]] = item
                ulog_len[0] += 1
                cnt[C_UNSHARED] += 1
            elif it_tpfn[t] != pfn and (across or block_node[it_tpfn[t] // block_pages] == nid):
                return i, processed, BAIL_AFTER_CHECKSUM, item    # two pages to merge
            work[W_COMPARES] += _depth(ulog_len[0])
            cnt[C_SCANNED] += 1
            processed += 1
            i += 1
            continue
        cur = uroots[nid]
        at = NIL
        go_left = False
        aborted = False
        while cur != NIL:
            walked += 1
            if clean:
                tk = it_key[cur]
            elif pt_epoch[it_mm[cur]] == it_tgen[cur]:
                # no PTE of that mm changed since: the item still maps the same frame, whose
                # contents may have changed under it (a write): compare them as they are now
                tk = memcmp_key(f_content[it_tpfn[cur]])
                it_key[cur] = tk
            else:
                return i, processed, BAIL_AFTER_CHECKSUM, item    # the page may have moved
            at = cur
            if key < tk:
                cur = il[cur]
                go_left = True
            elif key > tk:
                cur = ir[cur]
                go_left = False
            elif it_tpfn[cur] == pfn:
                aborted = True                                  # our own page, through fork
                break
            elif not across and block_node[it_tpfn[cur] // block_pages] != nid:
                aborted = True
                break
            else:
                return i, processed, BAIL_AFTER_CHECKSUM, item    # two pages to merge
        work[W_COMPARES] += walked
        if not aborted:
            it_flags[item] = _UNSTABLE | (seqnr & _SEQ)
            it_nid[item] = nid
            it_tpfn[item] = pfn
            it_key[item] = key
            it_tgen[item] = pt_epoch[mm_id]
            rb_link(il, ir, ipar, icol, uroots, nid, item, at, go_left)
            cnt[C_UNSHARED] += 1
        cnt[C_SCANNED] += 1
        processed += 1
        i += 1
    return i, processed, RUN_END, NIL
