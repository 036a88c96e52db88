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

SEEDS = {"xxhash32": np.uint64(0x9E3779B97F4A7C15), "jhash2": np.uint64(0xD6E8FEB86659FD93)}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective avalanche of 64-bit values."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def checksums(contents: np.ndarray, algorithm: str = "xxhash32") -> np.ndarray:
    """32-bit checksums of pages with these content ids."""
    x = np.asarray(contents, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix64(x + SEEDS[algorithm])
    return (mixed >> np.uint64(32)).astype(np.uint32)


def checksum(content: int, algorithm: str = "xxhash32") -> int:
    return int(checksums(np.array([content], dtype=np.uint64), algorithm)[0])


def memcmp_key(content: int) -> int:
    """A number whose order is memcmp's order of the page with this content id."""
    return int.from_bytes(int(content).to_bytes(8, "little"), "big")
