"""Every loader of user input: duplicate keys and unknown (ignored) fields are one-line errors,
and no input at all -- mutated examples, random documents, random text -- ends in a traceback."""

from __future__ import annotations

import copy
import os
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from guests import dumps, schema
from guests.errors import InputError
from guests.images import ImageError, load_image
from guests.schema import DocumentError, load_json, load_yaml
from vmhost.config import load_config
from vmhost.density import load_density
from vmhost.fleet.config import load_fleet
from vmhost.hotremove import load_scenario
from vmhost.ksm.trace import load_trace

from helpers import DATA, ROOT
CONFIGS = ROOT / "configs"
from helpers import CORPUS
CATALOG = ROOT / "guests" / "catalog"


# ------------------------------------------------------------------------------------------
# the loaders, each with an example document and the error types that are "bad input"

LOADERS = {
    # name: (loader, example file, errors that are one-line diagnostics)
    "host": (load_config, None, (InputError,)),
    "density": (load_density, CONFIGS / "density-tiny.yaml", (InputError,)),
    "fleet": (load_fleet, CONFIGS / "fleet-mixed.yaml", (InputError,)),
    "hotremove": (load_scenario, CONFIGS / "hotremove-ksm.yaml", (InputError,)),
    "trace": (load_trace, CORPUS / "fork_then_cow_both.yaml", (InputError,)),
    "image": (load_image, CATALOG / "linux-server.yaml", (ImageError,)),
}

# a host config with every section: density-tiny.yaml's host with a policy and a guest list
HOST_DOC = {k: v for k, v in yaml.safe_load((CONFIGS / "density-tiny.yaml").read_text()).items()
            if k != "density"}
HOST_DOC["host"]["swap"] = [{"name": "sda", "size": "16MiB", "priority": 10}]
HOST_DOC["policy"] = {"name": "ksmtuned", "interval_s": 10}
HOST_DOC["guests"] = [{"name": "vm1", "memory_mib": 64}]
HOST = yaml.safe_dump(HOST_DOC, sort_keys=False)


def example_text(name: str) -> str:
    path = LOADERS[name][1]
    return HOST if path is None else path.read_text()


def check_one_line(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg and msg.startswith(str(path)), msg


def run_loader(name: str, path: Path):
    loader, _, errors = LOADERS[name]
    try:
        loader(path)
    except errors as exc:
        check_one_line(exc, path)
        return exc
    return None


def test_every_example_loads(tmp_path):
    for name in LOADERS:
        p = tmp_path / f"{name}.yaml"
        p.write_text(example_text(name))
        assert run_loader(name, p) is None, name


# ------------------------------------------------------------------------------------------
# duplicate keys

def _duplicate_first_key(text: str) -> str:
    """The text with its first top-level key written twice (the second copy wins in PyYAML)."""
    lines = text.splitlines()
    i = next(j for j, ln in enumerate(lines) if ln and ln[0].isalpha() and ":" in ln)
    end = next((j for j in range(i + 1, len(lines)) if lines[j] and lines[j][0].isalpha()), len(lines))
    return "\n".join(lines[:end] + lines[i:end] + lines[end:]) + "\n"


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_duplicate_top_level_key(tmp_path, name):
    p = tmp_path / f"{name}.yaml"
    p.write_text(_duplicate_first_key(example_text(name)))
    exc = run_loader(name, p)
    assert exc is not None and "duplicate key" in str(exc) and "line " in str(exc), name


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_duplicate_nested_key(tmp_path, name):
    doc = yaml.safe_load(example_text(name))
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    # the first nested "key: value" line, repeated
    lines = text.splitlines()
    i = next(j for j, ln in enumerate(lines) if ln.startswith("  ") and ln.strip()[0].isalpha()
             and ":" in ln and not ln.rstrip().endswith(":"))
    p = tmp_path / f"{name}.yaml"
    p.write_text("\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]) + "\n")
    exc = run_loader(name, p)
    assert exc is not None and "duplicate key" in str(exc), (name, lines[i])
    assert f"line {i + 2}" in str(exc)


def test_duplicate_key_in_a_json_trace(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{"version": 1, "version": 1, "processes": {}, "steps": []}')
    with pytest.raises(InputError, match="duplicate key 'version'"):
        load_trace(p)


def test_strict_readers():
    with pytest.raises(DocumentError, match=r"^f: line 2: .*duplicate key 'a'"):
        load_yaml("a: 1\na: 2\n", "f")
    with pytest.raises(DocumentError, match="duplicate key 'b'"):
        load_json('{"a": {"b": 1, "b": 2}}', "f")
    assert load_yaml("a: {b: 1, c: 2}\n", "f") == {"a": {"b": 1, "c": 2}}


# ------------------------------------------------------------------------------------------
# unknown (ignored) fields

UNKNOWN = [
    # loader, where the unknown key goes (a path into the document), what the error names
    ("host", ("host",), "host.colour"),
    ("host", ("host", "nodes", 0), "host.nodes[0].colour"),
    ("host", ("host", "swap", 0), "host.swap[0].colour"),
    ("host", ("policy",), "policy.colour"),
    ("host", ("guests", 0), "colour"),
    ("density", ("density",), "density.colour"),
    ("density", ("density", "settle"), "density.settle.colour"),
    ("fleet", ("placement",), "placement.colour"),
    ("fleet", ("inventory", "generate", "mix", 0), "mix[0].colour"),
    ("fleet", ("hosts", 0, "host"), "hosts[0].host.colour"),
    ("hotremove", ("processes", "guest-a", "regions", 0), "regions[0].colour"),
    ("trace", (), "colour"),
    ("image", ("classes", "kernel"), "classes.kernel.colour"),
    ("image", ("classes", "zero", "boot"), "classes.zero.boot.colour"),
    ("image", ("expect",), "expect.colour"),
    ("image", (), "colour"),
]


@pytest.mark.parametrize("name, where, names", UNKNOWN)
def test_unknown_field(tmp_path, name, where, names):
    doc = yaml.safe_load(example_text(name))
    node = doc
    for step in where:
        node = node[step]
    node["colour"] = "blue"
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    exc = run_loader(name, p)
    assert exc is not None and names in str(exc), str(exc)


# ------------------------------------------------------------------------------------------
# bad documents of the loaders that are tables: a table of cases, kept as data

LOADER_OF = {"guests/catalog": "image", "configs/fleet": "fleet", "configs/hotremove": "hotremove"}
BAD_DOCUMENTS = yaml.safe_load((DATA / "bad_loader_documents.yaml").read_text())


@pytest.mark.parametrize("case", BAD_DOCUMENTS, ids=[f"{c['file']}:{c['key']}" for c in BAD_DOCUMENTS])
def test_bad_document_one_line_with_file_key_and_reason(tmp_path, case):
    text = (ROOT / case["file"]).read_text()
    bad = text.replace(case["from"], case["to"], 1)
    assert bad != text, case["from"]
    p = tmp_path / Path(case["file"]).name
    p.write_text(bad)
    name = next(v for k, v in LOADER_OF.items() if case["file"].startswith(k))
    exc = run_loader(name, p)
    assert exc is not None, case
    msg = str(exc)
    assert msg.startswith(f"{p}: {case['key']}") and case["words"] in msg, msg


# ------------------------------------------------------------------------------------------
# guest image files (dumps): header.json

def _dump_image(tmp_path) -> Path:
    pfn = np.arange(4, dtype=np.uint64)
    fp = np.arange(8, dtype=np.uint64).reshape(4, 2)
    zero = np.array([True, False, False, False])
    header = {"format": dumps.IMAGE_FORMAT, "version": dumps.IMAGE_VERSION, "hash": dumps.HASH_NAME,
              "page_size": 4096, "source": {"path": "/x", "format": "raw", "size": 16384,
                                            "sha256_first_mib": "0"},
              "layout": "pc", "low_ram_end": None, "ram": [[0, 4]], "skipped": [], "pages": 4,
              "stats": dumps.sharing_stats(fp, zero)}
    p = tmp_path / "g.img"
    dumps.save_fingerprints(dumps.GuestImage(pfn, fp, zero, header), p)
    return p


def _rewrite_header(src: Path, dst: Path, text: str) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, text.encode() if item.filename == "header.json" else zin.read(item))


def test_dump_image_header(tmp_path):
    p = _dump_image(tmp_path)
    assert dumps.load_fingerprints(p).header["pages"] == 4
    with zipfile.ZipFile(p) as z:
        text = z.read("header.json").decode()
    q = tmp_path / "bad.img"
    _rewrite_header(p, q, text.replace('"layout"', '"colour": 1, "layout"'))
    with pytest.raises(dumps.DumpError, match="field 'colour': unknown field"):
        dumps.load_fingerprints(q)
    _rewrite_header(p, q, text.replace('"layout": "pc"', '"layout": "pc", "layout": "q35"'))
    with pytest.raises(dumps.DumpError, match="duplicate key 'layout'"):
        dumps.load_fingerprints(q)
    _rewrite_header(p, q, text.replace('"pages": 4', '"pages": 5'))
    with pytest.raises(dumps.DumpError, match="'pages'"):
        dumps.load_fingerprints(q)


# ------------------------------------------------------------------------------------------
# the schema's helpers

def test_schema_quantities():
    assert schema.parse_size("1.5GiB", "f", "k") == 3 << 29
    assert schema.parse_duration_ns("200ms", "f", "k") == 200_000_000
    assert schema.expect_fraction("25%", "f", "k") == 0.25
    assert schema.parse_percentage("5%", "f", "k", 0, 100, hi_open=True) == 5.0
    for bad, fn in [("9" * 400 + "GiB", schema.parse_size), (float("inf"), schema.parse_duration_ns),
                    ("0%", schema.expect_fraction), (True, schema.parse_size)]:
        with pytest.raises(InputError, match=r"^f: k: "):
            fn(bad, "f", "k")
    with pytest.raises(InputError, match=r"^f: a\.b: unknown key \(allowed in a: x, y\)"):
        schema.expect_mapping({"x": 1, "b": 2}, "f", "a", ("x", "y"))
    with pytest.raises(InputError, match=r"^f: a\.y: missing"):
        schema.expect_mapping({"x": 1}, "f", "a", ("x", "y"), ("y",))
    with pytest.raises(InputError, match=r"unknown profile 'x' \(known: a, b\)"):
        schema.expect_enum("x", "f", "k", ("a", "b"), "profile")
    with pytest.raises(InputError, match="is not one of a, b"):
        schema.expect_enum(["a"], "f", "k", ("a", "b"))


def test_a_section_table_gives_the_keys_the_defaults_and_the_parse():
    from types import SimpleNamespace

    def twice(value, path, key, obj):
        obj.doubled = 2 * schema.expect_int(value, path, key)

    section = schema.Section(
        schema.rule("seed", schema.expect_int, 0, 9, default=1),
        schema.rule("period", schema.parse_duration_ns, attr="period_ns", required=True),
        schema.rule("size", schema.parse_size),
        schema.rule("n", apply=twice, default=3))
    assert section.names == ("seed", "period", "size", "n") and section.required == ("period",)
    got = section.fill({"period": "2ms"}, "f", "s", SimpleNamespace(size=None))
    assert vars(got) == {"seed": 1, "period_ns": 2_000_000, "size": None, "doubled": 6}
    got = section.fill({"period": 1, "seed": 4, "size": "1KiB", "n": 5}, "f", "s", SimpleNamespace())
    assert vars(got) == {"seed": 4, "period_ns": 10**9, "size": 1024, "doubled": 10}
    for doc, match in [({"period": 1, "bad": 0}, r"^f: s\.bad: unknown key \(allowed in s: seed, period, size, n\)$"),
                       ({}, r"^f: s\.period: missing$"),
                       ({"period": 1, "seed": 10}, r"^f: s\.seed: 10 is out of range \(0\.\.9\)$"),
                       ({"period": 1, "n": "x"}, r"^f: s\.n: expected a whole number")]:
        with pytest.raises(InputError, match=match):
            section.fill(doc, "f", "s", SimpleNamespace())


def test_a_section_of_alternatives_and_a_section_of_its_own():
    from types import SimpleNamespace
    span = schema.Section(schema.rule("pages", schema.expect_int, 1), schema.rule("size", schema.parse_size),
                          one_of=("pages", "size"))
    assert vars(span.fill({"size": "8KiB"}, "f", "r", SimpleNamespace())) == {"size": 8192}
    for doc in ({}, {"pages": 2, "size": "8KiB"}):
        with pytest.raises(InputError, match=r"^f: r: give one of pages, size$"):
            span.fill(doc, "f", "r", SimpleNamespace())
    top = schema.Section(schema.rule("span", schema.expect_section, span, SimpleNamespace, required=True))
    assert vars(top.fill({"span": {"pages": 3}}, "f", "", SimpleNamespace()).span) == {"pages": 3}
    with pytest.raises(InputError, match=r"^f: span\.colour: unknown key"):
        top.fill({"span": {"pages": 3, "colour": 1}}, "f", "", SimpleNamespace())
    # read: the keys of a mapping another table checked (a scenario's beside its host config)
    got = span.read({"pages": 4, "host": {}}, "f", "", SimpleNamespace())
    assert vars(got) == {"pages": 4}


def test_a_null_sub_section_is_empty_and_any_other_non_mapping_is_refused():
    from types import SimpleNamespace
    span = schema.Section(schema.rule("pages", schema.expect_int, 1, default=1))
    assert schema.expect_section(None, "f", "span", span, SimpleNamespace).pages == 1
    for bad in ([], "", 0, False):
        with pytest.raises(InputError, match=r"^f: span: expected a mapping"):
            schema.expect_section(bad, "f", "span", span, SimpleNamespace)
    kept = schema.Section(schema.rule("note"))          # no parser: kept as written
    assert kept.fill({"note": [1, "x"]}, "f", "", SimpleNamespace()).note == [1, "x"]
    with pytest.raises(InputError, match=r"^f: n: too large a number$"):
        schema.expect_number(10 ** 400, "f", "n", 0)


def test_a_bad_image_is_bad_input():
    """ImageError is an InputError, so the CLI's one-line, exit-status-2 handling applies to it."""
    assert issubclass(ImageError, InputError) and issubclass(ImageError, ValueError)


# ------------------------------------------------------------------------------------------
# fuzzing: no input ends in a traceback

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "4GiB", "1MiB", "-1", "-1MiB", "50%", "0%", "150%", "x%", "2s", "0ms",
                     "1e400GiB", "9" * 30 + "TiB", "auto", "linux-6.18", "never", "zero",
                     "mergeable", "ksmtuned", "tiny-linux", "guest1", "a", "ram", ".yaml"]),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(
        ["name", "memory", "pages", "count", "start", "content", "same", "seq", "proc", "region",
         "nodes", "size", "image", "mix", "fraction", "time", "blocks"])), inner, max_size=3)),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data):
    """One random edit: a value replaced, a key deleted or an unknown key added."""
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths[1:] or paths))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if not path:
        return data.draw(VALUES)
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=5))] = data.draw(VALUES)
    else:
        parent[last] = data.draw(VALUES)
    return doc


# CI runs a fixed, fast batch; FUZZ_EXAMPLES=400 FUZZ_RANDOM=1 runs a longer random campaign
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),
                derandomize=not os.environ.get("FUZZ_RANDOM"), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(LOADERS))
@FUZZ
@given(data=st.data())
def test_fuzzed_documents_never_end_in_a_traceback(tmp_path, name, data):
    doc = yaml.safe_load(example_text(name))
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(doc, data)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    run_loader(name, p)


@pytest.mark.parametrize("name", sorted(LOADERS))
@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1"))))
def test_random_text_never_ends_in_a_traceback(tmp_path, name, text):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    run_loader(name, p)


@FUZZ
@given(data=st.data())
def test_fuzzed_json_traces(tmp_path, data):
    doc = _mutate(yaml.safe_load(example_text("trace")), data)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(doc))
    run = LOADERS["trace"][0]
    try:
        run(p)
    except InputError as exc:
        check_one_line(exc, p)


@FUZZ
@given(data=st.data())
def test_fuzzed_dump_headers(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("dump")
    p = _dump_image(tmp)
    with zipfile.ZipFile(p) as z:
        header = json.loads(z.read("header.json"))
    q = tmp / "fuzzed.img"
    if data.draw(st.booleans()):
        _rewrite_header(p, q, json.dumps(_mutate(header, data)))
    else:
        raw = bytearray(p.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        q.write_bytes(bytes(raw))
    try:
        dumps.load_fingerprints(q)
    except dumps.DumpError as exc:
        check_one_line(exc, q)
