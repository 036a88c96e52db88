"""The KSM sysfs knobs: defaults, parsing and validation as /sys/kernel/mm/ksm does them.

One table (``TABLE``: name, default, parser and range, the kernel release that added it, whether
it scales with a resolution, how a write is applied) is the only place a knob is described:
``Knobs`` (the values), the profiles' knob lists, the emulated sysfs directory, the trace
format's knob list, the real-kernel oracle's defaults and the resolution scaling are derived
from it. Adding a knob is adding a row (and, if its write does more than store the value, a
case in ``Ksm.write_knob``).

``Knobs.write(name, text)`` returns 0 or a negative errno exactly where the
kernel's store function would (docs/ksm-behaviour.md §12.10): run accepts "01" as 1 but
rejects a trailing space, pages_to_scan is refused while the scan-time
advisor drives it, booleans take kstrtobool's words. Knobs whose change needs
the engine's state (run, max_page_sharing, merge_across_nodes) are parsed
here and applied by the engine.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, make_dataclass
from typing import Any

U32_MAX = 2**32 - 1
ULONG_MAX = 2**64 - 1
INT_MAX = 2**31 - 1

RUN_STOP, RUN_MERGE, RUN_UNMERGE, RUN_OFFLINE = 0, 1, 2, 4

READ_ONLY = ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
             "pages_skipped", "ksm_zero_pages", "full_scans", "stable_node_chains",
             "stable_node_dups", "general_profit")


@dataclass(frozen=True)
class Knob:
    """One writable file of /sys/kernel/mm/ksm.

    ``parser``: the kernel's parse of a write -- ``u32`` (kstrtouint), ``ulong`` (kstrtoul),
    ``int`` (kstrtoint), ``bool`` (kstrtobool) or ``choice`` (one of ``choices``, sysfs_streq);
    a parsed value outside [``lo``, ``hi``] is EINVAL. ``feature``: the kernel profile flag
    (``vmhost.profile.Profile``) of the release that added the knob (None: there since 2.6.32).
    ``scales``: a number of pages that a host simulated at resolution 1/N sees divided by N.
    ``apply``: what a write does beyond storing the value -- ``set`` (nothing), ``wake`` (wakes
    ksmd), ``run`` (starts, stops or unmerges), ``tree`` (needs every stable node gone:
    EBUSY while KSM pages exist), ``advisor`` (switching resets pages_to_scan).
    """

    name: str
    default: Any
    parser: str
    lo: int | None = None
    hi: int | None = None
    feature: str | None = None
    scales: bool = False
    apply: str = "set"
    choices: tuple[str, ...] = ()

    def text(self, value: Any) -> str:
        """``value`` as the file reads it (without the newline)."""
        if self.parser == "choice":
            return " ".join(f"[{c}]" if c == value else c for c in self.choices)
        return str(int(value)) if isinstance(value, bool) else str(value)

    @property
    def default_text(self) -> str:
        """The default as one writes it back."""
        return str(int(self.default)) if isinstance(self.default, bool) else str(self.default)


#: The writable knobs of Linux 6.18 (mm/ksm.c), in the order the kernel's attribute list has them.
TABLE = (
    Knob("run", RUN_STOP, "u32", hi=RUN_UNMERGE, apply="run"),
    Knob("pages_to_scan", 100, "u32", scales=True),
    Knob("sleep_millisecs", 20, "u32", apply="wake"),
    Knob("max_page_sharing", 256, "int", lo=2, feature="ksm_stable_node_chains", apply="tree"),
    Knob("merge_across_nodes", 1, "ulong", hi=1, feature="ksm_merge_across_nodes", apply="tree"),
    Knob("use_zero_pages", False, "bool", feature="ksm_use_zero_pages"),
    Knob("smart_scan", True, "bool", feature="ksm_smart_scan"),
    Knob("stable_node_chains_prune_millisecs", 2000, "u32", feature="ksm_stable_node_chains"),
    Knob("advisor_mode", "none", "choice", feature="ksm_advisor", apply="advisor",
         choices=("none", "scan-time")),
    Knob("advisor_max_cpu", 70, "ulong", feature="ksm_advisor"),
    Knob("advisor_min_pages_to_scan", 500, "ulong", feature="ksm_advisor", scales=True),
    Knob("advisor_max_pages_to_scan", 30000, "ulong", feature="ksm_advisor", scales=True),
    Knob("advisor_target_scan_time", 200, "ulong", lo=1, feature="ksm_advisor"),
)
BY_NAME = {k.name: k for k in TABLE}
NAMES = tuple(BY_NAME)
#: knobs that count pages: a host simulated at resolution 1/N writes them divided by N
SCALED = tuple(k.name for k in TABLE if k.scales)


def available(profile) -> tuple[str, ...]:
    """The knobs a kernel of ``profile`` (a ``vmhost.profile.Profile``) offers, in table order."""
    return tuple(k.name for k in TABLE if k.feature is None or getattr(profile, k.feature))


def reset_order() -> dict[str, str]:
    """Every writable knob but ``run`` at its default (as text), in an order in which writing
    them restores a kernel's defaults: advisor_mode first (leaving scan-time rewrites
    pages_to_scan), the scan rate (pages_to_scan, sleep_millisecs) last."""
    first = ["advisor_mode"]
    last = ["pages_to_scan", "sleep_millisecs"]
    middle = [k.name for k in TABLE if k.name not in first + last + ["run"]]
    return {name: BY_NAME[name].default_text for name in first + middle + last}


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


def _parse(knob: Knob, text: str) -> int | bool | str | None:
    """The value the kernel's store function parses from ``text``, or None for EINVAL."""
    if knob.parser == "u32":
        value = _kstrtoul(text, U32_MAX)
    elif knob.parser == "ulong":
        value = _kstrtoul(text, ULONG_MAX)
    elif knob.parser == "int":
        value = _kstrtoint(text)
    elif knob.parser == "bool":
        return _kstrtobool(text)
    else:
        t = text[:-1] if text.endswith("\n") else text
        return t if t in knob.choices else None
    if value is None or (knob.lo is not None and value < knob.lo) \
            or (knob.hi is not None and value > knob.hi):
        return None
    return value


def _knobs_class():
    fields = [(k.name, type(k.default), field(default=k.default)) for k in TABLE]
    return make_dataclass("Knobs", fields, namespace={
        "__doc__": "The values of the KSM knobs (one field per row of ``TABLE``).",
        "__module__": __name__, "show": _show, "parse": _parse_write})


def _show(self, name: str) -> str:
    """The text ``cat /sys/kernel/mm/ksm/NAME`` prints (without the newline)."""
    return BY_NAME[name].text(getattr(self, name))


def _parse_write(self, name: str, text: str) -> tuple[int, object]:
    """Parse a write; returns (0, value) or (-errno, None). Applies nothing."""
    text = str(text)
    if name in READ_ONLY:
        return -errno.EACCES, None
    knob = BY_NAME.get(name)
    if knob is None:
        return -errno.ENOENT, None
    if name == "pages_to_scan" and self.advisor_mode != "none":
        return -errno.EINVAL, None          # the advisor owns it
    value = _parse(knob, text)
    return (-errno.EINVAL, None) if value is None else (0, value)


Knobs = _knobs_class()
