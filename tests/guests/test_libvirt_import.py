"""``vmhost import libvirt``: libvirt host and domains -> host config YAML.

Everything runs against libvirt's own test driver (in-process, no daemon): ``test:///default``
(2 host NUMA cells: 2 GiB with CPUs 0-7, 4 GiB with CPUs 8-15, and one running domain "test")
with domains defined by the tests, and custom node files under tests/libvirt/.
"""

from __future__ import annotations

import os
import subprocess
import sys

import libvirt
import pytest
import yaml

from guests.libvirt_import import (HostCell, LibvirtHost, LibvirtImportError, guest_from_dict,
                                   guest_to_dict, host_config_document, import_host,
                                   parse_capabilities, parse_domain_xml, render_yaml, size_bytes,
                                   unit_scale, write_host_config)
from guests.spec import GuestNumaCell, GuestSpec, MemoryDevice, NumaTune
from vmhost.cli import main
from vmhost.config import parse_host_config

pytestmark = pytest.mark.libvirt

from helpers import ROOT as REPO, TESTS

FIXTURES = TESTS / "libvirt"
GIB = 1 << 30
MIB = 1 << 20

FULL = GuestSpec(
    name="full", memory_mib=4096, current_memory_mib=3072, max_memory_mib=16384,
    max_memory_slots=16, vcpus=4,
    numa_cells=[GuestNumaCell(0, "0-1", 1024), GuestNumaCell(1, "2-3", 1024)],
    numatune=NumaTune("interleave", "0-1", {0: ("strict", "0"), 1: ("preferred", "1")}),
    nosharepages=True, hugepages=True, locked=True,
    memory_devices=[MemoryDevice("dimm", 1024, node=0),
                    MemoryDevice("virtio-mem", 1024, node=1, requested_mib=512, block_mib=2)],
    running=False)

PLAIN = GuestSpec(name="plain", memory_mib=512, current_memory_mib=512, running=False)


def node_uri(name: str) -> str:
    return f"test://{(FIXTURES / name).resolve()}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def default_conn():
    """test:///default (state shared by every connection of this process) with "full"
    defined only and "plain" defined and started; both removed afterwards."""
    conn = libvirt.open("test:///default")
    full = conn.defineXML(fixture("full-domain.xml"))
    plain = conn.defineXML(fixture("plain-domain.xml"))
    plain.create()
    yield conn
    for dom in (plain, full):
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    conn.close()


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("unit, scale", [
    ("b", 1), ("bytes", 1), ("byte", 1), ("k", 1024), ("KiB", 1024), ("kib", 1024),
    ("KB", 1000), ("M", MIB), ("MiB", MIB), ("MB", 10**6), ("G", GIB), ("GiB", GIB),
    ("gb", 10**9), ("T", 1 << 40), ("TiB", 1 << 40), ("TB", 10**12), ("PiB", 1 << 50),
    ("EiB", 1 << 60)])
def test_unit_scale_reads_units_as_libvirt_does(unit, scale):
    assert unit_scale(unit) == scale


def test_size_bytes_default_unit_is_kib_and_rejects_the_rest():
    assert size_bytes("524288", None, "x") == 512 * MIB
    assert size_bytes("2", "GiB", "x") == 2 * GIB
    with pytest.raises(LibvirtImportError, match=r"^f.xml: <memory>: unknown memory unit "
                                                 r"'furlongs'"):
        size_bytes("1", "furlongs", "f.xml: <memory>")
    for bad in ("Kib2", "XiB", "KBB", ""):
        with pytest.raises(LibvirtImportError, match="unknown memory unit"):
            size_bytes("1", bad, "x")
    for text in ("1.5", "-1", "lots", None):
        with pytest.raises(LibvirtImportError, match="is not a whole number"):
            size_bytes(text, "MiB", "x")


# ---------------------------------------------------------------- domain XML


def test_parse_domain_xml_reads_every_field_in_every_unit():
    notes: list[str] = []
    g = parse_domain_xml(fixture("full-domain.xml"), "full-domain.xml", running=False,
                         notes=notes)
    assert g == FULL
    assert notes == []


def test_parse_domain_xml_defaults_and_running_from_the_domain_id():
    g = parse_domain_xml(fixture("plain-domain.xml"))
    assert g == GuestSpec(name="plain", memory_mib=512, running=False)
    assert g.numatune is None and g.numa_cells == [] and g.memory_devices == []
    live = fixture("plain-domain.xml").replace("<domain type='test'>",
                                               "<domain type='test' id='7'>")
    assert parse_domain_xml(live).running is True


def test_parse_domain_xml_unknown_unit_is_one_line_naming_file_element_and_unit():
    with pytest.raises(LibvirtImportError) as exc:
        parse_domain_xml(fixture("unknown-unit-domain.xml"), "unknown-unit-domain.xml")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("unknown-unit-domain.xml: domain 'furlong': <currentMemory>: "
                          "unknown memory unit 'furlongs'")


@pytest.mark.parametrize("xml, message", [
    ("<domain><name>a</name><memory>1024</domain>", "not valid XML"),
    ("<domian><name>a</name></domian>", "<domian>: expected a <domain> element"),
    ("<domain><memory>1024</memory></domain>", "<name>: missing or empty"),
    ("<domain><name>a</name></domain>", "domain 'a': <memory>: missing"),
    ("<domain><name>a</name><memory>lots</memory></domain>", "<memory>: 'lots' is not a whole"),
    ("<domain><name>a</name><memory>1024</memory><currentMemory>2048</currentMemory></domain>",
     "currentMemory must be in"),
    ("<domain><name>a</name><memory>1024</memory><vcpu>two</vcpu></domain>", "<vcpu>"),
    ("<domain><name>a</name><memory>1024</memory><numatune><memory mode='bogus'/></numatune>"
     "</domain>", "<numatune><memory>: mode='bogus'"),
    ("<domain><name>a</name><memory>1024</memory><numatune><memnode cellid='x'/></numatune>"
     "</domain>", "<numatune><memnode>: attribute cellid='x'"),
    ("<domain><name>a</name><memory>1024</memory><cpu><numa><cell id='0' cpus='0-1'/></numa>"
     "</cpu></domain>", "<cpu><numa><cell id='0'> memory: None is not a whole number"),
    ("<domain><name>a</name><memory>1024</memory><devices><memory model='dimm'><target/>"
     "</memory></devices></domain>", "<memory model='dimm'> #0: <target><size>: missing"),
])
def test_parse_domain_xml_bad_input(xml, message):
    with pytest.raises(LibvirtImportError) as exc:
        parse_domain_xml(xml, "d.xml")
    assert message in str(exc.value)
    assert str(exc.value).startswith("d.xml: ")
    assert "\n" not in str(exc.value)


def test_parse_domain_xml_rounds_sizes_up_to_whole_mib_and_says_so():
    notes: list[str] = []
    g = parse_domain_xml("<domain><name>odd</name><memory>1000000</memory>"
                         "<currentMemory unit='MiB'>512</currentMemory></domain>", notes=notes)
    assert (g.memory_mib, g.current_memory_mib) == (977, 512)
    assert notes == ["guest odd: rounded up to whole MiB: <memory> 1000000 KiB -> 977 MiB"]


def test_parse_domain_xml_skips_other_memory_devices_and_notes_shared_memory():
    notes: list[str] = []
    g = parse_domain_xml(
        "<domain><name>s</name><memory unit='GiB'>2</memory><memoryBacking>"
        "<source type='memfd'/><access mode='shared'/></memoryBacking><devices>"
        "<memory model='nvdimm'><target><size unit='GiB'>1</size></target></memory>"
        "<memory model='dimm'><target><size unit='GiB'>1</size></target></memory>"
        "</devices></domain>", notes=notes)
    assert g.memory_devices == [MemoryDevice("dimm", 1024)]
    assert any("access mode='shared'" in n for n in notes)
    assert any("source type='memfd'" in n for n in notes)


# ---------------------------------------------------------------- capabilities


def test_parse_capabilities_with_distances_and_the_document_it_makes():
    cells = parse_capabilities(fixture("capabilities-distances.xml"), "caps.xml")
    assert cells == [HostCell(0, 32654284 * 1024, [0, 2], {0: 10, 1: 21}),
                     HostCell(1, 32 * GIB, [1, 3], {0: 21, 1: 10})]
    host = LibvirtHost("qemu:///system", cells)
    doc = host_config_document(host)
    assert doc["host"] == {"block_size": "128MiB",
                           "nodes": [{"memory": "31872MiB", "cpus": [0, 2]},
                                     {"memory": "32GiB", "cpus": [1, 3]}],
                           "distance": [[10, 21], [21, 10]]}
    assert doc["guests"] == []
    assert host.notes == ["host cell 0: 32654284 KiB rounded down to 31872MiB, a whole number "
                          "of 128MiB blocks"]
    cfg = parse_host_config(doc, "caps.yaml", extra_keys=("guests",))
    assert [n.cpus for n in cfg.topology.nodes] == [(0, 2), (1, 3)]


def test_host_document_small_cells_renumbered_cells_and_bad_distances():
    cells = [HostCell(0, 96 * MIB, [0], {0: 10, 2: 9}), HostCell(2, 64 * MIB, [1], {0: 9, 2: 10})]
    host = LibvirtHost("x", cells)
    doc = host_config_document(host)
    assert doc["host"]["block_size"] == "64MiB"
    assert doc["host"]["nodes"] == [{"memory": "64MiB", "cpus": [0]},
                                    {"memory": "64MiB", "cpus": [1]}]
    assert "distance" not in doc["host"]
    assert any("distance 0->2 is 9" in n for n in host.notes)
    assert any("host cells [0, 2] are nodes 0..1" in n for n in host.notes)
    parse_host_config(doc, "x.yaml", extra_keys=("guests",))
    with pytest.raises(LibvirtImportError, match="cell 0 has 512 KiB of memory"):
        host_config_document(LibvirtHost("x", [HostCell(0, 512 << 10, [0])]))


def test_parse_capabilities_without_cells_is_empty():
    assert parse_capabilities("<capabilities><host><topology><cells num='0'/></topology>"
                              "</host></capabilities>") == []


# ---------------------------------------------------------------- through libvirt


def test_import_host_default_driver_every_field_running_and_defined(default_conn):
    host = import_host("test:///default")
    assert host.cells_from == "getCapabilities()"
    assert [(c.id, c.memory_bytes, c.cpus) for c in host.cells] == [
        (0, 2 * GIB, list(range(8))), (1, 4 * GIB, list(range(8, 16)))]
    by_name = {g.name: g for g in host.guests}
    assert set(by_name) == {"full", "plain", "test"}
    assert by_name["full"] == FULL                 # every field, libvirt's units normalised
    assert by_name["full"].running is False        # defined only
    assert by_name["plain"] == GuestSpec(name="plain", memory_mib=512, current_memory_mib=512,
                                         running=True)
    assert by_name["test"].running is True         # the test driver's own running domain
    assert (by_name["test"].memory_mib, by_name["test"].current_memory_mib) == (8192, 2048)


def test_cli_default_driver_writes_a_loadable_host_config(default_conn, tmp_path, capsys):
    out = tmp_path / "host.yaml"
    assert main(["import", "libvirt", "--uri", "test:///default", "-o", str(out)]) == 0
    assert "3 guest(s) (2 running)" in capsys.readouterr().out
    text = out.read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert header[0].startswith("# vmhost host config imported from libvirt")
    assert "# source: test:///default" in text
    assert "# host nodes: 2 from getCapabilities()" in text
    assert "(2 running, 1 defined only)" in text
    doc = yaml.safe_load(text)
    assert set(doc) == {"host", "guests"}
    assert doc["host"]["nodes"] == [{"memory": "2GiB", "cpus": list(range(8))},
                                    {"memory": "4GiB", "cpus": list(range(8, 16))}]
    cfg = parse_host_config(doc, str(out), extra_keys=("guests",))
    assert [n.mem_bytes for n in cfg.topology.nodes] == [2 * GIB, 4 * GIB]
    cfg.build()
    guests = [guest_from_dict(d, f"guests[{i}]") for i, d in enumerate(doc["guests"])]
    assert {g.name: g for g in guests}["full"] == FULL
    assert guests == import_host("test:///default").guests
    assert os.listdir(tmp_path) == ["host.yaml"]             # no temporary file left behind
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_node_file_falls_back_to_one_node_and_keeps_running_state(tmp_path):
    out = tmp_path / "host.yaml"
    r = run_cli("import", "libvirt", "--uri", node_uri("node.xml"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    text = out.read_text()
    assert "# note: getCapabilities() lists no host NUMA cells, so the host is one node with " \
           "getInfo()'s 8192 MiB and 4 CPUs" in text
    assert "# note: guest odd: rounded up to whole MiB" in text
    doc = yaml.safe_load(text)
    assert doc["host"] == {"block_size": "128MiB", "nodes": [{"memory": "8GiB",
                                                               "cpus": [0, 1, 2, 3]}]}
    parse_host_config(doc, str(out), extra_keys=("guests",))
    guests = {d["name"]: guest_from_dict(d) for d in doc["guests"]}
    assert guests["web1"] == GuestSpec(name="web1", memory_mib=1024, current_memory_mib=768,
                                       vcpus=2, running=True)
    assert guests["odd"].memory_mib == 977 and guests["odd"].running
    assert guests["db"] == GuestSpec(
        name="db", memory_mib=6144, current_memory_mib=6144, max_memory_mib=8192,
        max_memory_slots=4, vcpus=2, numa_cells=[GuestNumaCell(0, "0-1", 2048)],
        numatune=NumaTune("strict", "0"), nosharepages=True, locked=True,
        memory_devices=[MemoryDevice("virtio-mem", 4096, 0, 512, 2)], running=False)


def test_guest_dict_round_trip_and_its_errors():
    for g in (FULL, PLAIN):
        assert guest_from_dict(yaml.safe_load(yaml.safe_dump(guest_to_dict(g)))) == g
    d = guest_to_dict(FULL)
    assert d["numatune"]["memnodes"] == {0: {"mode": "strict", "nodeset": "0"},
                                         1: {"mode": "preferred", "nodeset": "1"}}
    for bad, message in [({**d, "colour": 1}, "guests[3].colour: unknown key"),
                         ({**d, "memory_mib": "4GiB"}, "guests[3].memory_mib: expected a whole"),
                         ({**d, "locked": "yes"}, "guests[3].locked: expected true or false"),
                         ({**d, "current_memory_mib": 9999}, "guests[3]: guest 'full': "
                                                             "currentMemory")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            guest_from_dict(bad, "guests[3]")


def test_render_yaml_header_and_atomic_write(tmp_path):
    host = LibvirtHost("test:///x", [HostCell(0, GIB, [0, 1])], [PLAIN], hostname="h",
                       libvirt_version="9.0.0", cells_from="getInfo()", notes=["hello"])
    out = tmp_path / "h.yaml"
    out.write_text("old\n")
    text = write_host_config(host, out)
    assert out.read_text() == text
    assert text.splitlines()[1] == "# source: test:///x (host h, libvirt 9.0.0)"
    assert "# note: hello" in text
    assert "# note: no distance" not in text                 # a single node needs none
    assert yaml.safe_load(text)["guests"] == [guest_to_dict(PLAIN)]
    assert os.listdir(tmp_path) == ["h.yaml"]
    with pytest.raises(LibvirtImportError, match="cannot write: it is a directory"):
        write_host_config(host, tmp_path)
    assert render_yaml(host).count("# note: hello") == 1


# ---------------------------------------------------------------- bad input through the CLI


def _one_line_exit_2(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vmhost: import libvirt: ")
    return lines[0]


@pytest.mark.parametrize("uri, message", [
    ("nope", "nope: cannot connect: no connection driver available for URI 'nope'"),
    ("bogus:///x", "bogus:///x: cannot connect: "),
    ("test:///no/such/node.xml", "test:///no/such/node.xml: cannot connect: XML error: failed "
                                 "to parse xml document '/no/such/node.xml'"),
])
def test_cli_bad_uri(tmp_path, uri, message):
    out = tmp_path / "host.yaml"
    line = _one_line_exit_2(run_cli("import", "libvirt", "--uri", uri, "-o", str(out)))
    assert message in line
    assert os.listdir(tmp_path) == []


# libvirt parses the node file itself when connecting and refuses a bad one: the error names the
# file, the line and the mismatched tag; an invalid value; an unknown memory unit (libvirt refuses
# it before vmhost sees the XML; vmhost's own parser refuses it too:
# test_parse_domain_xml_unknown_unit_is_one_line_naming_file_element_and_unit)
BAD_NODE_FILES = [
    ("malformed-node.xml", f"cannot connect: {(FIXTURES / 'malformed-node.xml').resolve()}:9: Opening and "
                           "ending tag mismatch: domain line 5 and domian"),
    ("invalid-domain-node.xml", "cannot connect: XML error: Invalid value 'lots' for element or attribute "
                                "'./memory[1]'"),
    ("unknown-unit-node.xml", "unknown-unit-node.xml: cannot connect: invalid argument: unknown suffix "
                              "'furlongs'"),
]


@pytest.mark.parametrize("name, message", BAD_NODE_FILES, ids=[b[0] for b in BAD_NODE_FILES])
def test_cli_bad_node_file(tmp_path, name, message):
    out = tmp_path / "host.yaml"
    line = _one_line_exit_2(run_cli("import", "libvirt", "--uri", node_uri(name), "-o", str(out)))
    assert message in line
    assert os.listdir(tmp_path) == []


def test_cli_output_in_a_missing_directory(tmp_path):
    out = tmp_path / "missing" / "host.yaml"
    line = _one_line_exit_2(run_cli("import", "libvirt", "--uri", node_uri("node.xml"),
                                    "-o", str(out)))
    assert line == f"vmhost: import libvirt: {out}: cannot write: directory " \
                   f"'{out.parent}' does not exist"
    assert os.listdir(tmp_path) == []


def test_cli_error_leaves_an_existing_output_untouched(tmp_path):
    out = tmp_path / "host.yaml"
    out.write_text("keep me\n")
    _one_line_exit_2(run_cli("import", "libvirt", "--uri", node_uri("malformed-node.xml"),
                             "-o", str(out)))
    assert out.read_text() == "keep me\n"
    assert os.listdir(tmp_path) == ["host.yaml"]


def test_cli_missing_uri_is_a_usage_error(tmp_path):
    line = _one_line_exit_2(run_cli("import", "libvirt", "-o", str(tmp_path / "h.yaml")))
    assert "--uri" in line
