"""include/linux/list.h's hlist over struct-of-arrays nodes: the lists KSM keeps.

A stable node lists the rmap_items mapping its KSM page (``stable_node->hlist``) and a chain
lists its dups (``stable_node->hlist`` of a chain); both are hlists: a head per owner, and
per member a next and a back link. Here a list is three int32 arrays, ``heads`` indexed by
owner, ``nxt`` and ``prv`` by member (``NIL`` ends a list; a member first on its list has
``prv`` NIL, where the kernel's pprev points at the head). Compiled, so that the Python
engine and the compiled scan share one implementation.
"""

from __future__ import annotations

from numba import njit

from vmhost.ksm.rbtree import NIL


@njit(cache=True, nogil=True)
def hlist_add_head(heads, nxt, prv, owner, member):
    """``member`` goes first on ``owner``'s list; returns the member that was first (NIL:
    the list was empty)."""
    first = heads[owner]
    nxt[member] = first
    prv[member] = NIL
    if first != NIL:
        prv[first] = member
    heads[owner] = member
    return first


@njit(cache=True, nogil=True)
def hlist_del(heads, nxt, prv, owner, member):
    """``member`` leaves ``owner``'s list (hlist_del_init: its links are cleared)."""
    before = prv[member]
    after = nxt[member]
    if before == NIL:
        heads[owner] = after
    else:
        nxt[before] = after
    if after != NIL:
        prv[after] = before
    nxt[member] = NIL
    prv[member] = NIL
