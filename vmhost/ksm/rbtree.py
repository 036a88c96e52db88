"""Red-black trees over struct-of-arrays nodes, shaped exactly as lib/rbtree.c shapes them.

KSM's stable and unstable trees are rbtrees ordered by page content, and what
a search passes over is observable: the stable tree prunes stale nodes and
collapses chains it meets on the way, and the unstable tree gives up when a
node on the path has lost its page. So the emulator keeps real red-black
trees with the kernel's insert and erase rebalancing (the classic algorithms:
recolour when the uncle is red, otherwise one or two rotations; erase by
splicing in the in-order successor), not a hash map.

Nodes are integer ids into four arrays (left, right, parent, colour) owned by
the caller, and the roots of all trees over one population of nodes live in
one small array, so that both the Python engine and the compiled scan loop
(``fastscan``) operate on the very same trees. ``NIL`` (-1) is the absent
node. The tree never compares keys: the caller walks it with its own
comparison and hands ``rb_link`` the parent and side it found, as
rb_link_node does.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NIL = -1
RED, BLACK = 0, 1


@njit(cache=True, nogil=True)
def _replace_child(left, right, parent, roots, r, old, new):
    """Put ``new`` where ``old`` hangs from old's parent (or at the root)."""
    p = parent[old]
    parent[new] = p
    if p == NIL:
        roots[r] = new
    elif left[p] == old:
        left[p] = new
    else:
        right[p] = new


@njit(cache=True, nogil=True)
def _rotate_left(left, right, parent, roots, r, x):
    y = right[x]
    right[x] = left[y]
    if left[y] != NIL:
        parent[left[y]] = x
    _replace_child(left, right, parent, roots, r, x, np.int64(y))
    left[y] = x
    parent[x] = y


@njit(cache=True, nogil=True)
def _rotate_right(left, right, parent, roots, r, x):
    y = left[x]
    left[x] = right[y]
    if right[y] != NIL:
        parent[right[y]] = x
    _replace_child(left, right, parent, roots, r, x, np.int64(y))
    right[y] = x
    parent[x] = y


@njit(cache=True, nogil=True)
def rb_link(left, right, parent, color, roots, r, node, at, go_left):
    """rb_link_node + rb_insert_color: hang ``node`` under ``at`` and rebalance."""
    left[node] = NIL
    right[node] = NIL
    parent[node] = at
    color[node] = RED
    if at == NIL:
        roots[r] = node
    elif go_left:
        left[at] = node
    else:
        right[at] = node
    z = node
    while True:
        p = parent[z]
        if p == NIL:
            color[z] = BLACK
            return
        if color[p] == BLACK:
            return
        g = parent[p]
        if left[g] == p:
            u = right[g]
            if u != NIL and color[u] == RED:
                color[p] = BLACK
                color[u] = BLACK
                color[g] = RED
                z = g
                continue
            if right[p] == z:
                _rotate_left(left, right, parent, roots, r, np.int64(p))
                z, p = p, z
            _rotate_right(left, right, parent, roots, r, np.int64(g))
        else:
            u = left[g]
            if u != NIL and color[u] == RED:
                color[p] = BLACK
                color[u] = BLACK
                color[g] = RED
                z = g
                continue
            if left[p] == z:
                _rotate_right(left, right, parent, roots, r, np.int64(p))
                z, p = p, z
            _rotate_left(left, right, parent, roots, r, np.int64(g))
        color[p] = BLACK
        color[g] = RED
        return


@njit(cache=True, nogil=True)
def rb_erase(left, right, parent, color, roots, r, z):
    """rb_erase: unlink ``z``; a node with two children is replaced by its successor."""
    zl = left[z]
    zr = right[z]
    if zl == NIL or zr == NIL:
        child = zl if zl != NIL else zr
        p = parent[z]
        if child != NIL:
            parent[child] = p
        if p == NIL:
            roots[r] = child
        elif left[p] == z:
            left[p] = child
        else:
            right[p] = child
        removed_black = color[z] == BLACK
    else:
        s = zr
        while left[s] != NIL:
            s = left[s]
        removed_black = color[s] == BLACK
        child = right[s]
        if s == zr:
            p = s
        else:
            p = parent[s]
            left[p] = child
            if child != NIL:
                parent[child] = p
            right[s] = zr
            parent[zr] = s
        left[s] = zl
        parent[zl] = s
        _replace_child(left, right, parent, roots, r, z, np.int64(s))
        color[s] = color[z]
    if removed_black:
        x = child
        while x != roots[r] and (x == NIL or color[x] == BLACK):
            if x == left[p]:
                w = right[p]
                if color[w] == RED:
                    color[w] = BLACK
                    color[p] = RED
                    _rotate_left(left, right, parent, roots, r, np.int64(p))
                    w = right[p]
                wl = left[w]
                wr = right[w]
                if (wl == NIL or color[wl] == BLACK) and (wr == NIL or color[wr] == BLACK):
                    color[w] = RED
                    x = p
                    p = parent[x]
                    continue
                if wr == NIL or color[wr] == BLACK:
                    color[wl] = BLACK
                    color[w] = RED
                    _rotate_right(left, right, parent, roots, r, np.int64(w))
                    w = right[p]
                color[w] = color[p]
                color[p] = BLACK
                if right[w] != NIL:
                    color[right[w]] = BLACK
                _rotate_left(left, right, parent, roots, r, np.int64(p))
            else:
                w = left[p]
                if color[w] == RED:
                    color[w] = BLACK
                    color[p] = RED
                    _rotate_right(left, right, parent, roots, r, np.int64(p))
                    w = left[p]
                wl = left[w]
                wr = right[w]
                if (wl == NIL or color[wl] == BLACK) and (wr == NIL or color[wr] == BLACK):
                    color[w] = RED
                    x = p
                    p = parent[x]
                    continue
                if wl == NIL or color[wl] == BLACK:
                    color[wr] = BLACK
                    color[w] = RED
                    _rotate_left(left, right, parent, roots, r, np.int64(w))
                    w = left[p]
                color[w] = color[p]
                color[p] = BLACK
                if left[w] != NIL:
                    color[left[w]] = BLACK
                _rotate_right(left, right, parent, roots, r, np.int64(p))
            x = roots[r]
            break
        if x != NIL:
            color[x] = BLACK
    left[z] = NIL
    right[z] = NIL
    parent[z] = NIL


@njit(cache=True, nogil=True)
def rb_replace(left, right, parent, color, roots, r, old, new):
    """rb_replace_node: ``new`` takes ``old``'s place, links and colour."""
    left[new] = left[old]
    right[new] = right[old]
    color[new] = color[old]
    if left[new] != NIL:
        parent[left[new]] = new
    if right[new] != NIL:
        parent[right[new]] = new
    _replace_child(left, right, parent, roots, r, old, new)
    left[old] = NIL
    right[old] = NIL
    parent[old] = NIL


class NodeLinks:
    """The link arrays of a population of nodes, and the roots of the trees over them."""

    def __init__(self, capacity: int = 1024, trees: int = 1):
        self.left = np.full(capacity, NIL, dtype=np.int32)
        self.right = np.full(capacity, NIL, dtype=np.int32)
        self.parent = np.full(capacity, NIL, dtype=np.int32)
        self.color = np.zeros(capacity, dtype=np.uint8)
        self.roots = np.full(max(trees, 1), NIL, dtype=np.int32)

    def grow(self, capacity: int) -> None:
        old = len(self.left)
        if capacity <= old:
            return
        for name in ("left", "right", "parent"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.full(capacity - old, NIL, dtype=arr.dtype)]))
        self.color = np.concatenate([self.color, np.zeros(capacity - old, dtype=np.uint8)])

    @property
    def nbytes(self) -> int:
        return self.left.nbytes + self.right.nbytes + self.parent.nbytes + self.color.nbytes


class RbTree:
    """One tree (an rb_root): ``links.roots[index]`` holds its root."""

    __slots__ = ("n", "index")

    def __init__(self, links: NodeLinks, index: int = 0):
        self.n = links
        self.index = index

    @property
    def root(self) -> int:
        return int(self.n.roots[self.index])

    def clear(self) -> None:
        """Forget every node at once (the unstable tree at each full-scan start)."""
        self.n.roots[self.index] = NIL

    def link(self, node: int, parent: int, go_left: bool) -> None:
        n = self.n
        rb_link(n.left, n.right, n.parent, n.color, n.roots, int(self.index), int(node),
                int(parent), bool(go_left))

    def erase(self, node: int) -> None:
        n = self.n
        rb_erase(n.left, n.right, n.parent, n.color, n.roots, int(self.index), int(node))

    def replace(self, old: int, new: int) -> None:
        n = self.n
        rb_replace(n.left, n.right, n.parent, n.color, n.roots, int(self.index), int(old),
                   int(new))

    def first(self) -> int:
        node = self.root
        if node == NIL:
            return NIL
        while self.n.left[node] != NIL:
            node = int(self.n.left[node])
        return node

    def next(self, node: int) -> int:
        n = self.n
        if n.right[node] != NIL:
            node = int(n.right[node])
            while n.left[node] != NIL:
                node = int(n.left[node])
            return node
        p = int(n.parent[node])
        while p != NIL and node == n.right[p]:
            node, p = p, int(n.parent[p])
        return p

    def __iter__(self):
        node = self.first()
        while node != NIL:
            nxt = self.next(node)
            yield node
            node = nxt

    def __len__(self) -> int:
        return sum(1 for _ in self)


class IndexedRbTree(RbTree):
    """An RbTree whose top-level nodes are also kept in a KeyIndex (the stable trees)."""

    __slots__ = ("key_index",)

    def __init__(self, links: NodeLinks, index: int, key_index):
        super().__init__(links, index)
        self.key_index = key_index

    def link(self, node: int, parent: int, go_left: bool) -> None:
        super().link(node, parent, go_left)
        self.key_index.insert(node)

    def erase(self, node: int) -> None:
        super().erase(node)
        self.key_index.delete(node)

    def replace(self, old: int, new: int) -> None:
        super().replace(old, new)
        self.key_index.replace(old, new)
