"""The reality check: the emulator's prediction for live QEMU guests against the real KSM.

``vmhost calibrate qemu`` (:func:`run`):

1. **Kernel side** (:func:`measure`). Inside ``exclusive_kernel_ksm()``: boot N identical small
   guests (``vmhost.reality.lab``, same kernel and initramfs, ``mem-merge=on``), let them idle, then for
   each guest, paused: record the ground truth of its QEMU process from ``/proc`` -- every
   mergeable VMA (QEMU registers *every* RAM block: guest RAM, VGA RAM, ROMs, ACPI tables;
   ``VmFlags: mg`` in smaps), and for each page of it, from ``/proc/PID/pagemap`` (bit 63
   present, bits 0-54 PFN) and ``/proc/kpageflags`` (THP 22, COMPOUND_HEAD 15, COMPOUND_TAIL
   16, ZERO_PAGE 24, KSM 21): whether it is present, a 4 KiB page, part of a THP or the shared
   zero page; the content of every present page of the blocks that are not guest RAM is read
   from ``/proc/PID/mem`` and fingerprinted like a dump. The guest's RAM is dumped
   (``dump-guest-memory``, ELF) just before that snapshot (the dump's own reads map the
   shared zero page over untouched guest RAM; the snapshot sees that too). Then ksmd runs with the oracle's stepping (``pages_to_scan``
   1,000,000, ``sleep_millisecs`` 50: one full scan per wake-up, other knobs at their defaults)
   until pages_shared and pages_sharing have not moved for ``stable_scans`` full scans
   (``vmhost.reality.live_ksm``'s loop). By default the guests stay paused while KSM runs
   (``paused=True``), so the memory KSM merges is exactly the memory that was dumped; with
   ``paused=False`` they run on (idle), as in ``live_ksm.measure``.

2. **Emulator side** (:func:`predict`). A :class:`Host` with KSM and ksmd; per guest a
   :class:`vmhost.qemu.QemuProcess` whose RAM blocks sit at the same virtual addresses as in
   the real process; guest RAM holds the dump's contents (fingerprints interned to 64-bit
   content ids with one :class:`guests.interning.Interner` for all guests) for exactly the
   pages that were present, as a THP where the real page was one, as the shared zero page
   where the real PTE mapped it; device blocks hold what ``/proc/PID/mem`` showed. ksmd runs
   with the same knobs for the same number of full scans as the kernel did.

3. Compare pages_shared and pages_sharing (target: within 2%).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guests import dumps
from guests.interning import Interner
from guests.spec import GuestSpec
from hw.units import PAGE_SIZE, HPAGE_PAGES
from vmhost.reality import lab

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PFN_MASK = (1 << 55) - 1
KPF_COMPOUND_HEAD = 15
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24
KPF_ANON = 12

# page states in a snapshot
ABSENT, SMALL, HUGE, ZERO = 0, 1, 2, 3
STATE_NAMES = {ABSENT: "absent", SMALL: "4k", HUGE: "thp", ZERO: "zero_page"}

TARGET = 0.02


# --------------------------------------------------------------------------------------------
# Ground truth from /proc


@dataclass
class VmaSnapshot:
    """One mergeable VMA of a real process at one moment."""

    start: int                 # virtual page number
    pages: int
    name: str                  # RAM block, inferred from the size ("pc.ram", "vga.vram", ...)
    state: np.ndarray          # (pages,) uint8: ABSENT / SMALL / HUGE / ZERO
    kflags: np.ndarray         # (pages,) uint64 kpageflags of present pages (0 if absent)
    fingerprint: np.ndarray | None = None   # (pages, 2) of present pages read from /proc/PID/mem
    zero: np.ndarray | None = None

    def counts(self) -> dict[str, int]:
        return {STATE_NAMES[s]: int(np.count_nonzero(self.state == s)) for s in STATE_NAMES}

    def huge_starts(self) -> list[int]:
        """Offsets of the 2 MiB ranges mapped by one whole THP."""
        st = self.state
        out = []
        first = (-self.start) % HPAGE_PAGES
        for s in range(first, self.pages - HPAGE_PAGES + 1, HPAGE_PAGES):
            if (st[s:s + HPAGE_PAGES] == HUGE).all():
                out.append(s)
        return out


@dataclass
class ProcessSnapshot:
    pid: int
    guest: str
    vmas: list[VmaSnapshot] = field(default_factory=list)

    def vma(self, name: str) -> VmaSnapshot:
        for v in self.vmas:
            if v.name == name:
                return v
        raise KeyError(name)


def mergeable_vmas(pid: int) -> list[tuple[int, int]]:
    """(start, end) byte addresses of the VMAs with VM_MERGEABLE (smaps ``VmFlags: mg``)."""
    out, cur = [], None
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            m = head.match(line)
            if m:
                cur = (int(m.group(1), 16), int(m.group(2), 16))
            elif line.startswith("VmFlags:") and cur is not None:
                if "mg" in line.split()[1:]:
                    out.append(cur)
    return out


def _block_name(pages: int, mem_mib: int, taken: set[str]) -> str:
    """The QEMU RAM block a mergeable VMA holds, by size (pc machine, std VGA, e1000)."""
    mib = pages * PAGE_SIZE / (1 << 20)
    guess = {mem_mib: "pc.ram", 16: "vga.vram", 2: "acpi-tables", 0.25: "pc.bios",
             0.125: "pc.rom", 0.0625: "rom-64k", 1 / 256: "acpi-rsdp"}.get(mib, f"block-{pages}p")
    name, k = guess, 1
    while name in taken:
        name, k = f"{guess}#{k}", k + 1
    taken.add(name)
    return name


def read_pagemap(pid: int, start_vpn: int, pages: int) -> np.ndarray:
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(start_vpn * 8)
        raw = fh.read(pages * 8)
    return np.frombuffer(raw, dtype="<u8").copy()


def read_kpageflags(pfns: np.ndarray) -> np.ndarray:
    """kpageflags of each pfn (runs of consecutive pfns are read in one go)."""
    out = np.zeros(len(pfns), dtype=np.uint64)
    if len(pfns) == 0:
        return out
    order = np.argsort(pfns)
    sp = pfns[order]
    cuts = np.flatnonzero(np.diff(sp) > 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(sp)]])
    vals = np.empty(len(sp), dtype=np.uint64)
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        for a, b in zip(starts.tolist(), ends.tolist()):
            first, last = int(sp[a]), int(sp[b - 1])
            raw = os.pread(fd, (last - first + 1) * 8, first * 8)
            run = np.frombuffer(raw, dtype="<u8")
            vals[a:b] = run[sp[a:b] - first]
    finally:
        os.close(fd)
    out[order] = vals
    return out


def _bit(flags: np.ndarray, bit: int) -> np.ndarray:
    return (flags >> np.uint64(bit)) & np.uint64(1) == 1


def snapshot_vma(pid: int, start: int, end: int, name: str, read_contents: bool) -> VmaSnapshot:
    vpn, pages = start // PAGE_SIZE, (end - start) // PAGE_SIZE
    pm = read_pagemap(pid, vpn, pages)
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pfn = (pm & np.uint64(PFN_MASK)).astype(np.int64)
    kf = np.zeros(pages, dtype=np.uint64)
    idx = np.flatnonzero(present)
    kf[idx] = read_kpageflags(pfn[idx])
    state = np.zeros(pages, dtype=np.uint8)
    zero = present & _bit(kf, KPF_ZERO_PAGE)
    thp = present & ~zero & _bit(kf, KPF_THP)
    state[present] = SMALL
    state[thp] = HUGE
    state[zero] = ZERO
    # a HUGE range counts only when one whole folio maps the aligned 2 MiB: head first, pfns
    # consecutive; PTE-mapped pieces of a THP are treated as 4 KiB pages
    first = (-vpn) % HPAGE_PAGES
    for s in range(first, pages - HPAGE_PAGES + 1, HPAGE_PAGES):
        seg = state[s:s + HPAGE_PAGES]
        if not (seg == HUGE).any():
            continue
        ok = ((seg == HUGE).all() and _bit(kf[s:s + 1], KPF_COMPOUND_HEAD)[0]
              and (np.diff(pfn[s:s + HPAGE_PAGES]) == 1).all())
        if not ok:
            seg[seg == HUGE] = SMALL
    # THP pages outside any whole aligned range
    inside = np.zeros(pages, dtype=bool)
    for s in range(first, pages - HPAGE_PAGES + 1, HPAGE_PAGES):
        inside[s:s + HPAGE_PAGES] = True
    state[(state == HUGE) & ~inside] = SMALL
    snap = VmaSnapshot(vpn, pages, name, state, kf)
    if read_contents:
        snap.fingerprint, snap.zero = read_process_pages(pid, vpn, state)
    return snap


def read_process_pages(pid: int, vpn: int, state: np.ndarray):
    """Fingerprints of the present anonymous pages, read from /proc/PID/mem (others: zero)."""
    pages = len(state)
    fp = np.empty((pages, 2), dtype="<u8")
    fp[:] = dumps.ZERO_FINGERPRINT
    zero = np.ones(pages, dtype=bool)
    want = np.flatnonzero((state == SMALL) | (state == HUGE))
    if len(want) == 0:
        return fp, zero
    cuts = np.flatnonzero(np.diff(want) != 1) + 1
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for run in np.split(want, cuts):
            a, n = int(run[0]), len(run)
            buf = os.pread(fd, n * PAGE_SIZE, (vpn + a) * PAGE_SIZE)
            f, z = dumps.hash_pages(buf, 0, n)
            fp[a:a + n] = f
            zero[a:a + n] = z
    finally:
        os.close(fd)
    return fp, zero


def census(snap: ProcessSnapshot | None = None, pid: int | None = None) -> dict[str, int]:
    """Per-process page census of the mergeable VMAs: THPs, 4 KiB pages, zero-page PTEs,
    KSM pages (from a snapshot, or read now from ``pid`` without reading contents)."""
    vmas = snap.vmas if snap is not None else [
        snapshot_vma(pid, a, b, "", read_contents=False) for a, b in mergeable_vmas(pid)]
    out = {"thp": 0, "small": 0, "zero_page": 0, "ksm": 0}
    for v in vmas:
        out["thp"] += len(v.huge_starts())
        out["small"] += int(np.count_nonzero(v.state == SMALL))
        out["zero_page"] += int(np.count_nonzero(v.state == ZERO))
        out["ksm"] += int(np.count_nonzero(_bit(v.kflags, KPF_KSM) & (v.state != ABSENT)))
    return out


def snapshot_process(pid: int, guest: str, mem_mib: int) -> ProcessSnapshot:
    snap = ProcessSnapshot(pid, guest)
    taken: set[str] = set()
    for start, end in mergeable_vmas(pid):
        name = _block_name((end - start) // PAGE_SIZE, mem_mib, taken)
        snap.vmas.append(snapshot_vma(pid, start, end, name, read_contents=True))
    return snap


# --------------------------------------------------------------------------------------------
# 1. the kernel


def measure(guests: int = 3, mem_mib: int = 128, dump_dir: str | os.PathLike | None = None,
            timeout: float = 90.0, stable_scans: int = 2, tolerance: int = 0,
            settle_s: float = 2.0, paused: bool = True) -> dict:
    """Boot, snapshot, dump, and let the real KSM converge (see the module doc)."""
    from vmhost.reality import live_ksm

    files = lab.build_guest()
    dump_dir, remove_dumps = lab.dump_directory(dump_dir, "vmhost-calibrate-")
    out: dict = {"guests": guests, "mem_mib": mem_mib, "paused": paused,
                 "kernel_package": files.kernel_package,
                 "knobs": {"pages_to_scan": live_ksm.PAGES_TO_SCAN,
                           "sleep_millisecs": live_ksm.SLEEP_MS},
                 "stable_scans": stable_scans, "tolerance": tolerance}
    t_start = time.monotonic()
    snaps: list[ProcessSnapshot] = []
    images: list[dumps.GuestImage] = []
    try:
        with live_ksm.merging_guests(files, guests, mem_mib, dump_dir, out["knobs"], out,
                                     settle_s) as running:
            t_snap = time.monotonic()
            paths = []
            for g in running:
                g.stop()
                # dump first: its reads map the zero page over untouched guest and VGA
                # RAM, and the snapshot should show the page tables KSM will walk
                paths.append(g.dump_elf(dump_dir / f"{g.name}.elf"))
                snaps.append(snapshot_process(g.pid, g.name, mem_mib))
                if not paused:
                    g.cont()
            out["snapshot_seconds"] = round(time.monotonic() - t_snap, 2)
            conv = live_ksm.converge(timeout, stable_scans, tolerance)
            out["kernel"] = {k: conv[k] for k in (
                "converged", "pages_shared", "pages_sharing", "pages_unshared",
                "pages_volatile", "full_scans", "full_scans_to_converge",
                "seconds_to_converge", "thp_split_page", "cow_ksm")}
            out["kernel"]["samples"] = [
                {k: s[k] for k in ("full_scans", "pages_shared", "pages_sharing",
                                   "pages_unshared", "pages_volatile", "seconds")}
                for s in conv["samples"]]
            out["kernel"]["processes"] = {g.name: live_ksm.proc_memory(g.pid)
                                          for g in running}
            out["kernel"]["census_before"] = {s.guest: census(s) for s in snaps}
            out["kernel"]["census_after"] = {g.name: census(pid=g.pid) for g in running}
        images = [dumps.fingerprint_dump(p) for p in paths]
    finally:
        remove_dumps()
    out["wall_seconds"] = round(time.monotonic() - t_start, 2)
    out["_snapshots"] = snaps
    out["_images"] = images
    out["ground_truth"] = {s.guest: {v.name: v.counts() for v in s.vmas} for s in snaps}
    out["ideal"] = dumps.cross_sharing(images, max_page_sharing=256)["total"]
    return out


# --------------------------------------------------------------------------------------------
# 2. the emulator


def build_host(snaps: list[ProcessSnapshot], images: list[dumps.GuestImage], mem_mib: int,
               interner: Interner | None = None):
    """Host + KSM + ksmd + one QemuProcess per snapshot, memory as the snapshot says."""
    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd
    from vmhost.qemu import QemuProcess

    interner = interner or Interner()
    total = sum(v.pages for s in snaps for v in s.vmas)
    host_bytes = max(4 * total * PAGE_SIZE, 1 << 30)
    host_bytes = -(-host_bytes // (128 << 20)) * (128 << 20)
    host = Host(Topology.uniform(1, host_bytes), block_pages=32768, thp="madvise")
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    procs, sources = [], {"dump": 0, "process": 0, "mismatch": 0}
    for snap, image in zip(snaps, images):
        ram = snap.vma("pc.ram")
        layout = {"ram0": ram.start}
        qp = QemuProcess(host, GuestSpec(snap.guest, mem_mib), layout=layout,
                         name=f"qemu-{snap.guest}")
        # contents: the dump for guest RAM, /proc/PID/mem for the rest (device blocks, and
        # the legacy 0xa0000-0xfffff window the dump leaves out)
        dump_ids = interner.intern_image(image)
        pfn_to_idx = np.full(ram.pages, -1, dtype=np.int64)
        ok = image.pfn < ram.pages
        pfn_to_idx[image.pfn[ok].astype(np.int64)] = np.flatnonzero(ok)
        for v in snap.vmas:
            if v is ram:
                region = qp.region("ram0")
            else:
                region = qp.add_device_ram(v.name, v.pages, at=v.start)
            offs = np.flatnonzero((v.state == SMALL) | (v.state == HUGE))
            proc_ids = interner.intern(v.fingerprint[offs], v.zero[offs])
            ids = proc_ids
            if v is ram:
                idx = pfn_to_idx[offs]
                have = idx >= 0
                ids = proc_ids.copy()
                ids[have] = dump_ids[idx[have]]
                sources["dump"] += int(have.sum())
                sources["process"] += int((~have).sum())
                sources["mismatch"] += int((ids[have] != proc_ids[have]).sum())
            else:
                sources["process"] += len(offs)
            qp.load(region, offs, ids, huge_starts=v.huge_starts(),
                    zero_page=np.flatnonzero(v.state == ZERO))
        procs.append(qp)
    return host, ksm, ksmd, procs, sources


def emulator_census(qp) -> dict[str, int]:
    """The emulator's version of :func:`census` for one QemuProcess."""
    from vmhost.mm.frames import PG_COMPOUND, PG_HEAD, PG_KSM
    from vmhost.mm.vma import PTE_PRESENT, PTE_ZERO
    frames = qp.host.frames
    out = {"thp": 0, "small": 0, "zero_page": 0, "ksm": 0}
    for v in qp.vmas():
        own = v.present_mask()
        pf = v.pte[own]
        fl = frames.flags[pf]
        out["thp"] += int(np.count_nonzero(fl & PG_HEAD))
        comp = np.count_nonzero(fl & PG_COMPOUND)
        out["small"] += int(len(pf) - comp)
        out["ksm"] += int(np.count_nonzero(fl & PG_KSM))
        out["zero_page"] += int(np.count_nonzero((v.ptef & (PTE_PRESENT | PTE_ZERO))
                                                 == (PTE_PRESENT | PTE_ZERO)))
    return out


def predict(snaps: list[ProcessSnapshot], images: list[dumps.GuestImage], mem_mib: int,
            full_scans: int, knobs: dict | None = None, interner: Interner | None = None) -> dict:
    """Run the emulator's KSM on the snapshot for ``full_scans`` full scans."""
    t0 = time.monotonic()
    host, ksm, ksmd, procs, sources = build_host(snaps, images, mem_mib, interner)
    built = time.monotonic() - t0
    for name, value in (knobs or {"pages_to_scan": 1_000_000, "sleep_millisecs": 50}).items():
        rc = ksm.write_knob(name, str(value))
        if rc:
            raise ValueError(f"knob {name}={value}: {rc}")
    vm0 = dict(host.vmstat)
    resident = {qp.spec.name: qp.resident_pages() for qp in procs}
    huge = {qp.spec.name: qp.huge_pages() for qp in procs}
    ksm.write_knob("run", "1")
    samples = []
    for _ in range(full_scans):
        t1 = time.monotonic()
        ksmd.run_full_scans(1)
        st = ksm.stats()
        samples.append({k: st[k] for k in ("full_scans", "pages_shared", "pages_sharing",
                                            "pages_unshared", "pages_volatile")})
        samples[-1]["seconds"] = round(time.monotonic() - t1, 2)
    ksm.write_knob("run", "0")
    st = ksm.stats()
    return {
        "census_after": {qp.spec.name: emulator_census(qp) for qp in procs},
        "pages_shared": st["pages_shared"], "pages_sharing": st["pages_sharing"],
        "pages_unshared": st["pages_unshared"], "pages_volatile": st["pages_volatile"],
        "full_scans": st["full_scans"],
        "thp_split_page": host.vmstat["thp_split_page"] - vm0.get("thp_split_page", 0),
        "cow_ksm": host.vmstat["cow_ksm"] - vm0.get("cow_ksm", 0),
        "resident_before": resident, "thp_before": huge,
        "content_sources": sources,
        "virtual_seconds": round(host.clock.now / 1e9, 3),
        "build_seconds": round(built, 2),
        "seconds": round(time.monotonic() - t0, 2),
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------
# 3. both, compared


def run(guests: int = 3, mem_mib: int = 128, dump_dir=None, timeout: float = 90.0,
        paused: bool = True, stable_scans: int = 2) -> dict:
    real = measure(guests, mem_mib, dump_dir, timeout=timeout, paused=paused,
                   stable_scans=stable_scans)
    snaps, images = real.pop("_snapshots"), real.pop("_images")
    k = real["kernel"]
    try:
        emu = predict(snaps, images, mem_mib, full_scans=max(k["full_scans"], stable_scans + 2),
                      knobs=real["knobs"])
    except Exception:
        if dump_dir is not None:   # keep the inputs for a replay of the failing prediction
            import pickle
            with open(Path(dump_dir) / "calibrate-input.pickle", "wb") as fh:
                pickle.dump({"real": real, "snapshots": snaps, "images": images}, fh)
        raise
    real["emulator"] = emu
    real["error"] = {key: (emu[key] - k[key]) / k[key] if k[key] else float("inf")
                     for key in ("pages_shared", "pages_sharing")}
    real["within_target"] = all(abs(e) <= TARGET for e in real["error"].values())
    real["target"] = TARGET
    return real


def format_result(r: dict) -> str:
    k, e = r["kernel"], r["emulator"]
    lines = [f"{r['guests']} QEMU guests x {r['mem_mib']} MiB ({r['kernel_package']}), "
             f"{'paused' if r['paused'] else 'running'} while KSM merges; boot "
             f"{r.get('boot_seconds')} s, whole run {r.get('wall_seconds')} s",
             f"{'':14}{'kernel':>10}{'emulator':>10}{'error':>9}"]
    for key in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "full_scans", "thp_split_page"):
        err = (f"{100 * r['error'][key]:+.2f}%" if key in r["error"] else "")
        lines.append(f"{key:14}{k[key]:>10}{e[key]:>10}{err:>9}")
    lines.append(f"kernel {'converged' if k['converged'] else 'NOT converged'} after "
                 f"{k['full_scans_to_converge']} full scans ({k['seconds_to_converge']} s); "
                 f"emulator {e['seconds']} s")
    gt = r["ground_truth"]
    for g, blocks in gt.items():
        ram = blocks.get("pc.ram", {})
        lines.append(f"  {g}: guest RAM present 4k {ram.get('4k')} thp-pages {ram.get('thp')} "
                     f"zero-page {ram.get('zero_page')} absent {ram.get('absent')}; "
                     f"device blocks present "
                     f"{sum(b['4k'] + b['thp'] for n, b in blocks.items() if n != 'pc.ram')}")
    src = e["content_sources"]
    lines.append(f"contents: {src['dump']} pages from the dumps, {src['process']} from "
                 f"/proc/PID/mem, {src['mismatch']} dump/process mismatches; ideal non-zero "
                 f"sharing from the dumps {r['ideal']['ideal_sharing']}")
    lines.append(f"target +-{100 * r['target']:.0f}%: "
                 f"{'met' if r['within_target'] else 'NOT met'}")
    return "\n".join(lines)
