"""A host as booted: the Host, its KSM engine, ksmd and the KSM tuning policy, wired once.

On a real machine this is what exists after boot: the kernel (``mm/``, ``mm/ksm.c`` with
its ksmd thread), the init script that writes ``/sys/kernel/mm/ksm`` and the tuning daemon
(ksmtuned, MoM, ...) that keeps writing it. Every study that starts from a host config
(density, fleet hosts, hot-remove scenarios) builds it here, so a ``policy:`` section means
the same thing everywhere.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guests.schema import fail

if TYPE_CHECKING:
    from vmhost.config import HostConfig


@dataclass
class HostSystem:
    host: Any              # vmhost.host.Host
    ksm: Any               # vmhost.ksm.engine.Ksm
    ksmd: Any              # vmhost.ksm.ksmd.Ksmd
    policy: Any            # vmhost.policies.Policy (attached)


def attach_ksm(host, knobs=(), *, path: str = "", resolution: int = 1):
    """KSM and ksmd on ``host``, with the sysfs knob writes ``knobs`` ((name, value) pairs,
    in order). A refused write is bad input: one line naming ``ksm.<knob>``."""
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    for name, value in knobs:
        rc = ksm.write_knob(name, str(value))
        if rc:
            where = f" at resolution {resolution}" if resolution > 1 else ""
            raise fail(path, f"ksm.{name}", f"the write is refused{where} "
                                            f"({errno.errorcode.get(-rc, rc)})")
    return ksm, ksmd


def build_system(hcfg: "HostConfig", *, resolution: int = 1, knobs=None,
                 full_scale_knobs: dict | None = None) -> HostSystem:
    """The host of ``hcfg`` with KSM, ksmd and its tuning policy (fixed knobs when none).

    ``resolution`` > 1: ``hcfg`` already describes the scaled host (1/N of its pages); its
    watermarks are set to the full-size host's / N, ``knobs`` are the scaled knob writes and
    ``full_scale_knobs`` the configured pages_to_scan and sleep_millisecs the policy sees. With
    fixed knobs whose scaled sleep groups several full-size batches into one, ksmd is told how
    many (``Ksmd.grain``: the sleep after a pass's cut-short last batch)."""
    host = hcfg.build()
    if resolution > 1:
        host.allocator.scale_watermarks(resolution)
        # khugepaged looks at 8 ranges a wake-up whatever the size: at 1/N it wakes N times
        # less often, so that it reaches the same share of the guests' ranges in a given time
        host.khugepaged.knobs["scan_sleep_millisecs"] *= resolution
    ksm, ksmd = attach_ksm(host, hcfg.ksm if knobs is None else knobs, path=hcfg.path,
                           resolution=resolution)
    full_sleep = (full_scale_knobs or {}).get("sleep_millisecs", 0)
    if hcfg.policy is None and full_sleep > 0:
        ksmd.grain = max(1, ksm.knobs.sleep_millisecs // full_sleep)
    policy = hcfg.make_policy(resolution)
    try:
        policy.attach(host, ksm, full_scale_knobs)
    except ValueError as exc:
        raise fail(hcfg.path, "policy", str(exc)) from None
    return HostSystem(host, ksm, ksmd, policy)
