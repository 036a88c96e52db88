"""Dump import on synthetic dumps written here: ELF layout rules, bad input, statistics.

The ELF files are built byte by byte in this file (a NOTE first, so the PT_LOAD data is not
page-aligned in the file, as in QEMU's dumps), and every expected fingerprint is recomputed
from the page bytes with mmh3 directly.
"""

import struct
import subprocess
import sys
from pathlib import Path

import mmh3
import numpy as np
import pytest

from helpers import ROOT

from guests import dumps
from guests.dumps import DumpError

PAGE = 4096
VGA = 0xFD000000
BIOS = 0xFFFC0000


def page(seed: int) -> bytes:
    """A page of pseudo-random bytes, distinct per seed (seed 0 is NOT special)."""
    return np.random.default_rng(seed + 1000).integers(0, 256, PAGE, dtype=np.uint8).tobytes()


def fp_of(data: bytes) -> tuple[int, int]:
    return struct.unpack("<QQ", mmh3.mmh3_x64_128_digest(data))


def write_elf(path, segments, *, note=b"CORE\0\0\0\0" + b"x" * 37, machine=62, eclass=2,
              edata=1, etype=4, phoff=None, truncate=None, filesz_extra=0):
    """An ELF64 core: a PT_NOTE, then one PT_LOAD per (paddr, data); data back to back."""
    phnum = 1 + len(segments)
    phoff_real = 64
    data_start = phoff_real + 56 * phnum
    ehdr = struct.pack("<4sBBBB8sHHIQQQIHHHHHH", b"\x7fELF", eclass, edata, 1, 0, bytes(8),
                       etype, machine, 1, 0, phoff if phoff is not None else phoff_real, 0, 0,
                       64, 56, phnum, 64, 0, 0)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, data_start, 0, 0, len(note), len(note), 0)]
    blobs = [note]
    off = data_start + len(note)
    for i, (paddr, data) in enumerate(segments):
        size = len(data) + (filesz_extra if i == len(segments) - 1 else 0)
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 0, off, paddr, paddr, size, size, 0))
        blobs.append(data)
        off += len(data)
    raw = ehdr + b"".join(phdrs) + b"".join(blobs)
    if truncate is not None:
        raw = raw[:truncate]
    Path(path).write_bytes(raw)
    return data_start + len(note)


def low_ram(pages: int) -> tuple[bytes, bytes]:
    """Guest RAM content for [0, 0xa0000) and [0xc0000, 0xc0000 + ...): the usual QEMU split."""
    below = [page(i) if i % 3 else bytes(PAGE) for i in range(160)]
    above = [page(200 + (i % 50)) if i % 4 else bytes(PAGE) for i in range(pages)]
    return b"".join(below), b"".join(above)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


# --------------------------------------------------------------------------------------------


def test_zero_fingerprint_is_mmh3_of_zero_page():
    assert tuple(int(x) for x in dumps.ZERO_FINGERPRINT) == fp_of(bytes(PAGE))


def test_elf_unaligned_offsets_and_device_memory_left_out(tmp_path):
    below, above = low_ram(64 + 1024)          # RAM up to 0xc0000 + 1088 pages
    vga = b"".join(page(900 + i) for i in range(256))
    bios = b"".join(page(950 + i) for i in range(64))
    elf = tmp_path / "guest.elf"
    first = write_elf(elf, [(0, below), (0xC0000, above), (VGA, vga), (BIOS, bios)])
    assert first % PAGE != 0 and first % 8 != 0    # the data really is unaligned
    image = dumps.fingerprint_dump(elf)
    low_end = 0xC0000 + len(above)
    assert image.header["low_ram_end"] == low_end
    expected_pfn = list(range(0, 160)) + list(range(0x100, low_end // PAGE))
    assert image.pfn.tolist() == expected_pfn
    # every page's fingerprint and zero flag recomputed from its bytes
    for pfn, got, zero in zip(image.pfn.tolist(), image.fingerprint.tolist(),
                              image.zero.tolist()):
        if pfn < 160:
            data = below[pfn * PAGE:(pfn + 1) * PAGE]
        else:
            o = pfn * PAGE - 0xC0000
            data = above[o:o + PAGE]
        assert tuple(got) == fp_of(data)
        assert zero == (data == bytes(PAGE))
    assert image.zero.any() and not image.zero.all()
    reasons = {(s["paddr"], s["bytes"]): s["reason"] for s in image.header["skipped"]}
    assert (VGA, len(vga)) in reasons and "PCI hole" in reasons[(VGA, len(vga))]
    assert (BIOS, len(bios)) in reasons
    assert (0xC0000, 0x40000) in reasons and "VGA window" in reasons[(0xC0000, 0x40000)]
    # no page of the VGA RAM made it in
    vga_fps = {fp_of(vga[i:i + PAGE]) for i in range(0, len(vga), PAGE)}
    assert not vga_fps & {tuple(r) for r in image.fingerprint.tolist()}


def test_elf_and_raw_of_the_same_memory_agree(tmp_path):
    below, above = low_ram(64 + 512)
    elf, raw = tmp_path / "g.elf", tmp_path / "g.raw"
    write_elf(elf, [(0, below), (0xC0000, above), (VGA, bytes(65536))])
    raw.write_bytes(below + bytes(0x20000) + above)   # the VGA window reads back as anything
    a, b = dumps.fingerprint_dump(elf), dumps.fingerprint_dump(raw)
    assert a.header["source"]["format"] == "elf" and b.header["source"]["format"] == "raw"
    assert np.array_equal(a.pfn, b.pfn)
    assert np.array_equal(a.fingerprint, b.fingerprint)
    assert np.array_equal(a.zero, b.zero)
    assert a.header["stats"] == b.header["stats"]


def test_flat_layout_keeps_every_segment(tmp_path):
    elf = tmp_path / "g.elf"
    write_elf(elf, [(0, page(1) * 2), (VGA, page(2) + bytes(PAGE))])
    image = dumps.fingerprint_dump(elf, layout="flat")
    assert image.pfn.tolist() == [0, 1, VGA // PAGE, VGA // PAGE + 1]
    assert image.zero.tolist() == [False, False, False, True]


def test_statistics_on_known_content(tmp_path):
    # 10 zero pages, content A x5, B x3, C x1, D x1, shuffled
    contents = [0] * 10 + [1] * 5 + [2] * 3 + [3, 4]
    order = np.random.default_rng(7).permutation(len(contents))
    pages = [bytes(PAGE) if contents[i] == 0 else page(contents[i]) for i in order]
    raw = tmp_path / "k.raw"
    raw.write_bytes(b"".join(pages))
    image = dumps.fingerprint_dump(raw, layout="flat")
    s = image.header["stats"]
    assert s == {"pages": 20, "zero_pages": 10, "zero_fraction": 0.5, "nonzero_pages": 10,
                 "distinct_nonzero": 4, "duplicated_contents": 2, "pages_with_duplicate": 8,
                 "ideal_shared": 2, "ideal_sharing": 6}
    capped = dumps.sharing_stats(image.fingerprint, image.zero, max_page_sharing=2)
    assert capped["capped_shared"] == 3 + 2 and capped["capped_sharing"] == 2 + 1
    zero_rows = image.fingerprint[image.zero]
    assert (zero_rows == dumps.ZERO_FINGERPRINT).all()


def test_cross_sharing_matches_by_content_not_address(tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(page(1) + page(2) + page(3) + bytes(PAGE))
    b.write_bytes(page(3) + page(9) + page(1) + page(1))      # moved, like KASLR does
    ia = dumps.fingerprint_dump(a, layout="flat")
    ib = dumps.fingerprint_dump(b, layout="flat")
    res = dumps.cross_sharing([ia, ib])
    assert res["total"]["ideal_sharing"] == 3      # page 1 x3 -> 2, page 3 x2 -> 1
    assert res["total"]["ideal_shared"] == 2
    assert res["self_sharing"] == 1 and res["inter_sharing"] == 2


def test_determinism_and_jobs(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 2**63, size=(600, 512), dtype=np.uint64)
    data[::4] = 0
    data[1::9] = data[1]
    raw = tmp_path / "d.raw"
    raw.write_bytes(data.tobytes())
    monkeypatch.setattr(dumps, "CHUNK_PAGES", 64)        # several chunks -> several tasks
    one = dumps.import_dump(raw, tmp_path / "one.img", layout="flat")
    two = dumps.import_dump(raw, tmp_path / "two.img", layout="flat", jobs=2)
    dumps.import_dump(raw, tmp_path / "one-again.img", layout="flat")
    assert np.array_equal(one.fingerprint, two.fingerprint)
    assert np.array_equal(one.zero, two.zero) and np.array_equal(one.pfn, two.pfn)
    assert (tmp_path / "one.img").read_bytes() == (tmp_path / "one-again.img").read_bytes()
    loaded = dumps.load_fingerprints(tmp_path / "two.img")
    assert loaded.header == two.header
    assert np.array_equal(loaded.fingerprint, one.fingerprint)
    assert loaded.fingerprint.dtype == np.dtype("<u8") and loaded.fingerprint.shape == (600, 2)
    # readable with plain numpy too
    with np.load(tmp_path / "one.img") as z:
        assert np.array_equal(z["fingerprint"], one.fingerprint)


def test_cli_import_and_info(tmp_path):
    below, above = low_ram(64 + 256)
    elf = tmp_path / "g.elf"
    write_elf(elf, [(0, below), (0xC0000, above), (VGA, bytes(PAGE * 4))])
    out = tmp_path / "g.img"
    r = cli("guests", "import", elf, "-o", out, "--format", "elf")
    assert r.returncode == 0, r.stderr
    assert "RAM pages" in r.stdout
    r = cli("guests", "info", out, "--json")
    assert r.returncode == 0 and '"vmhost-guest-image"' in r.stdout
    r = cli("guests", "sharing", out, out)
    assert r.returncode == 0 and "inter-guest" in r.stdout


# --------------------------------------------------------------------------------------------
# Bad dumps: exit status 2, one line on stderr naming the file and the cause, nothing written


def _bad(tmp_path, name, build):
    dump = tmp_path / name
    build(dump)
    return dump


BAD = {
    "truncated_header": (lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(30)),
                         ["truncated ELF", "64-byte"]),
    "phdrs_past_eof": (lambda p: write_elf(p, [(0, page(1))], phoff=1 << 20),
                       ["e_phoff", "truncated ELF", "past end of file"]),
    "phdrs_cut": (lambda p: write_elf(p, [(0, page(1)), (0x100000, page(2))], truncate=150),
                  ["e_phoff", "truncated ELF"]),
    "wrong_machine": (lambda p: write_elf(p, [(0, page(1))], machine=183),
                      ["e_machine", "183", "EM_X86_64"]),
    "elf32": (lambda p: write_elf(p, [(0, page(1))], eclass=1), ["EI_CLASS", "ELF64"]),
    "big_endian": (lambda p: write_elf(p, [(0, page(1))], edata=2),
                   ["EI_DATA", "little-endian"]),
    "segment_past_eof": (lambda p: write_elf(p, [(0, page(1) * 3)], filesz_extra=PAGE),
                         ["program header 1", "past end of file"]),
    "raw_wrong_size": (lambda p: p.write_bytes(page(1) * 3 + b"x" * 100),
                       ["not a multiple of the 4096-byte page"]),
    "empty": (lambda p: p.write_bytes(b""), ["empty file"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dump_is_one_line_exit_2(tmp_path, case):
    build, needles = BAD[case]
    dump = _bad(tmp_path, f"{case}.dump", build)
    out = tmp_path / "out.img"
    r = cli("guests", "import", dump, "-o", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(dump) in lines[0] and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and r.stdout == ""
    with pytest.raises(DumpError):
        dumps.fingerprint_dump(dump)


def test_missing_dump_and_bad_image(tmp_path):
    r = cli("guests", "import", tmp_path / "nope.raw", "-o", tmp_path / "x.img")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"vmhost: {tmp_path / 'nope.raw'}: no such file"]
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not a zip")
    r = cli("guests", "info", junk)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert str(junk) in r.stderr
    r = cli("guests", "import", tmp_path / "nope.raw", "-o", tmp_path / "x.img", "--jobs", "0")
    assert r.returncode == 2 and "--jobs" in r.stderr


def test_raw_pc_layout_leaves_out_legacy_hole(tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"".join(page(i) for i in range(512)))    # 2 MiB
    image = dumps.fingerprint_dump(raw)
    assert image.pfn.tolist() == list(range(160)) + list(range(256, 512))
    limited = dumps.fingerprint_dump(raw, low_ram_end=0x180000)
    assert limited.pfn.tolist() == list(range(160)) + list(range(256, 384))
