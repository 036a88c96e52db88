"""The KSM sysfs knobs: defaults, parsing and validation as /sys/kernel/mm/ksm does them.

``Knobs.write(name, text)`` returns 0 or a negative errno exactly where the
kernel's store function would (docs/ksm-behaviour.md §12.10): run accepts "01" as 1 but
rejects a trailing space, pages_to_scan is refused while the scan-time
advisor drives it, booleans take kstrtobool's words. Knobs whose change needs
the engine's state (run, max_page_sharing, merge_across_nodes) are parsed
here and applied by the engine.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

U32_MAX = 2**32 - 1
ULONG_MAX = 2**64 - 1
INT_MAX = 2**31 - 1

RUN_STOP, RUN_MERGE, RUN_UNMERGE, RUN_OFFLINE = 0, 1, 2, 4

READ_ONLY = ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
             "pages_skipped", "ksm_zero_pages", "full_scans", "stable_node_chains",
             "stable_node_dups", "general_profit")

# knobs each profile's kernel offers
KNOBS_6_18 = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "merge_across_nodes",
              "use_zero_pages", "smart_scan", "stable_node_chains_prune_millisecs", "advisor_mode",
              "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
              "advisor_target_scan_time")
KNOBS_2_6_33 = ("run", "pages_to_scan", "sleep_millisecs")


def _kstrtoul(text: str, limit: int) -> int | None:
    """kstrtoul/kstrtouint (base 10): digits and one optional trailing newline."""
    if text.endswith("\n"):
        text = text[:-1]
    if text.startswith("+"):
        text = text[1:]
    if not text or not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    return value if value <= limit else None


def _kstrtoint(text: str) -> int | None:
    if text.endswith("\n"):
        text = text[:-1]
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text[:1] in "+-" else text
    if not body.isdigit() or not body.isascii():
        return None
    value = sign * int(body)
    return value if -INT_MAX - 1 <= value <= INT_MAX else None


def _kstrtobool(text: str) -> bool | None:
    t = text.strip("\n").lower()
    if t[:1] in ("y", "1"):
        return True
    if t[:1] in ("n", "0"):
        return False
    if t[:2] == "on":
        return True
    if t[:3] == "off":
        return False
    return None


@dataclass
class Knobs:
    run: int = RUN_STOP
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    max_page_sharing: int = 256
    merge_across_nodes: int = 1
    use_zero_pages: bool = False
    smart_scan: bool = True
    stable_node_chains_prune_millisecs: int = 2000
    advisor_mode: str = "none"
    advisor_max_cpu: int = 70
    advisor_min_pages_to_scan: int = 500
    advisor_max_pages_to_scan: int = 30000
    advisor_target_scan_time: int = 200

    def show(self, name: str) -> str:
        """The text ``cat /sys/kernel/mm/ksm/NAME`` prints (without the newline)."""
        if name == "advisor_mode":
            return "none [scan-time]" if self.advisor_mode == "scan-time" else "[none] scan-time"
        value = getattr(self, name)
        return str(int(value)) if isinstance(value, bool) else str(value)

    def parse(self, name: str, text: str) -> tuple[int, object]:
        """Parse a write; returns (0, value) or (-errno, None). Applies nothing."""
        text = str(text)
        if name in READ_ONLY:
            return -errno.EACCES, None
        if name in ("run", "pages_to_scan", "sleep_millisecs", "stable_node_chains_prune_millisecs"):
            if name == "pages_to_scan" and self.advisor_mode != "none":
                return -errno.EINVAL, None
            value = _kstrtoul(text, U32_MAX)
            if value is None or (name == "run" and value > RUN_UNMERGE):
                return -errno.EINVAL, None
            return 0, value
        if name == "merge_across_nodes":
            value = _kstrtoul(text, ULONG_MAX)
            return (-errno.EINVAL, None) if value is None or value > 1 else (0, value)
        if name == "max_page_sharing":
            value = _kstrtoint(text)
            return (-errno.EINVAL, None) if value is None or value < 2 else (0, value)
        if name in ("use_zero_pages", "smart_scan"):
            value = _kstrtobool(text)
            return (-errno.EINVAL, None) if value is None else (0, value)
        if name == "advisor_mode":
            t = text[:-1] if text.endswith("\n") else text
            return (0, t) if t in ("none", "scan-time") else (-errno.EINVAL, None)
        if name in ("advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                    "advisor_target_scan_time"):
            value = _kstrtoul(text, ULONG_MAX)
            if value is None or (name == "advisor_target_scan_time" and value == 0):
                return -errno.EINVAL, None
            return 0, value
        return -errno.ENOENT, None
