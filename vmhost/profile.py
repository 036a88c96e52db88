"""Kernel profiles: which era of Linux memory management the host follows.

``linux-6.18`` is the kernel on this project's machines and the default.
``linux-2.6.33`` is the era when KSM pages first became swappable, one release
before anon_vma chains: every process of a fork family shares one anon_vma,
and KSM has no chains, zero pages, smart scan, per-node trees or advisor.
Keeping both lets a user see what each later change bought.
"""

from __future__ import annotations

from dataclasses import dataclass

from guests.errors import InputError


@dataclass(frozen=True)
class Profile:
    name: str
    anon_vma_chains: bool        # 2.6.34: each forked child gets its own anon_vma
    ksm_stable_node_chains: bool  # 4.13: max_page_sharing, chains and dups
    ksm_use_zero_pages: bool     # 4.11
    ksm_smart_scan: bool         # 6.7
    ksm_merge_across_nodes: bool  # 3.9: the knob and per-node trees
    ksm_advisor: bool            # 6.8
    ksm_checksum: str            # "xxhash32" today, "jhash2" in the 2.6 era
    ksm_migrate_any: bool        # 3.9: KSM pages migrate for any reason, not only hotremove
    ksm_swapin_root_rule: bool   # 3.9+: swap-in copy rule compares anon_vma roots


PROFILES = {
    "linux-6.18": Profile("linux-6.18", True, True, True, True, True, True, "xxhash32", True, True),
    "linux-2.6.33": Profile("linux-2.6.33", False, False, False, False, False, False, "jhash2", False, False),
}
DEFAULT_PROFILE = "linux-6.18"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise InputError(f"unknown profile {name!r} (known: {known})") from None
