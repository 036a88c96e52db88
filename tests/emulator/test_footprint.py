"""The memory estimate that refuses simulations too big for the machine."""

import pytest

from guests.errors import InputError
from hw.units import PAGE_SIZE as PAGE
from vmhost.benchmarks.ksm import host_bytes_for, run_emulator
from vmhost.benchmarks.ksm_workload import Workload
from vmhost.footprint import BASE_BYTES, GiB, Footprint, check_fits, fitting_resolution


def test_estimate_covers_what_a_run_really_holds():
    pages = 1 << 16
    r = run_emulator(Workload(pages, 4), scans=1, warm=False)
    fp = Footprint(host_bytes_for(pages) // PAGE, pages, pages)
    held = r["memory"]["total"]                    # every per-page numpy structure, measured
    assert held <= fp.bytes() - BASE_BYTES < 3 * held    # covered, and not absurdly above


def test_too_big_is_refused_in_one_line_with_a_resolution_that_fits():
    pages = 2048 * GiB // PAGE                      # a 2 TiB host at resolution 1
    fp = Footprint(pages, pages, pages)
    with pytest.raises(InputError) as e:
        check_fits(fp, "density big.yaml", available=16 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and "density big.yaml" in msg and "resolution" in msg
    r = fitting_resolution(fp, 16 * GiB)
    assert r is not None and fp.scaled(r).bytes() <= 16 * GiB < fp.scaled(r // 2).bytes()
    assert f"resolution {r} would need" in msg


def test_what_fits_is_not_refused():
    check_fits(Footprint(262144, 262144, 262144), "small", available=16 * GiB)
