"""KSM's global counters (/sys/kernel/mm/ksm) and its work counters, as array indices.

The engine keeps both sets in int64 arrays that the Python reference path and the
compiled scan (``fastscan``) update alike; these names fix the order once.
"""

COUNTER_NAMES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned",
                 "pages_skipped", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
WORK_NAMES = ("ptes_walked", "checksums", "tree_compares", "merges", "dups_walked")

(C_SHARED, C_SHARING, C_UNSHARED, C_SCANNED, C_SKIPPED, C_ZERO, C_CHAINS,
 C_DUPS) = range(len(COUNTER_NAMES))
W_PTES, W_CHECKSUMS, W_COMPARES, W_MERGES, W_DUPS = range(len(WORK_NAMES))
