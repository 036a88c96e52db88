"""Page checksums and the memcmp order of page contents, from content ids.

KSM computes a 32-bit checksum of every candidate page (xxhash32 today,
jhash2 in the 2.6 era) and only lets a page into the unstable tree once the
checksum is the same on two consecutive visits. What matters for behaviour is
that equal pages give equal checksums, that a changed page almost surely
changes it, and that a fresh rmap_item's ``oldchecksum`` of 0 does not match
(so every new page is volatile on its first visit). A 32-bit mix of the
64-bit content id has exactly those properties; the profile's seed keeps the
two eras' values distinct, as they are in the kernel.

The trees are ordered by memcmp of the 4 KiB page. A content id's page is the
id's 8 little-endian bytes repeated, so memcmp order is the numeric order of
the byte-swapped id (``memcmp_key``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

SEEDS = {"xxhash32": np.uint64(0x9E3779B97F4A7C15), "jhash2": np.uint64(0xD6E8FEB86659FD93)}
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True)
def checksum_of(content, seed):
    """The checksum of one page: splitmix64's finaliser of (content + seed), top 32 bits
    (a bijective avalanche, so equal pages agree and a change almost surely shows)."""
    x = np.uint64(content) + np.uint64(seed)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    x = x ^ (x >> np.uint64(31))
    return np.uint32(x >> np.uint64(32))


@njit(cache=True, nogil=True)
def memcmp_key_of(content):
    """Byte-swapped content id: its order is memcmp's order of the page."""
    x = np.uint64(content)
    x = ((x & np.uint64(0x00000000FFFFFFFF)) << np.uint64(32)) | (x >> np.uint64(32))
    x = (((x & np.uint64(0x0000FFFF0000FFFF)) << np.uint64(16))
         | ((x >> np.uint64(16)) & np.uint64(0x0000FFFF0000FFFF)))
    x = (((x & np.uint64(0x00FF00FF00FF00FF)) << np.uint64(8))
         | ((x >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF)))
    return x


@njit(cache=True, nogil=True)
def _checksums(contents, seed):
    out = np.empty(contents.shape[0], dtype=np.uint32)
    for i in range(contents.shape[0]):
        out[i] = checksum_of(contents[i], seed)
    return out


def checksums(contents: np.ndarray, algorithm: str = "xxhash32") -> np.ndarray:
    """32-bit checksums of pages with these content ids."""
    return _checksums(np.ascontiguousarray(contents, dtype=np.uint64), SEEDS[algorithm])


def checksum(content: int, algorithm: str = "xxhash32") -> int:
    return int(checksum_of(np.uint64(content), SEEDS[algorithm]))


def memcmp_key(content: int) -> int:
    """A number whose order is memcmp's order of the page with this content id."""
    return int(memcmp_key_of(np.uint64(content)))
