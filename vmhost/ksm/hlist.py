"""include/linux/list.h's hlist over struct-of-arrays nodes: the lists KSM keeps.

A stable node lists the rmap_items mapping its KSM page (``stable_node->hlist``) and a chain
lists its dups (``stable_node->hlist`` of a chain); both are hlists: a head per owner and a
next link per member (``NIL`` ends a list), in the kernel's order (hlist_add_head puts a
member first). The kernel's back link (pprev) is not kept: ``hlist_del`` finds the member
from its owner's head instead, which costs a walk of a list of at most max_page_sharing
members and saves four bytes per rmap_item. Compiled, so that the Python engine and the
compiled scan share one implementation.
"""

from __future__ import annotations

from numba import njit

from vmhost.ksm.rbtree import NIL


@njit(cache=True, nogil=True)
def hlist_add_head(heads, nxt, owner, member):
    """``member`` goes first on ``owner``'s list; returns the member that was first (NIL:
    the list was empty)."""
    first = heads[owner]
    nxt[member] = first
    heads[owner] = member
    return first


@njit(cache=True, nogil=True)
def hlist_del(heads, nxt, owner, member):
    """``member`` leaves ``owner``'s list (hlist_del_init: its link is cleared)."""
    cur = heads[owner]
    if cur == member:
        heads[owner] = nxt[member]
    else:
        while nxt[cur] != member:
            cur = nxt[cur]
        nxt[cur] = nxt[member]
    nxt[member] = NIL
