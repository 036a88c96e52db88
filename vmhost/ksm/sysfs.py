"""An emulated /sys/kernel/mm/ksm: the same file names and formats, for the emulator's state.

Scripts and exporters written for the real directory (ksmtuned, node
exporters, ``virsh node-memory-tune``'s readers) can be pointed at it. Files
are written into a temporary directory first and renamed into place, so a
reader never sees half a set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from guests.errors import InputError
from vmhost.ksm.knobs import available

if TYPE_CHECKING:
    from vmhost.ksm.engine import Ksm

COUNTERS_6_18 = ("full_scans", "pages_scanned", "pages_shared", "pages_sharing", "pages_unshared",
                 "pages_volatile", "pages_skipped", "ksm_zero_pages", "stable_node_chains",
                 "stable_node_dups", "general_profit")
COUNTERS_2_6_33 = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


def render(ksm: "Ksm") -> dict[str, str]:
    """File name -> content (with the trailing newline sysfs prints)."""
    modern = ksm.profile.ksm_advisor
    stats = ksm.stats()
    files = {name: f"{stats[name]}\n" for name in (COUNTERS_6_18 if modern else COUNTERS_2_6_33)}
    for name in available(ksm.profile):
        files[name] = ksm.knobs.show(name) + "\n"
    return files


def write(ksm: "Ksm", directory: str | os.PathLike) -> Path:
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ksm-", dir=target.parent))
    try:
        for name, text in render(ksm).items():
            (staging / name).write_text(text)
        if target.exists():
            for name in os.listdir(staging):
                os.replace(staging / name, target / name)
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
