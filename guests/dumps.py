"""Guest memory dumps -> per-page content fingerprints ("guest images").

A *dump* is a guest's physical memory as QEMU writes it:

* ``raw``: ``pmemsave 0 SIZE "FILE"`` (HMP) -- byte ``a`` of the file is guest-physical address
  ``a``; nothing else in it.
* ``elf``: ``dump-guest-memory`` with ``paging: false`` (QMP; also ``virsh dump --memory-only``)
  -- an ELF64 core file: one PT_NOTE (CPU state) and PT_LOAD segments whose ``p_paddr`` is the
  guest-physical address and whose data sits at ``p_offset`` in the file. The offsets are *not*
  page-aligned (the notes come first), so everything is located through the program headers.

An *image* is what the rest of the project consumes: for every guest RAM page, its guest page
frame number, a 128-bit MurmurHash3 (x64_128, seed 0) of its 4096 bytes and a zero flag, plus a
header with the source and the zero/duplicate statistics.

Which pages are guest RAM (``layout="pc"``, the default)
-----------------------------------------------------------
A dump of a PC machine (i440fx or q35) also holds device memory that QEMU backs with RAM: the
VGA framebuffer BAR (16 MiB at 0xfd000000 for the standard VGA), PCI option-ROM BARs, the BIOS
flash at the top of 4 GiB (256 KiB at 0xfffc0000 for SeaBIOS). These are not what the guest
kernel manages, so they are left out by guest-physical address:

========================  ===========================================================
range                     rule
========================  ===========================================================
[0, 0xa0000)              RAM (conventional memory)
[0xa0000, 0x100000)       left out: legacy VGA window, option ROMs, BIOS shadow
[0x100000, low_ram_end)   RAM
[low_ram_end, 4 GiB)      left out: the 32-bit PCI hole (framebuffers, ROM BARs, flash)
[4 GiB, ...)              RAM (PC machines put the RAM above 4 GiB right at 4 GiB)
========================  ===========================================================

``low_ram_end`` is the end of the RAM below 4 GiB. Unless given explicitly it is found from the
dump: for ELF, the end of the run of paddr-contiguous PT_LOAD segments that covers 0x100000
(QEMU writes the RAM below the hole as segments that abut, and the first device segment lies
far above it); for raw, the smaller of the file size and 4 GiB (a raw dump larger than 4 GiB
contains the PCI hole, so give ``low_ram_end`` for those). ``layout="flat"`` keeps every page
of a raw file and every PT_LOAD segment (for dumps of non-PC machines and synthetic tests).

Throughput: the file is mapped (``mmap``), zero pages are found with one vectorised numpy
reduction per chunk and never hashed (they get :data:`ZERO_FINGERPRINT`), and the other pages are
hashed in a tight loop over memoryview slices. ``jobs > 1`` hashes chunks in worker processes.

This module knows nothing about the host kernel (it is imported by ``vmhost``, never the
other way round); bad input raises :class:`DumpError` with a one-line message naming the file,
the offset or field, and the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import multiprocessing
import os
import struct
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mmh3
import numpy as np

from guests.schema import DocumentError, load_json
from hw.units import PAGE_SIZE

IMAGE_FORMAT = "vmhost-guest-image"
IMAGE_VERSION = 1
HASH_NAME = "mmh3_x64_128"

GIB4 = 1 << 32
LEGACY_HOLE = (0xA0000, 0x100000)   # VGA window + option ROM / BIOS shadow area
HIGH_MEM_START = 1 << 20            # 0x100000

#: Pages per unit of work (64 MiB): bounds memory use and is the multiprocessing grain.
CHUNK_PAGES = 16384

_WORDS = PAGE_SIZE // 8
_digest = mmh3.mmh3_x64_128_digest

#: Fingerprint of a page of 4096 zero bytes, as two little-endian uint64 (the digest's bytes).
ZERO_FINGERPRINT = np.frombuffer(_digest(bytes(PAGE_SIZE)), dtype="<u8").copy()
ZERO_FINGERPRINT.setflags(write=False)

# ELF constants (System V gABI / x86-64 psABI)
ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, ET_CORE, EM_X86_64 = 2, 1, 4, 62
PT_LOAD, PN_XNUM = 1, 0xFFFF
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")           # 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")         # 64 bytes


class DumpError(ValueError):
    """A dump or image that cannot be read; the message is one line (file, where, why)."""

    def __init__(self, message: str):
        super().__init__(message.replace("\n", " "))


# --------------------------------------------------------------------------------------------
# Layout: where the guest RAM pages are in the file


@dataclass(frozen=True)
class Extent:
    """A run of guest RAM pages stored back to back in the dump file."""

    file_offset: int
    paddr: int
    pages: int


@dataclass
class DumpLayout:
    path: str
    format: str                    # "elf" or "raw"
    size: int                      # file size in bytes
    low_ram_end: int | None        # None for layout "flat"
    extents: list[Extent]
    skipped: list[dict] = field(default_factory=list)   # device memory left out, and why

    @property
    def pages(self) -> int:
        return sum(e.pages for e in self.extents)


def _ram_pieces(start: int, end: int, low_ram_end: int) -> tuple[list[tuple[int, int]], list]:
    """Split guest-physical [start, end) into RAM pieces and left-out pieces (with reasons)."""
    excluded = [(LEGACY_HOLE[0], LEGACY_HOLE[1], "legacy VGA window / ROM area 0xa0000-0xfffff")]
    if low_ram_end < GIB4:
        excluded.append((low_ram_end, GIB4,
                         f"32-bit PCI hole {low_ram_end:#x}-0xffffffff (device memory)"))
    ram, out = [], []
    cursor = start
    for ex_start, ex_end, why in excluded:
        if ex_end <= cursor or ex_start >= end:
            continue
        if ex_start > cursor:
            ram.append((cursor, ex_start))
        cut = (max(cursor, ex_start), min(end, ex_end))
        out.append((cut[0], cut[1], why))
        cursor = cut[1]
    if cursor < end:
        ram.append((cursor, end))
    return ram, out


def _open_size(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file") from None
    except OSError as exc:
        raise DumpError(f"{path}: cannot read ({exc.strerror})") from None
    if not os.path.isfile(path):
        raise DumpError(f"{path}: not a regular file")
    return st.st_size


def read_layout(path: str | os.PathLike, fmt: str = "auto", layout: str = "pc",
                low_ram_end: int | None = None) -> DumpLayout:
    """Find the guest RAM pages of a dump without reading the page data."""
    path = str(path)
    if fmt not in ("auto", "elf", "raw"):
        raise DumpError(f"{path}: unknown dump format {fmt!r} (auto, elf or raw)")
    if layout not in ("pc", "flat"):
        raise DumpError(f"{path}: unknown layout {layout!r} (pc or flat)")
    size = _open_size(path)
    if size == 0:
        raise DumpError(f"{path}: empty file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(EHDR.size)
            if fmt == "auto":
                fmt = "elf" if head.startswith(ELF_MAGIC) else "raw"
            if fmt == "elf":
                return _elf_layout(path, fh, size, head, layout, low_ram_end)
    except OSError as exc:
        raise DumpError(f"{path}: cannot read ({exc.strerror})") from None
    return _raw_layout(path, size, layout, low_ram_end)


def _raw_layout(path, size, layout, low_ram_end) -> DumpLayout:
    if size % PAGE_SIZE:
        raise DumpError(f"{path}: raw dump size {size} bytes is not a multiple of the "
                        f"{PAGE_SIZE}-byte page (truncated or not a raw dump)")
    if layout == "flat":
        return DumpLayout(path, "raw", size, None, [Extent(0, 0, size // PAGE_SIZE)])
    low = min(size, GIB4) if low_ram_end is None else low_ram_end
    ram, out = _ram_pieces(0, size, low)
    extents = [Extent(a, a, (b - a) // PAGE_SIZE) for a, b in ram]
    skipped = [{"paddr": a, "bytes": b - a, "reason": why} for a, b, why in out]
    return DumpLayout(path, "raw", size, low, extents, skipped)


def _elf_layout(path, fh, size, head, layout, low_ram_end) -> DumpLayout:
    if len(head) < EHDR.size:
        if not head.startswith(ELF_MAGIC[:len(head)]) or len(head) < 4:
            raise DumpError(f"{path}: offset 0: not an ELF file (size {size} bytes)")
        raise DumpError(f"{path}: offset {len(head)}: truncated ELF: file is {size} bytes, "
                        f"shorter than the {EHDR.size}-byte ELF64 header")
    (ident, e_type, e_machine, _version, _entry, e_phoff, e_shoff, _flags, _ehsize,
     e_phentsize, e_phnum, e_shentsize, _shnum, _shstrndx) = EHDR.unpack(head)
    if ident[:4] != ELF_MAGIC:
        raise DumpError(f"{path}: offset 0: not an ELF file (magic {ident[:4].hex()})")
    if ident[4] != ELFCLASS64:
        raise DumpError(f"{path}: offset 4 (EI_CLASS): class {ident[4]}, expected "
                        f"{ELFCLASS64} (ELF64)")
    if ident[5] != ELFDATA2LSB:
        raise DumpError(f"{path}: offset 5 (EI_DATA): data encoding {ident[5]}, expected "
                        f"{ELFDATA2LSB} (little-endian)")
    if e_machine != EM_X86_64:
        raise DumpError(f"{path}: offset 18 (e_machine): machine {e_machine}, expected "
                        f"{EM_X86_64} (EM_X86_64)")
    if e_type != ET_CORE:
        raise DumpError(f"{path}: offset 16 (e_type): type {e_type}, expected {ET_CORE} "
                        "(ET_CORE, a memory dump)")
    if e_phentsize != PHDR.size:
        raise DumpError(f"{path}: offset 54 (e_phentsize): {e_phentsize}, expected {PHDR.size}")
    phnum = e_phnum
    if e_phnum == PN_XNUM:
        # more program headers than fit in e_phnum: the count is sh_info of section header 0
        if e_shentsize != SHDR.size or e_shoff + SHDR.size > size:
            raise DumpError(f"{path}: offset 40 (e_shoff = {e_shoff}): truncated ELF: section "
                            "header 0 (holding the program header count) is past end of file "
                            f"(size {size})")
        fh.seek(e_shoff)
        phnum = SHDR.unpack(fh.read(SHDR.size))[7]
    if phnum == 0:
        raise DumpError(f"{path}: offset 56 (e_phnum): no program headers")
    table_end = e_phoff + phnum * PHDR.size
    if table_end > size:
        raise DumpError(f"{path}: offset 32 (e_phoff = {e_phoff}): truncated ELF: {phnum} "
                        f"program headers at {e_phoff}..{table_end} are past end of file "
                        f"(size {size})")
    fh.seek(e_phoff)
    table = fh.read(phnum * PHDR.size)

    segments = []   # (index, header offset, paddr, file offset, filesz)
    for i in range(phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, _memsz, _align = \
            PHDR.unpack_from(table, i * PHDR.size)
        where = e_phoff + i * PHDR.size
        if p_type != PT_LOAD or p_filesz == 0:
            continue
        if p_offset + p_filesz > size:
            raise DumpError(f"{path}: offset {where} (program header {i}, PT_LOAD paddr "
                            f"{p_paddr:#x}): segment data {p_offset}..{p_offset + p_filesz} is "
                            f"past end of file (size {size})")
        segments.append((i, where, p_paddr, p_offset, p_filesz))
    if not segments:
        raise DumpError(f"{path}: offset {e_phoff} (program headers): no PT_LOAD segment")
    segments.sort(key=lambda s: s[2])
    for a, b in zip(segments, segments[1:]):
        if a[2] + a[4] > b[2]:
            raise DumpError(f"{path}: offset {b[1]} (program header {b[0]}, p_paddr "
                            f"{b[2]:#x}): overlaps program header {a[0]}")

    if layout == "flat":
        low = None
    elif low_ram_end is not None:
        low = low_ram_end
    else:
        low = _elf_low_ram_end(segments)
    extents, skipped = [], []
    for i, where, paddr, offset, filesz in segments:
        if layout == "flat":
            ram, out = [(paddr, paddr + filesz)], []
        else:
            ram, out = _ram_pieces(paddr, paddr + filesz, low)
        for a, b, why in out:
            skipped.append({"segment": i, "paddr": a, "bytes": b - a, "reason": why})
        for a, b in ram:
            if a % PAGE_SIZE or b % PAGE_SIZE:
                bad = "p_paddr" if a % PAGE_SIZE else "p_filesz"
                raise DumpError(f"{path}: offset {where} (program header {i}, {bad}): guest "
                                f"RAM {a:#x}..{b:#x} is not made of whole {PAGE_SIZE}-byte "
                                "pages")
            extents.append(Extent(offset + (a - paddr), a, (b - a) // PAGE_SIZE))
    return DumpLayout(path, "elf", size, low, extents, skipped)


def _elf_low_ram_end(segments) -> int:
    """End of the paddr-contiguous run of segments covering 0x100000 (or below it)."""
    end = None
    for _i, _w, paddr, _off, filesz in segments:   # sorted by paddr
        if end is None:
            if paddr <= HIGH_MEM_START < paddr + filesz or paddr + filesz == HIGH_MEM_START:
                end = paddr + filesz
            elif paddr > HIGH_MEM_START:
                break
        elif paddr == end:
            end += filesz
        else:
            break
    if end is None:  # nothing at 1 MiB: only conventional memory (or only high memory) is RAM
        end = HIGH_MEM_START
    return min(max(end, HIGH_MEM_START), GIB4)


# --------------------------------------------------------------------------------------------
# Hashing


_MAPS: dict[str, tuple[object, mmap.mmap]] = {}


def _mapped(path: str) -> mmap.mmap:
    """The whole file mapped read-only (one mapping per process and path)."""
    entry = _MAPS.get(path)
    if entry is None:
        fh = open(path, "rb")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        mm.madvise(mmap.MADV_SEQUENTIAL)
        entry = _MAPS[path] = (fh, mm)
    return entry[1]


def _release(path: str) -> None:
    entry = _MAPS.pop(path, None)
    if entry is not None:
        entry[1].close()
        entry[0].close()


def hash_pages(buf, offset: int, pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprints ((pages, 2) uint64) and zero flags of ``pages`` pages at ``offset`` in buf."""
    words = np.frombuffer(buf, dtype="<u8", count=pages * _WORDS, offset=offset)
    zero = ~words.reshape(pages, _WORDS).any(axis=1)
    del words
    fp = np.empty((pages, 2), dtype="<u8")
    fp[:] = ZERO_FINGERPRINT
    todo = np.flatnonzero(~zero)
    if todo.size:
        view = memoryview(buf)
        try:
            starts = (offset + todo * PAGE_SIZE).tolist()
            blob = b"".join([_digest(view[s:s + PAGE_SIZE]) for s in starts])
        finally:
            view.release()
        fp[todo] = np.frombuffer(blob, dtype="<u8").reshape(-1, 2)
    return fp, zero


def _hash_chunk(task: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    path, offset, pages = task
    return hash_pages(_mapped(path), offset, pages)


@dataclass
class GuestImage:
    """Per-page fingerprints of one guest's RAM."""

    pfn: np.ndarray            # (n,) uint64 guest page frame numbers, ascending
    fingerprint: np.ndarray    # (n, 2) uint64: the 16 digest bytes as two little-endian words
    zero: np.ndarray           # (n,) bool: the page is all zero bytes
    header: dict

    @property
    def pages(self) -> int:
        return int(self.pfn.size)

    def stats(self) -> dict:
        return sharing_stats(self.fingerprint, self.zero)


def fingerprint_dump(path: str | os.PathLike, fmt: str = "auto", jobs: int = 1,
                     layout: str = "pc", low_ram_end: int | None = None) -> GuestImage:
    """Read a dump and fingerprint every guest RAM page (see the module doc for the rules)."""
    if jobs < 1:
        raise DumpError(f"{path}: jobs must be at least 1 (got {jobs})")
    lay = read_layout(path, fmt, layout, low_ram_end)
    path = lay.path
    tasks = []
    for e in lay.extents:
        for first in range(0, e.pages, CHUNK_PAGES):
            n = min(CHUNK_PAGES, e.pages - first)
            tasks.append((path, e.file_offset + first * PAGE_SIZE, n))
    try:
        if jobs == 1 or len(tasks) == 1:
            try:
                parts = [_hash_chunk(t) for t in tasks]
            finally:
                _release(path)
        else:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
                parts = list(pool.map(_hash_chunk, tasks))
    except OSError as exc:
        raise DumpError(f"{path}: cannot read ({exc.strerror})") from None
    if parts:
        fp = np.concatenate([p[0] for p in parts])
        zero = np.concatenate([p[1] for p in parts])
    else:
        fp, zero = np.empty((0, 2), "<u8"), np.empty(0, bool)
    pfn = np.concatenate([np.arange(e.paddr // PAGE_SIZE, e.paddr // PAGE_SIZE + e.pages,
                                    dtype=np.uint64) for e in lay.extents]) \
        if lay.extents else np.empty(0, np.uint64)
    header = {
        "format": IMAGE_FORMAT,
        "version": IMAGE_VERSION,
        "hash": HASH_NAME,
        "page_size": PAGE_SIZE,
        "source": {"path": os.path.abspath(path), "format": lay.format, "size": lay.size,
                   "sha256_first_mib": _sha256_head(path),
                   # when the dump was written: orders dumps of one VM and times its writes
                   "mtime_ns": os.stat(path).st_mtime_ns,
                   "btime_ns": birth_time_ns(path)},
        "layout": layout,
        "low_ram_end": lay.low_ram_end,
        "ram": [[e.paddr, e.pages] for e in lay.extents],
        "skipped": lay.skipped,
        "pages": int(pfn.size),
        "stats": sharing_stats(fp, zero),
    }
    return GuestImage(pfn, fp, zero, header)


_STATX_BTIME = 0x800
_AT_FDCWD = -100


def birth_time_ns(path: str) -> int | None:
    """When the file was created (statx's stx_btime), or None where the kernel, C library or
    filesystem does not say. A dump file is created when the dump starts -- with the guest
    paused -- and last modified when it ends, so a VM's running time between two dumps is the
    second's birth time minus the first's modification time."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(256)
    if statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, buf) != 0:
        return None
    mask = struct.unpack_from("<I", buf, 0)[0]
    if not mask & _STATX_BTIME:
        return None
    sec, nsec = struct.unpack_from("<qI", buf, 80)     # stx_btime: struct statx_timestamp
    return sec * 1_000_000_000 + nsec


def _sha256_head(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(1 << 20)).hexdigest()


# --------------------------------------------------------------------------------------------
# Statistics


def _content_counts(fp: np.ndarray) -> np.ndarray:
    """How many times each distinct fingerprint occurs (order unspecified)."""
    if fp.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    keys = np.ascontiguousarray(fp, dtype="<u8")
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    s = keys[order]
    new = np.ones(s.shape[0], dtype=bool)
    new[1:] = (s[1:] != s[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    return np.diff(np.append(starts, s.shape[0]))


def sharing_stats(fingerprint: np.ndarray, zero: np.ndarray,
                  max_page_sharing: int | None = None) -> dict:
    """Zero and duplicate statistics of a set of pages.

    ``ideal_sharing`` is what a perfect merger saves among the non-zero pages: for every
    distinct non-zero content, its copies minus one (the analogue of KSM's pages_sharing);
    ``ideal_shared`` is the number of distinct non-zero contents with at least two copies (the
    analogue of pages_shared). With ``max_page_sharing`` M, a content with c copies needs
    ceil(c / M) merged pages, as KSM's stable-node chains do; ``capped_*`` report that.
    """
    zero = np.asarray(zero, dtype=bool)
    pages = int(zero.size)
    zero_pages = int(zero.sum())
    counts = _content_counts(fingerprint[~zero])
    dup = counts[counts > 1]
    nonzero = pages - zero_pages
    out = {
        "pages": pages,
        "zero_pages": zero_pages,
        "zero_fraction": round(zero_pages / pages, 6) if pages else 0.0,
        "nonzero_pages": nonzero,
        "distinct_nonzero": int(counts.size),
        "duplicated_contents": int(dup.size),
        "pages_with_duplicate": int(dup.sum()),
        "ideal_shared": int(dup.size),
        "ideal_sharing": int(nonzero - counts.size),
    }
    if max_page_sharing is not None:
        if max_page_sharing < 2:
            raise ValueError("max_page_sharing must be at least 2")
        kpages = -(-dup // max_page_sharing)
        out["max_page_sharing"] = max_page_sharing
        out["capped_shared"] = int(kpages.sum())
        out["capped_sharing"] = int((dup - kpages).sum())
    return out


def cross_sharing(images: list[GuestImage], max_page_sharing: int | None = None) -> dict:
    """Ideal sharing across several guests, pages matched by content (never by address).

    ``total`` is over the union of all pages; ``self_sharing`` sums what each guest could
    merge alone; ``inter_sharing`` = total ideal_sharing - self_sharing, what only merging
    across guests adds.
    """
    if not images:
        raise ValueError("cross_sharing needs at least one image")
    fp = np.concatenate([im.fingerprint for im in images])
    zero = np.concatenate([im.zero for im in images])
    per = [sharing_stats(im.fingerprint, im.zero, max_page_sharing) for im in images]
    total = sharing_stats(fp, zero, max_page_sharing)
    self_sharing = sum(s["ideal_sharing"] for s in per)
    return {"guests": len(images), "total": total, "per_guest": per,
            "self_sharing": self_sharing,
            "inter_sharing": total["ideal_sharing"] - self_sharing}


# --------------------------------------------------------------------------------------------
# Image files: a zip of .npy arrays (readable with numpy.load) plus header.json.
# Members carry a fixed timestamp so that the same dump always gives the same bytes.

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _member(zf: zipfile.ZipFile, name: str, data: bytes, compress: bool = True) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def save_fingerprints(image: GuestImage, path: str | os.PathLike) -> None:
    """Write ``image`` to ``path`` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            _member(zf, "header.json", (json.dumps(image.header, indent=1, sort_keys=True)
                                        + "\n").encode())
            _member(zf, "pfn.npy", _npy(image.pfn.astype("<u8")))
            # hashes do not compress, but a third of a guest's pages is usually zero (one
            # repeated fingerprint): deflate keeps an image about a third smaller
            _member(zf, "fingerprint.npy", _npy(image.fingerprint.astype("<u8")))
            _member(zf, "zero.npy", _npy(image.zero.astype(bool)))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_fingerprints(path: str | os.PathLike) -> GuestImage:
    path = str(path)
    _open_size(path)
    try:
        with zipfile.ZipFile(path) as zf:
            header = load_json(zf.read("header.json"), f"{path}: header.json")
            arrays = {}
            for name in ("pfn", "fingerprint", "zero"):
                with zf.open(f"{name}.npy") as fh:
                    arrays[name] = np.lib.format.read_array(io.BytesIO(fh.read()),
                                                            allow_pickle=False)
    except DocumentError as exc:
        raise DumpError(str(exc)) from None
    except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError, EOFError,
            NotImplementedError, RuntimeError) as exc:      # (an unsupported or encrypted member)
        raise DumpError(f"{path}: not a guest image ({exc})") from None
    n = arrays["pfn"].shape[0]
    _check_header(header, path, n)
    if arrays["fingerprint"].shape != (n, 2) or arrays["zero"].shape != (n,):
        raise DumpError(f"{path}: arrays have inconsistent shapes")
    return GuestImage(arrays["pfn"], arrays["fingerprint"], arrays["zero"], header)


HEADER_KEYS = ("format", "version", "hash", "page_size", "source", "layout", "low_ram_end", "ram",
               "skipped", "pages", "stats")
SOURCE_KEYS = ("path", "format", "size", "sha256_first_mib", "mtime_ns", "btime_ns")


def _check_header(header, path: str, pages: int) -> None:
    """header.json as :func:`fingerprint_dump` writes it: no unknown (ignored) field, and the
    format, hash and page size this code reads."""
    def bad(field: str, reason: str) -> DumpError:
        return DumpError(f"{path}: header.json field {field!r}: {reason}")
    if not isinstance(header, dict):
        raise DumpError(f"{path}: header.json: expected an object")
    for key in header:
        if key not in HEADER_KEYS:
            raise bad(key, f"unknown field (allowed: {', '.join(HEADER_KEYS)})")
    if header.get("format") != IMAGE_FORMAT or header.get("version") != IMAGE_VERSION:
        raise bad("format'/'version", f"not a {IMAGE_FORMAT} v{IMAGE_VERSION}")
    if header.get("hash", HASH_NAME) != HASH_NAME:
        raise bad("hash", f"fingerprints made with {header['hash']!r}, not {HASH_NAME}")
    if header.get("page_size", PAGE_SIZE) != PAGE_SIZE:
        raise bad("page_size", f"{header['page_size']!r} is not {PAGE_SIZE}")
    if header.get("pages", pages) != pages:
        raise bad("pages", f"{header['pages']!r} does not match the {pages} pages stored")
    src = header.get("source", {})
    if not isinstance(src, dict) or any(k not in SOURCE_KEYS for k in src):
        raise bad("source", f"expected an object with fields {', '.join(SOURCE_KEYS)}")
    for key in ("stats",):
        if not isinstance(header.get(key, {}), dict):
            raise bad(key, "expected an object")
    for key in ("ram", "skipped"):
        if not isinstance(header.get(key, []), list):
            raise bad(key, "expected a list")


def import_dump(dump: str | os.PathLike, image_path: str | os.PathLike, fmt: str = "auto",
                jobs: int = 1, layout: str = "pc",
                low_ram_end: int | None = None) -> GuestImage:
    """Fingerprint ``dump`` and write the image to ``image_path``; returns the image."""
    out_dir = Path(image_path).resolve().parent
    if not out_dir.is_dir():
        raise DumpError(f"{image_path}: output directory {out_dir} does not exist")
    image = fingerprint_dump(dump, fmt, jobs, layout, low_ram_end)
    save_fingerprints(image, image_path)
    return image


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an image file (what :func:`save_fingerprints` writes), not a dump."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return False
        with zipfile.ZipFile(path) as zf:
            return "header.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def read_guest_image(path: str | os.PathLike, jobs: int = 1) -> GuestImage:
    """An image file as it is, or a dump (ELF or raw, PC layout) fingerprinted now."""
    _open_size(str(path))
    if is_image_file(path):
        image = load_fingerprints(path)
        image.header["read_from"] = str(path)      # in memory only: what to name in errors
        return image
    return fingerprint_dump(path, jobs=jobs)
