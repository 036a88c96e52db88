"""Fit a catalog image (``guests/catalog`` format) to real memory dumps of one kind of VM.

``fit_profile(images)`` takes dumps (``guests.dumps.GuestImage``: fingerprints of every RAM
page) of several VMs of one kind -- and optionally a second dump of a VM taken some seconds
after its first -- and returns the catalog document whose guests, booted N times, have the
dumps' zero pages, self-sharing and cross-guest overlap, and their write rate. The classes
(see :mod:`guests.images`):

* which dumps are the same VM is said, not guessed (:func:`vm_groups`): ``images`` are one
  dump per VM, ``later`` pairs are two dumps of one VM (checked: :func:`same_vm`). Content
  alone cannot tell them apart -- two lab guests booted alike can land their kernels at the
  same physical addresses and then differ, like one guest seconds apart, only in what each
  wrote. A VM's dumps are ordered by the dump files' modification times,
  and its first dump is the one its classes are fitted from;
* every distinct non-zero content is counted by how many of the k VMs hold it (m of k):
  ``kernel`` (held by all k, ``pool: 1``: every guest holds the same pages), ``pagecache``
  (held by 2 .. k-1: a population shared in part; ``pool`` p solves
  U / D = p (1 - (1 - 1/p)^k), U the contents held by any VM, D those held by one on
  average -- what drawing D of p x D contents per guest gives), ``unique`` (held by one VM);
* each class's ``fraction`` is its mean share of a guest's pages, ``distinct`` its mean
  distinct contents over its pages (self-sharing); ``zero`` is the rest, untouched at boot
  (a dump cannot tell a zeroed page from one never written; the host then never allocates
  it, as with an imported dump);
* writes, from each VM dumped twice or more: the pages whose content changed between
  consecutive dumps over the time the VM ran between them (from the first dump file's last
  write to the second's creation, or ``interval``) is the
  write rate (pages/s), and the union of changed pages the hot set, put on the ``unique``
  class (``steady: {rate, hot}``; a rewritten page gets a content of its own). Both are
  lower bounds that are exact when no page is rewritten twice between the dumps: take the
  dumps closer together than the hot set takes to be rewritten.

One VM alone says nothing about cross-guest overlap: its non-zero pages are all ``unique``
(said in ``assumptions``). ``predict(doc, n)`` boots the fitted image n times and returns the
ideal sharing the model gives; ``measured`` in the document's ``expect`` holds the dumps' own
figures, so the fit is checked against the data it came from.

This module imports nothing from ``vmhost``; errors are :class:`ProfileError`, one line.
"""

from __future__ import annotations

import math
import os

import numpy as np

from guests.images import PAGES_PER_MIB, parse_image, sharing

SAME_VM = 0.9
CLASS_ORDER = ("kernel", "pagecache", "unique")


class ProfileError(ValueError):
    """Dumps that cannot be fitted (one line: the file and the reason)."""


def _path(im) -> str:
    """The file a dump was read from (an image file, else the dump itself)."""
    return im.header.get("read_from") or im.header.get("source", {}).get("path", "?")


def _source(im) -> str:
    src = im.header.get("source", {})
    return (f"dump {os.path.basename(src.get('path', '?'))} ({src.get('format', '?')}, "
            f"{src.get('size', '?')} bytes, sha256 of its first MiB "
            f"{str(src.get('sha256_first_mib', '?'))[:16]})")


def _mtime(im) -> int:
    return int(im.header.get("source", {}).get("mtime_ns", 0))


def same_vm(a, b) -> float:
    """Of the non-zero pages of dump ``a`` whose content dump ``b`` also holds (anywhere), the
    fraction that ``b`` holds at the same guest-physical address. Dumps of one VM taken apart
    in time keep what did not change where it was (0.997 and more on the lab's guests, even
    with a fifth of the RAM rewritten in between); two VMs place their common pages
    differently when KASLR put their kernels apart (0.60 - 0.69), but not when it put them at
    the same address (0.997 seen too): a check of a pair said to be one VM, not a way to
    find them."""
    if a.pages != b.pages or not np.array_equal(a.pfn, b.pfn):
        return 0.0
    va, vb = _rows(a.fingerprint), _rows(b.fingerprint)
    common = np.isin(va, vb[~b.zero]) & ~a.zero
    if not common.any():
        return 0.0
    same = (va == vb) & common
    return float(same.sum() / common.sum())


def _rows(fp: np.ndarray) -> np.ndarray:
    """A 128-bit fingerprint per page as one comparable, hashable element."""
    return np.ascontiguousarray(fp, dtype="<u8").view("V16").reshape(-1)


def vm_groups(vms: list, later: list = ()) -> list[list]:
    """One group per VM, in time order: each of ``vms`` (one dump per VM), and each
    (first, second) pair of ``later`` -- two dumps of one VM -- joining the VM one of whose
    dumps is its first (the same file), or making a VM of its own. A pair whose dumps do not look like
    one VM (:func:`same_vm` below :data:`SAME_VM`) or whose second dump is not the later one
    is refused."""
    groups = [[im] for im in vms]
    for first, second in later:
        likeness = same_vm(first, second)
        if likeness < SAME_VM:
            raise ProfileError(f"{_path(second)}: not a later dump of the VM of {_path(first)} "
                               f"(only {100 * likeness:.0f}% of the contents they share are at "
                               "the same guest-physical addresses)")
        if _mtime(second) <= _mtime(first):
            raise ProfileError(f"{_path(second)}: written before {_path(first)}, not after it")
        for g in groups:
            if any(_same_file(x, first) for x in g):     # also chains: (a, b), (b, c)
                g.append(second)
                break
        else:
            groups.append([first, second])
    return [sorted(g, key=_mtime) for g in groups]


def _same_file(a, b) -> bool:
    sa, sb = a.header.get("source", {}), b.header.get("source", {})
    return a is b or (sa.get("path") == sb.get("path") and sa.get("mtime_ns") == sb.get("mtime_ns")
                      and sa.get("sha256_first_mib") == sb.get("sha256_first_mib"))


def _distinct_rows(fp: np.ndarray) -> np.ndarray:
    return np.unique(np.ascontiguousarray(fp, dtype="<u8"), axis=0) if fp.size else \
        np.empty((0, 2), "<u8")


def _solve_pool(ratio: float, k: int) -> float:
    """p >= 1 with p (1 - (1 - 1/p)^k) = ratio (1 at p = 1, -> k as p grows)."""
    if ratio <= 1.0 + 1e-9:
        return 1.0
    if ratio >= k - 1e-6:
        return 1e6
    lo, hi = 1.0, 2.0
    f = lambda p: p * (1.0 - (1.0 - 1.0 / p) ** k)   # noqa: E731
    while f(hi) < ratio:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < ratio else (lo, mid)
    return (lo + hi) / 2


def _running_seconds(a, b) -> float:
    """How long the VM ran between two of its dumps: from the end of the first (its file's
    last write; the guest resumes then) to the start of the second (its file's creation; the
    guest was paused for it), where the files say when they were created; else the time
    between their last writes (which adds the second dump's duration, about 0.3 s for
    128 MiB)."""
    b_start = b.header.get("source", {}).get("btime_ns")
    if b_start and b_start > _mtime(a):
        return (b_start - _mtime(a)) / 1e9
    return (_mtime(b) - _mtime(a)) / 1e9


def _writes(group: list, interval: float | None) -> tuple[int, float, int] | None:
    """(changed pages, seconds, hot pages) over a VM's consecutive dumps, or None."""
    if len(group) < 2:
        return None
    changed_total, seconds, hot = 0, 0.0, np.zeros(group[0].pages, dtype=bool)
    for a, b in zip(group, group[1:]):
        dt = interval if interval is not None else _running_seconds(a, b)
        if not dt > 0:
            raise ProfileError(f"{_path(b)}: taken {dt:.3f} s after {_path(a)} (the same VM): "
                               "give the time between the dumps (--interval)")
        ch = (a.fingerprint != b.fingerprint).any(axis=1) & ~(a.zero & b.zero)
        changed_total += int(ch.sum())
        seconds += dt
        hot |= ch
    return changed_total, seconds, int(hot.sum())


def fit_profile(images: list, name: str, interval: float | None = None,
                description: str | None = None, later: list = ()) -> dict:
    """The catalog image document fitted to ``images`` (one dump per VM) and the ``later``
    pairs (two dumps of one VM; see :func:`vm_groups`) -- see the module doc."""
    if not images and not later:
        raise ProfileError("no dumps to fit")
    groups = vm_groups(images, later)
    images = [im for g in groups for im in g]
    firsts = [g[0] for g in groups]
    k = len(firsts)
    pages = [im.pages for im in firsts]
    mib = max(-(-p // PAGES_PER_MIB) for p in pages)
    total = mib * PAGES_PER_MIB
    if min(pages) < 0.9 * max(pages):
        small = firsts[int(np.argmin(pages))]
        raise ProfileError(f"{_path(small)}: {min(pages)} RAM pages where another VM has "
                           f"{max(pages)}: one profile is for VMs of one size")
    # how many VMs hold each distinct non-zero content
    per_vm = [_distinct_rows(im.fingerprint[~im.zero]) for im in firsts]
    allrows = np.concatenate(per_vm) if per_vm else np.empty((0, 2), "<u8")
    uniq, inverse, held_by = np.unique(allrows, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    cls_of_content = np.where(held_by == k, 0, np.where(held_by >= 2, 1, 2))  # kernel/pc/unique
    if k == 1:
        cls_of_content[:] = 2
    sizes = np.zeros((k, 3))
    distinct = np.zeros((k, 3))
    off = 0
    for g, im in enumerate(firsts):
        rows = per_vm[g]
        c_rows = cls_of_content[inverse[off:off + len(rows)]]
        off += len(rows)
        # pages of each class: look each page's content up among the VM's distinct rows
        fp = np.ascontiguousarray(im.fingerprint[~im.zero], dtype="<u8")
        idx = _row_index(rows, fp)
        c_pages = c_rows[idx]
        sizes[g] = np.bincount(c_pages, minlength=3)
        distinct[g] = np.bincount(c_rows, minlength=3)
    zero_fraction = float(np.mean([im.zero.sum() / total for im in firsts]))
    classes: dict = {}
    for c, cname in enumerate(CLASS_ORDER):
        n = sizes[:, c].mean()
        if n < 1:
            continue
        spec = {"fraction": round(n / total, 6),
                "distinct": round(float(min(1.0, distinct[:, c].sum() / sizes[:, c].sum())), 6)}
        if cname == "kernel":
            spec["pool"] = 1
        elif cname == "pagecache":
            union = int((cls_of_content == 1).sum())
            d_mean = distinct[:, c].mean()
            spec["pool"] = round(_solve_pool(union / d_mean, k), 4) if d_mean else 1
        classes[cname] = spec
    assumptions = [
        "zero pages are left untouched at boot (a dump cannot tell zeroed pages from unused ones)",
        "classes are interleaved in 64 KiB chunks; the real guest places them by its allocator",
    ]
    if k == 1:
        assumptions.append("fitted from one VM: no cross-guest overlap is known, every non-zero "
                           "page is unique to its guest (give dumps of two or more VMs)")
    writes = [w for w in (_writes(g, interval) for g in groups) if w is not None]
    measured: dict = {"vms": k, "dumps": len(images), "pages": int(np.mean(pages)),
                      "zero_fraction": round(zero_fraction, 6)}
    if writes:
        changed = sum(w[0] for w in writes)
        seconds = sum(w[1] for w in writes)
        hot = float(np.mean([w[2] for w in writes]))
        rate = changed / seconds
        measured.update(write_rate_pages_s=round(rate, 3), hot_pages=int(round(hot)),
                        write_seconds=round(seconds, 3))
        unique = classes.setdefault("unique", {"fraction": 0.0, "distinct": 1.0})
        u_pages = unique["fraction"] * total
        if hot > u_pages:
            # the hot set is larger than the unique class: grow it (taken from zero pages)
            unique["fraction"] = round(min(hot / total, 1.0 - sum(
                v["fraction"] for n_, v in classes.items() if n_ != "unique")), 6)
            u_pages = unique["fraction"] * total
            assumptions.append("the hot set is larger than the pages unique to one VM: the "
                               "unique class is grown to hold it")
        unique["steady"] = {"rate": round(rate, 3),
                            "hot": round(min(1.0, hot / u_pages), 6) if u_pages else 0.0}
        assumptions.append("write rate and hot set from dumps of one VM some seconds apart: "
                           "lower bounds, exact while no page is rewritten twice between them")
    from guests.dumps import cross_sharing
    cs = cross_sharing(firsts)
    measured.update(ideal_sharing=cs["total"]["ideal_sharing"],
                    self_sharing=cs["self_sharing"], inter_sharing=cs["inter_sharing"])
    classes["zero"] = {"boot": {"touched": 0}}
    doc = {
        "name": name,
        "description": description or f"fitted to {len(images)} dump(s) of {k} VM(s)",
        "os": "linux",
        "memory_mib": int(mib),
        "kernel": f"profile:{name}",
        "packages": f"profile:{name}",
        "app": f"profile:{name}",
        "chunk_pages": 16,
        "classes": classes,
        "assumptions": assumptions,
        "sources": [_source(im) for im in images],
        "expect": {"measured": measured},
    }
    doc = _plain(doc)
    parse_image(doc, name)      # the document is a valid catalog image
    return doc


def _plain(obj):
    """numpy scalars as Python numbers (YAML writes those only)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _row_index(rows: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Index into the sorted unique ``rows`` of every row of ``fp`` (all present)."""
    if fp.shape[0] == 0:
        return np.zeros(0, np.int64)
    view = lambda a: np.ascontiguousarray(a).view([("a", "<u8"), ("b", "<u8")]).reshape(-1)  # noqa: E731
    r, f = view(rows), view(fp)
    return np.searchsorted(r, f)


def predict(doc: dict, n: int, domain: str = "default", seed: int = 0) -> dict:
    """Ideal sharing of n guests booted from the profile document (``guests.images.sharing``)."""
    img = parse_image(doc, doc.get("name", "profile"))
    mems = [img.instantiate(f"vm{i}", seed=seed + i, domain=domain) for i in range(n)]
    return sharing(mems)


def render(doc: dict) -> str:
    import yaml
    head = ("# A guest image fitted by `vmhost guests profile` (catalog format, guests/images.py).\n"
            "# expect.measured: the dumps' own figures (ideal sharing in pages across the VMs'\n"
            "# first dumps; write rate in pages/s).\n")
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100)


def write_profile(doc: dict, path: str | os.PathLike) -> None:
    """Write atomically (a temporary file renamed into place)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ProfileError(f"{path}: output directory {d} does not exist")
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(render(doc))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prediction_error(doc: dict, images: list, n: int | None = None, later: list = ()) -> dict:
    """The profile booted n times (default: the number of VMs) against the dumps' real
    cross-guest sharing (ideal, pages matched by content; each VM's first dump)."""
    from guests.dumps import cross_sharing
    firsts = [g[0] for g in vm_groups(images, later)]
    n = n or len(firsts)
    real = cross_sharing(firsts)
    pred = predict(doc, n)
    out = {"vms": n, "real_ideal_sharing": real["total"]["ideal_sharing"],
           "predicted_ideal_sharing": int(pred["ideal_sharing"]),
           "real_inter_sharing": real["inter_sharing"],
           "predicted_inter_sharing": pred["inter_sharing"]}
    for key in ("ideal", "inter"):
        r, p = out[f"real_{key}_sharing"], out[f"predicted_{key}_sharing"]
        out[f"{key}_error"] = round((p - r) / r, 6) if r else (0.0 if p == 0 else math.inf)
    return out
