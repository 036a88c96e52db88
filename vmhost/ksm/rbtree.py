"""Red-black trees over struct-of-arrays nodes, shaped exactly as lib/rbtree.c shapes them.

KSM's stable and unstable trees are rbtrees ordered by page content, and what
a search passes over is observable: the stable tree prunes stale nodes and
collapses chains it meets on the way, and the unstable tree gives up when a
node on the path has lost its page. So the emulator keeps real red-black
trees with the kernel's insert and erase rebalancing (the classic algorithms:
recolour when the uncle is red, otherwise one or two rotations; erase by
splicing in the in-order successor), not a hash map.

Nodes are integer ids into four growable arrays (left, right, parent,
colour) owned by the caller, so that millions of nodes cost no Python
objects. ``NIL`` (-1) is the absent node. The tree never compares keys: the
caller walks it (``root``/``left``/``right``) with its own comparison and
hands ``link`` the parent and side it found, as rb_link_node does.
"""

from __future__ import annotations

import numpy as np

NIL = -1
RED, BLACK = 0, 1


class NodeLinks:
    """The link arrays of a population of nodes (shared by all trees over them)."""

    def __init__(self, capacity: int = 1024):
        self.left = np.full(capacity, NIL, dtype=np.int32)
        self.right = np.full(capacity, NIL, dtype=np.int32)
        self.parent = np.full(capacity, NIL, dtype=np.int32)
        self.color = np.zeros(capacity, dtype=np.uint8)

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
    """One tree (an rb_root) over nodes whose links live in a :class:`NodeLinks`."""

    __slots__ = ("n", "root", "count")

    def __init__(self, links: NodeLinks):
        self.n = links
        self.root = NIL
        self.count = 0

    def clear(self) -> None:
        """Forget every node at once (the unstable tree at each full-scan start)."""
        self.root = NIL
        self.count = 0

    # -- insertion ----------------------------------------------------------------------
    def link(self, node: int, parent: int, go_left: bool) -> None:
        """rb_link_node + rb_insert_color: hang ``node`` under ``parent`` and rebalance."""
        n = self.n
        n.left[node] = NIL
        n.right[node] = NIL
        n.parent[node] = parent
        n.color[node] = RED
        if parent == NIL:
            self.root = node
        elif go_left:
            n.left[parent] = node
        else:
            n.right[parent] = node
        self.count += 1
        self._insert_fixup(node)

    def _rotate_left(self, x: int) -> None:
        n = self.n
        y = int(n.right[x])
        n.right[x] = n.left[y]
        if n.left[y] != NIL:
            n.parent[n.left[y]] = x
        self._replace_child(x, y)
        n.left[y] = x
        n.parent[x] = y

    def _rotate_right(self, x: int) -> None:
        n = self.n
        y = int(n.left[x])
        n.left[x] = n.right[y]
        if n.right[y] != NIL:
            n.parent[n.right[y]] = x
        self._replace_child(x, y)
        n.right[y] = x
        n.parent[x] = y

    def _replace_child(self, old: int, new: int) -> None:
        """Put ``new`` where ``old`` hangs from old's parent (or at the root)."""
        n = self.n
        p = int(n.parent[old])
        n.parent[new] = p
        if p == NIL:
            self.root = new
        elif n.left[p] == old:
            n.left[p] = new
        else:
            n.right[p] = new

    def _insert_fixup(self, z: int) -> None:
        n = self.n
        while True:
            p = int(n.parent[z])
            if p == NIL:
                n.color[z] = BLACK
                return
            if n.color[p] == BLACK:
                return
            g = int(n.parent[p])
            if n.left[g] == p:
                uncle = int(n.right[g])
                if uncle != NIL and n.color[uncle] == RED:
                    n.color[p] = n.color[uncle] = BLACK
                    n.color[g] = RED
                    z = g
                    continue
                if n.right[p] == z:
                    self._rotate_left(p)
                    z, p = p, z
                self._rotate_right(g)
            else:
                uncle = int(n.left[g])
                if uncle != NIL and n.color[uncle] == RED:
                    n.color[p] = n.color[uncle] = BLACK
                    n.color[g] = RED
                    z = g
                    continue
                if n.left[p] == z:
                    self._rotate_right(p)
                    z, p = p, z
                self._rotate_left(g)
            n.color[p] = BLACK
            n.color[g] = RED
            return

    # -- removal ------------------------------------------------------------------------
    def erase(self, z: int) -> None:
        """rb_erase: unlink ``z``; a node with two children is replaced by its successor."""
        n = self.n
        self.count -= 1
        left, right = int(n.left[z]), int(n.right[z])
        if left == NIL or right == NIL:
            child = left if left != NIL else right
            parent = int(n.parent[z])
            self._replace_child_or_nil(z, child, parent)
            removed_black = n.color[z] == BLACK
        else:
            s = right                                   # in-order successor
            while n.left[s] != NIL:
                s = int(n.left[s])
            removed_black = n.color[s] == BLACK
            child = int(n.right[s])
            if s == right:
                parent = s
            else:
                parent = int(n.parent[s])
                n.left[parent] = child
                if child != NIL:
                    n.parent[child] = parent
                n.right[s] = right
                n.parent[right] = s
            n.left[s] = left
            n.parent[left] = s
            self._replace_child(z, s)
            n.color[s] = n.color[z]
        if removed_black:
            self._erase_fixup(child, parent)
        n.left[z] = n.right[z] = n.parent[z] = NIL

    def _replace_child_or_nil(self, old: int, new: int, parent: int) -> None:
        n = self.n
        if new != NIL:
            n.parent[new] = parent
        if parent == NIL:
            self.root = new
        elif n.left[parent] == old:
            n.left[parent] = new
        else:
            n.right[parent] = new

    def _erase_fixup(self, x: int, parent: int) -> None:
        n = self.n
        while x != self.root and (x == NIL or n.color[x] == BLACK):
            if x == n.left[parent]:
                w = int(n.right[parent])
                if n.color[w] == RED:
                    n.color[w] = BLACK
                    n.color[parent] = RED
                    self._rotate_left(parent)
                    w = int(n.right[parent])
                wl, wr = int(n.left[w]), int(n.right[w])
                if (wl == NIL or n.color[wl] == BLACK) and (wr == NIL or n.color[wr] == BLACK):
                    n.color[w] = RED
                    x = parent
                    parent = int(n.parent[x])
                    continue
                if wr == NIL or n.color[wr] == BLACK:
                    n.color[wl] = BLACK
                    n.color[w] = RED
                    self._rotate_right(w)
                    w = int(n.right[parent])
                n.color[w] = n.color[parent]
                n.color[parent] = BLACK
                if n.right[w] != NIL:
                    n.color[n.right[w]] = BLACK
                self._rotate_left(parent)
            else:
                w = int(n.left[parent])
                if n.color[w] == RED:
                    n.color[w] = BLACK
                    n.color[parent] = RED
                    self._rotate_right(parent)
                    w = int(n.left[parent])
                wl, wr = int(n.left[w]), int(n.right[w])
                if (wl == NIL or n.color[wl] == BLACK) and (wr == NIL or n.color[wr] == BLACK):
                    n.color[w] = RED
                    x = parent
                    parent = int(n.parent[x])
                    continue
                if wl == NIL or n.color[wl] == BLACK:
                    n.color[wr] = BLACK
                    n.color[w] = RED
                    self._rotate_left(w)
                    w = int(n.left[parent])
                n.color[w] = n.color[parent]
                n.color[parent] = BLACK
                if n.left[w] != NIL:
                    n.color[n.left[w]] = BLACK
                self._rotate_right(parent)
            x = self.root
            break
        if x != NIL:
            n.color[x] = BLACK

    def replace(self, old: int, new: int) -> None:
        """rb_replace_node: ``new`` takes ``old``'s place, links and colour."""
        n = self.n
        n.left[new], n.right[new], n.color[new] = n.left[old], n.right[old], n.color[old]
        if n.left[new] != NIL:
            n.parent[n.left[new]] = new
        if n.right[new] != NIL:
            n.parent[n.right[new]] = new
        self._replace_child(old, new)
        n.left[old] = n.right[old] = n.parent[old] = NIL

    # -- traversal ----------------------------------------------------------------------
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
