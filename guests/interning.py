"""Page contents as 64-bit content ids: one namespace for synthetic images and real dumps.

The emulator identifies a page's 4 KiB of data by a 64-bit *content id* (0 = the zero page):
equal ids mean equal pages. Two producers of ids meet in one run:

* synthetic guest images (``guests.images``) derive an id from (content class, sharing-domain
  salt, key -- kernel build, package set or application --, page index) with a 64-bit mix;
* imported dumps (``guests.dumps.GuestImage``) carry a 128-bit mmh3 fingerprint per page; the
  :class:`Interner` turns fingerprints into ids so that equal fingerprints get equal ids in every
  image loaded through the same interner, and a zero page gets 0.

Collision rules. The top 8 bits of every non-zero id are a *tag* naming the producer and class
(:data:`TAGS`), so ids of different classes can never be equal, and no id other than the zero
page's is 0. The low 56 bits are a splitmix64-style mix of the inputs; within one class two
different inputs collide with probability about n^2 / 2^57 (1e-5 for a million distinct pages
of one class). The interner checks its own ids and re-mixes on a collision, so interned dump
ids are collision-free by construction.
"""

from __future__ import annotations

import hashlib

import numpy as np

ZERO_ID = 0
TAG_SHIFT = 56
LOW_MASK = (1 << TAG_SHIFT) - 1

#: producer/class tags (top byte of a content id); 0 is reserved for the zero page
TAGS = {
    "dump": 0x01,        # interned fingerprints of real pages
    "kernel": 0x10,      # kernel text and data (per kernel build)
    "pagecache": 0x11,   # page cache of packages (per package set)
    "app": 0x12,         # application data shared within one application
    "unique": 0x13,      # per-guest unique data
    "boot_fill": 0x14,   # a boot pattern that is the same everywhere (e.g. poisoned pages)
    "rewrite": 0x20,     # pages rewritten at run time (steady-state writes)
    "device": 0x30,      # device memory (VGA RAM, ROMs)
}

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def mix64(x) -> np.ndarray:
    """splitmix64's finaliser over uint64 arrays (a bijection with full avalanche)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def key64(*parts) -> int:
    """A stable 64-bit key of strings/ints (blake2b; not Python's salted ``hash``)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little")


def tagged(tag: str, key: int, index) -> np.ndarray:
    """Content ids of pages ``index`` (array) of the stream ``key`` in class ``tag``."""
    t = np.uint64(TAGS[tag] << TAG_SHIFT)
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        low = mix64(mix64(idx + np.uint64(key & 0xFFFFFFFFFFFFFFFF)) ^ (np.uint64(key) * _GOLD))
    return (low & np.uint64(LOW_MASK)) | t


def tag_of(ids) -> np.ndarray:
    return (np.asarray(ids, dtype=np.uint64) >> np.uint64(TAG_SHIFT)).astype(np.int64)


def fingerprint_ids(fingerprint: np.ndarray, salt: int = 0) -> np.ndarray:
    """The content id a 128-bit fingerprint ((n, 2) uint64) gets without an interner: a mix
    of both words in the ``dump`` tag. Deterministic in every process, so guests built from
    dumps in different workers agree; two different pages collide with probability about
    n^2 / 2^57 (the :class:`Interner` starts from the same guess and also removes those)."""
    fp = np.ascontiguousarray(fingerprint, dtype=np.uint64).reshape(-1, 2)
    with np.errstate(over="ignore"):
        guess = mix64(fp[:, 0] ^ mix64(fp[:, 1] + np.uint64(salt)))
    return (guess & np.uint64(LOW_MASK)) | np.uint64(TAGS["dump"] << TAG_SHIFT)


def salt_domain(ids: np.ndarray, domain: str) -> np.ndarray:
    """Content ids as seen in sharing domain ``domain``: the non-zero ids re-mixed with the
    domain's key (tag kept), so guests of different domains never share a non-zero page."""
    ids = np.array(ids, dtype=np.uint64)
    if domain == "default":
        return ids
    salt = np.uint64(key64("domain", domain))
    nz = ids != 0
    with np.errstate(over="ignore"):
        ids[nz] = (ids[nz] & ~np.uint64(LOW_MASK)) | (mix64(ids[nz] ^ salt) & np.uint64(LOW_MASK))
    return ids


class Interner:
    """Fingerprint (two uint64 words) -> content id, shared by every image of one run."""

    def __init__(self, salt: int = 0):
        self.salt = salt
        self._ids: dict[tuple[int, int], int] = {}
        self._taken: set[int] = set()
        self.zero_fingerprint: tuple[int, int] | None = None
        try:
            from guests.dumps import ZERO_FINGERPRINT
            self.zero_fingerprint = (int(ZERO_FINGERPRINT[0]), int(ZERO_FINGERPRINT[1]))
        except Exception:  # pragma: no cover - dumps always importable in this project
            pass

    def __len__(self) -> int:
        return len(self._ids)

    def intern(self, fingerprint: np.ndarray, zero: np.ndarray | None = None) -> np.ndarray:
        """Content ids for an (n, 2) uint64 fingerprint array; zero pages (flag or the zero
        page's fingerprint) get 0."""
        fp = np.ascontiguousarray(fingerprint, dtype=np.uint64).reshape(-1, 2)
        n = fp.shape[0]
        out = np.zeros(n, dtype=np.uint64)
        if n == 0:
            return out
        isz = np.zeros(n, dtype=bool) if zero is None else np.asarray(zero, dtype=bool).copy()
        if self.zero_fingerprint is not None:
            isz |= (fp[:, 0] == np.uint64(self.zero_fingerprint[0])) & \
                   (fp[:, 1] == np.uint64(self.zero_fingerprint[1]))
        todo = np.flatnonzero(~isz)
        if todo.size == 0:
            return out
        uniq, inverse = np.unique(fp[todo], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        ids = np.empty(uniq.shape[0], dtype=np.uint64)
        # vectorised first guess, then a dict pass that keeps earlier assignments and fixes
        # collisions by re-mixing with a counter
        guess = fingerprint_ids(uniq, self.salt)
        known, taken = self._ids, self._taken
        for i, (a, b, g) in enumerate(zip(uniq[:, 0].tolist(), uniq[:, 1].tolist(),
                                          guess.tolist())):
            cid = known.get((a, b))
            if cid is None:
                cid, k = g, 0
                while cid in taken:
                    k += 1
                    cid = int((mix64(np.uint64(g) + np.uint64(k)) & np.uint64(LOW_MASK))
                              | np.uint64(TAGS["dump"] << TAG_SHIFT))
                known[(a, b)] = cid
                taken.add(cid)
            ids[i] = cid
        out[todo] = ids[inverse]
        return out

    def intern_image(self, image) -> np.ndarray:
        """Content ids, one per page of a ``guests.dumps.GuestImage`` (in its pfn order)."""
        return self.intern(image.fingerprint, image.zero)
