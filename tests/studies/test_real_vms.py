"""Density and fleet from real VMs: dumps as guest images, profiles fitted to dumps.

Real data: the bundled dumps of configs/dumps/ are the QEMU lab's guests (imported with
`vmhost guests import`), and one test makes fresh dumps of real TCG guests with the lab (three
idle guests, and a guest rewriting a file at a known rate dumped twice) and holds the fitted
profile against them: its predicted cross-guest sharing within 5%, its write rate within 20%.
"""

import json
import zipfile

import numpy as np
import pytest
import yaml

from guests import dumps
from helpers import one_line_exit_2, vmhost
from guests.dump_guest import load_dump_image
from guests.images import ImageError, sharing
from guests.profile import fit_profile, predict, prediction_error
from guests.resolve import image_ref, resolve_image
from vmhost.density import DensityRunner, load_density
from vmhost.reality.lab import writer_rate

from helpers import ROOT
CONFIGS = ROOT / "configs"
BUNDLED = [CONFIGS / "dumps" / f"lab-g{i}.vmimg" for i in range(3)]
WRITER = [CONFIGS / "dumps" / "lab-writer-t0.vmimg", CONFIGS / "dumps" / "lab-writer-t8.vmimg"]
# the lab writer (vmhost.reality.lab.INIT_SCRIPT) rewrites this many KiB per second
WRITE_KIB_S, HOT_KIB = 4096, 40960


# ------------------------------------------------------------------------------------------
# resolving image: values


def test_one_resolution_for_catalog_yaml_and_dumps(tmp_path):
    assert resolve_image("tiny-linux").name == "tiny-linux"
    prof = resolve_image("profiles/lab-tiny.yaml", CONFIGS)
    assert prof.name == "lab-tiny" and image_ref(prof, "profiles/lab-tiny.yaml") == \
        str(CONFIGS / "profiles" / "lab-tiny.yaml")
    d = resolve_image("dumps/lab-g0.vmimg", CONFIGS)
    assert d.memory_mib == 128 and image_ref(d, "x") == str(BUNDLED[0])
    assert image_ref(resolve_image("tiny-linux"), "tiny-linux") == "tiny-linux"
    with pytest.raises(ImageError, match="unknown image"):
        resolve_image("no-such-image")
    with pytest.raises(ImageError, match="no image or dump file"):
        resolve_image("dumps/missing.vmimg", CONFIGS)


def test_a_dump_guest_is_the_dump_page_for_page():
    gi = dumps.load_fingerprints(BUNDLED[0])
    img = load_dump_image(BUNDLED[0])
    gm = img.instantiate("a", seed=1)
    # non-zero pages written at boot, in guest-physical order; zero pages never touched
    nz = ~gi.zero[np.argsort(gi.pfn)]
    assert gm.touched.sum() == nz.sum() == gi.stats()["nonzero_pages"]
    assert (gm.content[:gi.pages][nz] != 0).all() and not gm.content[:gi.pages][~nz].any()
    # two guests of one dump are clones; of two dumps, they share what the real guests shared
    same = sharing([gm, img.instantiate("b", seed=2)])
    assert same["inter_sharing"] == gi.stats()["distinct_nonzero"]
    two = [load_dump_image(p).instantiate(f"g{i}", seed=i) for i, p in enumerate(BUNDLED)]
    real = dumps.cross_sharing([dumps.load_fingerprints(p) for p in BUNDLED])
    assert sharing(two)["ideal_sharing"] == real["total"]["ideal_sharing"]
    assert sharing(two)["inter_sharing"] == real["inter_sharing"]
    # another sharing domain shares nothing with the first
    other = load_dump_image(BUNDLED[1]).instantiate("o", domain="tenant-b")
    assert sharing([two[0], other])["inter_sharing"] == 0


def test_dump_guests_and_interned_dumps_give_pages_the_same_ids():
    from guests.images import from_dump
    from guests.interning import Interner
    gi = dumps.load_fingerprints(BUNDLED[1])
    a = from_dump(gi, Interner(), "a")
    b = load_dump_image(BUNDLED[1]).instantiate("b")
    assert np.array_equal(np.sort(a.content[a.touched]), np.sort(b.content[b.touched]))


def test_a_dump_at_a_resolution_keeps_its_sharing_proportions():
    imgs = [load_dump_image(p) for p in BUNDLED]
    full = sharing([im.instantiate(f"g{i}") for i, im in enumerate(imgs)])
    for r in (4, 8):
        ms = [im.build_memory(f"g{i}", 0, "default", im.dump_mib // r) for i, im in enumerate(imgs)]
        assert all(m.pages == 128 * 256 // r for m in ms)
        s = sharing(ms)
        assert abs(s["ideal_sharing"] * r - full["ideal_sharing"]) <= 0.05 * full["ideal_sharing"]
        assert abs(s["nonzero"] * r - full["nonzero"]) <= 0.05 * full["nonzero"]


# ------------------------------------------------------------------------------------------
# the examples


def test_density_example_from_the_lab_dumps():
    cfg = load_density(CONFIGS / "density-lab-dumps.yaml")
    res = DensityRunner(cfg).run()
    real = dumps.cross_sharing([dumps.load_fingerprints(p) for p in BUNDLED])
    assert res["vms_per_host"]["no_ksm"] == 2 and res["vms_per_host"]["ksm"] == 3
    last = res["steps"][-1]
    # the emulated KSM merges what the real guests had in common, up to its chains' copies
    ideal = real["total"]["ideal_sharing"]
    assert abs(last["saved_pages"] - ideal) <= 0.01 * ideal, (last["saved_pages"], ideal)


def test_density_example_from_the_fitted_profile():
    r = vmhost("density", CONFIGS / "density-profile.yaml", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    # a hundred different VMs of the dumps' kind: the curves cover all of them, and KSM
    # (sharing the kernel and initramfs every guest holds) fits half as many again, close to
    # the ideal merger
    assert len(res["curve"]) == 100
    fit = res["vms_per_host"]
    assert fit["ksm"] > 1.5 * fit["no_ksm"] > 20 and fit["ksm"] >= 0.95 * fit["ideal"]


def test_bundled_profile_is_the_fit_of_the_bundled_dumps():
    images = [dumps.load_fingerprints(p) for p in BUNDLED]
    later = [tuple(dumps.load_fingerprints(p) for p in WRITER)]
    doc = fit_profile(images, "lab-tiny", later=later)
    assert doc == yaml.safe_load((CONFIGS / "profiles" / "lab-tiny.yaml").read_text())
    err = prediction_error(doc, images, later=later)
    assert abs(err["ideal_error"]) < 0.05 and abs(err["inter_error"]) < 0.05, err
    # fitted to two of the three idle guests, it predicts the sharing of all three
    two = fit_profile([dumps.load_fingerprints(p) for p in BUNDLED[:2]], "two")
    three = prediction_error(two, [dumps.load_fingerprints(p) for p in BUNDLED], 3)
    assert abs(three["ideal_error"]) < 0.05 and abs(three["inter_error"]) < 0.05, three
    m = doc["expect"]["measured"]
    # the bundled writer aimed at 4 MiB/s (its console said it kept up)
    assert abs(m["write_rate_pages_s"] - WRITE_KIB_S / 4) <= 0.2 * WRITE_KIB_S / 4


def test_a_series_of_dumps_of_one_vm_is_one_vm():
    import copy
    from guests.profile import vm_groups
    w0, w1 = [dumps.load_fingerprints(p) for p in WRITER]
    # a third dump 2 s after the second, in which 100 more non-zero pages changed
    w2 = copy.deepcopy(w1)
    pages = np.flatnonzero(~w2.zero)[:100]
    w2.fingerprint[pages] ^= np.uint64(1)
    src = w2.header["source"]
    src["btime_ns"] = src["mtime_ns"] + 2_000_000_000
    src["mtime_ns"] += 2_300_000_000
    src["sha256_first_mib"] = "later"
    assert [len(g) for g in vm_groups(bundled_images(), [(w0, w1), (w1, w2)])] == [1, 1, 1, 3]
    one = fit_profile([], "one", later=[(w0, w1)])["expect"]["measured"]
    series = fit_profile([], "series", later=[(w0, w1), (w1, w2)])["expect"]["measured"]
    assert series["vms"] == 1 and series["dumps"] == 3
    assert series["write_seconds"] == pytest.approx(one["write_seconds"] + 2.0, abs=0.01)
    assert one["hot_pages"] <= series["hot_pages"] <= one["hot_pages"] + 100


def bundled_images():
    return [dumps.load_fingerprints(p) for p in BUNDLED]


def test_fleet_places_and_simulates_dump_guests(tmp_path):
    fleet = {
        "hosts": [{"name": "h", "host": {"thp": "never", "block_size": "4MiB",
                                         "nodes": [{"memory": "512MiB", "cpus": 2}]},
                   "ksm": {"pages_to_scan": 100000, "sleep_millisecs": 20, "run": 1}}],
        "inventory": {"vms": [{"image": str(p), "name": f"lab{i}"} for i, p in enumerate(BUNDLED)]
                      + [{"image": str(CONFIGS / "profiles" / "lab-tiny.yaml"), "count": 2,
                          "name": "fit"}]},
        "placement": {"policy": "first-fit", "reserve": 0},
        "simulation": {"resolution": 4, "settle": {"scans": 2, "tolerance": 0.01, "max_scans": 8}},
    }
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(fleet))
    r = vmhost("fleet", p, "--workers", "1", "--state", tmp_path / "state", "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    hosts = res["hosts"]
    # by configured memory the three dumps fill the first host, the profile's two the second
    assert [h["vms"] for h in hosts] == [["lab0-1", "lab1-1", "lab2-1"], ["fit-1", "fit-2"]]
    # simulated at 1/4: KSM merges what the real guests share; the profile's two guests
    # share what the profile predicts
    real = dumps.cross_sharing([dumps.load_fingerprints(p) for p in BUNDLED])["total"]["ideal_sharing"]
    assert abs(hosts[0]["saved_pages"] - real) <= 0.05 * real, (hosts[0]["saved_pages"], real)
    doc = yaml.safe_load((CONFIGS / "profiles" / "lab-tiny.yaml").read_text())
    two = predict(doc, 2)["ideal_sharing"]
    assert abs(hosts[1]["saved_pages"] - two) <= 0.05 * two, (hosts[1]["saved_pages"], two)


# ------------------------------------------------------------------------------------------
# real guests now: the lab's dumps, the profile, the known writer


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    d = tmp_path_factory.mktemp("lab")
    idle = vmhost("guests", "dump", "-o", d / "idle", "--guests", "3")
    assert idle.returncode == 0, idle.stderr
    w = vmhost("guests", "dump", "-o", d / "w", "--write-kib-s", WRITE_KIB_S, "--hot-kib", HOT_KIB,
               "--again", 6)
    assert w.returncode == 0, w.stderr
    return d


@pytest.mark.qemu
def test_profile_of_fresh_lab_dumps_predicts_their_sharing_and_write_rate(fresh, tmp_path):
    idle = [fresh / "idle" / f"g{i}.elf" for i in range(3)]
    out = tmp_path / "fresh.yaml"
    r = vmhost("guests", "profile", *idle, "--later", fresh / "w" / "g0.elf",
               fresh / "w" / "g0-later.elf", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    check, m = res["check"], res["profile"]["expect"]["measured"]
    assert m["vms"] == 4 and m["dumps"] == 5
    assert abs(check["ideal_error"]) < 0.05 and abs(check["inter_error"]) < 0.05, check
    # the writer aims at WRITE_KIB_S KiB/s and says on its console what it managed (less when
    # the host is short of CPU); the dumps see that (plus the guest's own churn)
    wrote = writer_rate((fresh / "w" / "g0.console.log").read_text(), 6.0)
    assert 0.5 * WRITE_KIB_S <= wrote <= 1.1 * WRITE_KIB_S, wrote
    assert abs(m["write_rate_pages_s"] - wrote / 4) <= 0.2 * wrote / 4, (m, wrote)
    assert 0.5 * WRITE_KIB_S / 4 * m["write_seconds"] <= m["hot_pages"] <= HOT_KIB / 4 + 1000
    # out of sample: fitted to two idle guests, booted three times, against all three
    two = vmhost("guests", "profile", *idle[:2], "-o", tmp_path / "two.yaml")
    assert two.returncode == 0, two.stderr
    doc = yaml.safe_load((tmp_path / "two.yaml").read_text())
    err = prediction_error(doc, [dumps.fingerprint_dump(p) for p in idle], 3)
    assert abs(err["ideal_error"]) < 0.05 and abs(err["inter_error"]) < 0.05, err
    assert predict(doc, 100)["ideal_sharing"] > 40 * err["real_ideal_sharing"] / 3


# ------------------------------------------------------------------------------------------
# bad dumps, profiles and images: one line, exit 2


def test_bad_dumps_and_profiles_end_with_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a dump\n")
    one_line_exit_2(vmhost("guests", "profile", text, "-o", tmp_path / "p.yaml"), str(text),
                    "not a multiple")
    one_line_exit_2(vmhost("guests", "profile", tmp_path / "missing.elf", "-o", tmp_path / "p.yaml"),
                    "missing.elf", "no such file")
    elf = tmp_path / "short.elf"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    one_line_exit_2(vmhost("guests", "profile", elf, "-o", tmp_path / "p.yaml"), str(elf), "truncated")
    broken = tmp_path / "broken.vmimg"
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("header.json", "{}")
    one_line_exit_2(vmhost("guests", "profile", broken, "-o", tmp_path / "p.yaml"), str(broken),
                    "not a guest image")
    one_line_exit_2(vmhost("guests", "profile", BUNDLED[0], "-o", tmp_path / "p.txt"), "p.txt",
                    "*.yaml")
    one_line_exit_2(vmhost("guests", "profile", BUNDLED[0], "-o", tmp_path / "no" / "p.yaml"),
                    "does not exist")
    small = tmp_path / "small.raw"
    small.write_bytes(np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes())
    one_line_exit_2(vmhost("guests", "profile", BUNDLED[0], small, "-o", tmp_path / "p.yaml"),
                    str(small), "one profile is for VMs of one size")
    one_line_exit_2(vmhost("guests", "profile", BUNDLED[0], "-o", tmp_path / "p.yaml",
                           "--interval", "0"), "--interval")
    # two different VMs given as one VM dumped twice; a pair in the wrong order
    one_line_exit_2(vmhost("guests", "profile", "--later", BUNDLED[0], BUNDLED[2], "-o",
                           tmp_path / "p.yaml"), str(BUNDLED[2]), "not a later dump")
    one_line_exit_2(vmhost("guests", "profile", "--later", WRITER[1], WRITER[0], "-o",
                           tmp_path / "p.yaml"), str(WRITER[1]), "written before")
    assert not (tmp_path / "p.yaml").exists()


DENSITY = """\
host: {{thp: never, block_size: 4MiB, nodes: [{{memory: 256MiB, cpus: 2}}]}}
ksm: {{run: 1}}
density:
  mix:
    - {{image: {image}{extra}}}
"""


@pytest.mark.parametrize("image,extra,words", [
    ("raw.bin", "", ("density.mix[0].image", "not an imported dump")),
    ("missing.vmimg", "", ("density.mix[0].image", "no image or dump file")),
    ("broken.vmimg", "", ("density.mix[0].image", "not a guest image")),
    ("bad.yaml", "", ("density.mix[0].image", "bad image file", "classes.unique.distinct")),
    ("GOOD", ", memory: 256MiB", ("density.mix[0].memory", "dump's memory, 128 MiB")),
])
def test_bad_images_in_a_density_mix_end_with_one_line(tmp_path, image, extra, words):
    (tmp_path / "raw.bin").write_bytes(bytes(8192))
    with zipfile.ZipFile(tmp_path / "broken.vmimg", "w") as zf:
        zf.writestr("header.json", "{}")
    (tmp_path / "bad.yaml").write_text("name: bad\nmemory_mib: 128\nclasses:\n"
                                       "  unique: {fraction: 0.5, distinct: 2}\n")
    if image == "GOOD":
        image = str(BUNDLED[0])
    cfg = tmp_path / "d.yaml"
    cfg.write_text(DENSITY.format(image=image, extra=extra))
    one_line_exit_2(vmhost("density", cfg), str(cfg), *words)
