"""The KSM knob table: it names exactly the real kernel's writable knobs, and everything that
lists, parses, shows or scales knobs is derived from it."""

import errno
import stat
from pathlib import Path

import pytest

from vmhost.ksm import knobs, sysfs, trace
from vmhost.ksm.engine import Ksm
from vmhost.host import Host
from vmhost.profile import PROFILES
from hw.topology import Topology
from vmhost.reality import ksm_oracle

KSM_DIR = Path("/sys/kernel/mm/ksm")


@pytest.mark.kernel
def test_table_is_the_real_kernels_writable_knobs():
    files = {p.name: p.stat().st_mode for p in KSM_DIR.iterdir()}
    writable = {n for n, mode in files.items() if mode & stat.S_IWUSR}
    assert writable == set(knobs.NAMES)
    assert {n for n in files if n not in writable} == set(knobs.READ_ONLY)


def test_defaults_fields_and_derived_lists():
    k = knobs.Knobs()
    assert [f for f in k.__dataclass_fields__] == list(knobs.NAMES)
    assert all(getattr(k, r.name) == r.default for r in knobs.TABLE)
    assert trace.KNOBS == knobs.NAMES
    assert ksm_oracle.DEFAULTS == {n: knobs.BY_NAME[n].default_text
                                   for n in knobs.NAMES if n != "run"}
    assert list(ksm_oracle.DEFAULTS)[0] == "advisor_mode"
    assert list(ksm_oracle.DEFAULTS)[-2:] == ["pages_to_scan", "sleep_millisecs"]
    assert knobs.SCALED == ("pages_to_scan", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan")
    assert knobs.available(PROFILES["linux-2.6.33"]) == ("run", "pages_to_scan", "sleep_millisecs")
    assert knobs.available(PROFILES["linux-6.18"]) == knobs.NAMES


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_sysfs_view_lists_the_profiles_knobs(profile):
    ksm = Ksm(Host(Topology.uniform(1, 4 << 20), block_pages=1024, profile=profile))
    files = sysfs.render(ksm)
    for name in knobs.available(PROFILES[profile]):
        assert files[name] == knobs.BY_NAME[name].text(knobs.BY_NAME[name].default) + "\n"
    assert files.get("advisor_mode", "[none] scan-time\n") == "[none] scan-time\n"
    hidden = set(knobs.NAMES) - set(knobs.available(PROFILES[profile]))
    assert not hidden & set(files)
    for name in hidden:
        assert ksm.write_knob(name, "1") == -errno.ENOENT


@pytest.mark.parametrize("name, text, rc", [
    ("run", "01", 0), ("run", "3", -errno.EINVAL), ("run", "1 ", -errno.EINVAL),
    ("pages_to_scan", "4294967295", 0), ("pages_to_scan", "4294967296", -errno.EINVAL),
    ("max_page_sharing", "1", -errno.EINVAL), ("max_page_sharing", "-5", -errno.EINVAL),
    ("max_page_sharing", "2", 0), ("merge_across_nodes", "2", -errno.EINVAL),
    ("use_zero_pages", "on", 0), ("use_zero_pages", "maybe", -errno.EINVAL),
    ("advisor_mode", "scan-time\n", 0), ("advisor_mode", "scan", -errno.EINVAL),
    ("advisor_target_scan_time", "0", -errno.EINVAL), ("pages_shared", "1", -errno.EACCES),
    ("no_such_knob", "1", -errno.ENOENT),
])
def test_parse_as_the_kernel_does(name, text, rc):
    assert knobs.Knobs().parse(name, text)[0] == rc


def test_pages_to_scan_belongs_to_the_advisor():
    ksm = Ksm(Host(Topology.uniform(1, 4 << 20), block_pages=1024))
    assert ksm.write_knob("advisor_mode", "scan-time") == 0
    assert ksm.knobs.pages_to_scan == knobs.BY_NAME["advisor_min_pages_to_scan"].default
    assert ksm.write_knob("pages_to_scan", "1000") == -errno.EINVAL
    assert ksm.write_knob("advisor_mode", "none") == 0
    assert ksm.knobs.pages_to_scan == knobs.BY_NAME["pages_to_scan"].default
