"""Trace v1 model: parsing, content ids, validation messages, result comparison, corpus shape."""

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from any directory

from guests.errors import InputError
from vmhost.ksm.trace import (PROC_FIELDS, SNAPSHOT_FIELDS, Region, Step,
                              compare_results, content_ids, dumps_result, format_result,
                              load_trace, page_bytes)

from helpers import CORPUS
from helpers import DATA

EXAMPLE = """\
version: 1
profile: linux-6.18
knobs:
  max_page_sharing: 256
  use_zero_pages: 0
processes:
  a:
    regions:
      - name: ram
        pages: 1024
        shared: false
        thp: false
      - {name: shm, pages: 8, shared: true}
steps:
  - fill: {proc: a, region: ram, start: 0, count: 512, content: {same: 7}}
  - madvise: {proc: a, region: ram, advice: mergeable}
  - scan: 2
  - fork: {proc: a, child: b}
  - knob: {run: 2, smart_scan: "off"}
  - prctl: {proc: b, merge: true}
  - exit: {proc: a}
  - snapshot: {}
"""


def write(tmp_path, text, name="t.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_parses(tmp_path):
    t = load_trace(write(tmp_path, EXAMPLE))
    assert t.version == 1 and t.profile == "linux-6.18"
    assert t.knobs == [("max_page_sharing", 256), ("use_zero_pages", 0)]
    assert t.processes == {"a": [Region("ram", 1024), Region("shm", 8, shared=True)]}
    assert [s.kind for s in t.steps] == ["fill", "madvise", "scan", "fork", "knob", "prctl",
                                         "exit", "snapshot"]
    assert t.steps[0] == Step(0, "fill", {"proc": "a", "region": "ram", "start": 0,
                                          "count": 512, "content": {"same": 7}})
    # madvise gets its default range filled in
    assert t.steps[1].args == {"proc": "a", "region": "ram", "advice": "mergeable",
                               "start": 0, "count": 1024}
    assert t.steps[2].args == {"count": 2}
    assert list(t.steps[4].args.items()) == [("run", 2), ("smart_scan", "off")]
    assert t.steps[7].args == {}
    assert t.total_pages() == 2 * (1024 + 8)


def test_defaults_and_json(tmp_path):
    doc = {"version": 1, "processes": {"p": {"regions": [{"name": "r", "pages": 4}]}},
           "steps": [{"madvise": {"proc": "p", "region": "r", "advice": "dontneed",
                                  "start": 1}}, {"snapshot": None}]}
    t = load_trace(write(tmp_path, json.dumps(doc), "t.json"))
    assert t.profile == "linux-6.18" and t.knobs == []
    assert t.steps[0].args["start"] == 1 and t.steps[0].args["count"] == 3


def test_content_ids():
    assert content_ids("zero", 3).tolist() == [0, 0, 0]
    assert content_ids({"same": 9}, 2).tolist() == [9, 9]
    assert content_ids({"seq": 10}, 3).tolist() == [10, 11, 12]
    assert content_ids({"unique": 2}, 2).tolist() == [2 * 2**32 + 1, 2 * 2**32 + 2]
    assert content_ids({"cycle": [5, 6, 7]}, 5).tolist() == [5, 6, 7, 5, 6]
    assert content_ids({"same": 2**63 - 1}, 1).dtype == np.uint64


def test_page_bytes():
    data = page_bytes(np.array([0, 0x0102030405060708], dtype=np.uint64))
    assert len(data) == 8192
    assert data[:4096] == bytes(4096)
    assert data[4096:4104] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert data[4096:] == data[4096:4104] * 512


HEAD = """\
version: 1
processes:
  a:
    regions: [{name: ram, pages: 1024}]
steps:
"""

# (steps text, expected pieces of the message): a table of cases, kept as data
BAD_STEPS = [(textwrap.indent(case["steps"], "  "), case["expect"])
             for case in yaml.safe_load((DATA / "bad_trace_steps.yaml").read_text())]


@pytest.mark.parametrize("steps,pieces", BAD_STEPS, ids=[str(i) for i in range(len(BAD_STEPS))])
def test_step_validation(tmp_path, steps, pieces):
    path = write(tmp_path, HEAD + steps)
    with pytest.raises(InputError) as exc:
        load_trace(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    for piece in pieces:
        assert piece in msg, msg


BAD_DOCS = [
    ("version: 2\nprocesses: {}\nsteps: []\n", ["field 'version'", "unsupported version 2"]),
    ("processes: {}\nsteps: []\n", ["field 'version'", "missing"]),
    ("version: 1\nprocesses: {}\n", ["field 'steps'", "missing"]),
    ("version: 1\nprofile: linux-5.4\nprocesses: {}\nsteps: []\n",
     ["field 'profile'", "unknown profile 'linux-5.4'"]),
    ("version: 1\nprocesses: {}\nsteps: []\nextra: 1\n", ["field 'extra'", "unknown field"]),
    ("version: 1\nknobs: {max_page_sharing: 256, foo: 1}\nprocesses: {}\nsteps: []\n",
     ["knobs: field 'foo'", "unknown knob"]),
    ("version: 1\nknobs: [1]\nprocesses: {}\nsteps: []\n", ["knobs", "expected a mapping"]),
    ("version: 1\nprocesses: {a: {regions: [{name: r, pages: 0}]}}\nsteps: []\n",
     ["field 'processes.a.regions[0].pages'", "must be positive"]),
    ("version: 1\nprocesses: {a: {regions: [{name: r, pages: -3}]}}\nsteps: []\n",
     ["field 'processes.a.regions[0].pages'", "must be positive"]),
    ("version: 1\nprocesses: {a: {regions: [{name: r, pages: 1, thp: yes_please}]}}\nsteps: []\n",
     ["field 'processes.a.regions[0].thp'", "expected true or false"]),
    ("version: 1\nprocesses: {a: {regions: [{name: r, pages: 1, size: 3}]}}\nsteps: []\n",
     ["field 'processes.a.regions[0].size'", "unknown field"]),
    ("version: 1\nprocesses: {a: {regions: [{name: r, pages: 1}, {name: r, pages: 2}]}}\n"
     "steps: []\n", ["field 'processes.a.regions[1].name'", "duplicate region name 'r'"]),
    ("version: 1\nprocesses: {a: {regions: [{name: r, pages: 1, prot: exec}]}}\nsteps: []\n",
     ["field 'processes.a.regions[0].prot'", "unknown protection 'exec'"]),
    ("version: 1\nprocesses: {a: {}}\nsteps: []\n", ["field 'processes.a.regions'", "missing"]),
]


@pytest.mark.parametrize("text,pieces", BAD_DOCS, ids=[str(i) for i in range(len(BAD_DOCS))])
def test_document_validation(tmp_path, text, pieces):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        load_trace(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    for piece in pieces:
        assert piece in msg, msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "version: 1\nprocesses: {}\nsteps:\n  - scan: [1\n")
    with pytest.raises(InputError) as exc:
        load_trace(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: line ") and "YAML syntax error" in msg and "\n" not in msg


def test_yaml_duplicate_key(tmp_path):
    path = write(tmp_path, HEAD + "  - knob: {smart_scan: 0, smart_scan: 1}\n")
    with pytest.raises(InputError, match=r"line 6: YAML syntax error: duplicate key 'smart_scan'"):
        load_trace(path)


def test_json_syntax_error(tmp_path):
    path = write(tmp_path, '{"version": 1,\n "steps": [}', "t.json")
    with pytest.raises(InputError, match=r"t\.json: line 2: JSON syntax error"):
        load_trace(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read trace"):
        load_trace(tmp_path / "nope.yaml")


def _result(**over):
    snap = {"step": 2, **{f: 0 for f in SNAPSHOT_FIELDS},
            "procs": {"a": {f: 0 for f in PROC_FIELDS}}}
    snap.update(over)
    return {"version": 1, "engine": "kernel", "profile": "linux-6.18",
            "snapshots": [snap], "errors": []}


def test_compare_results():
    a = _result(pages_sharing=996)
    assert compare_results(a, dict(_result(pages_sharing=996), engine="emulator")) == []
    b = _result(pages_sharing=995)
    assert compare_results(a, b) == ["snapshot 0 (step 2): pages_sharing 996 != 995"]
    c = _result(pages_sharing=996)
    c["snapshots"][0]["procs"]["a"]["ksm_rmap_items"] = 3
    c["snapshots"][0]["procs"]["b"] = {f: 0 for f in PROC_FIELDS}
    assert compare_results(a, c) == ["snapshot 0 (step 2): a.ksm_rmap_items 0 != 3",
                                     "snapshot 0 (step 2): process b only in the second result"]
    d = _result(pages_sharing=996)
    d["snapshots"].append(dict(d["snapshots"][0], step=5))
    d["errors"] = [{"step": 1, "madvise": "mergeable", "errno": "EINVAL"}]
    diffs = compare_results(a, d)
    assert diffs[0] == "snapshot count 1 != 2"
    assert diffs[1].startswith("error only in the second result: ")
    e = _result(step=3, pages_sharing=996)
    assert compare_results(a, e) == ["snapshot 0: step 2 != 3"]


def test_format_and_dump():
    r = _result(pages_sharing=996)
    r["errors"] = [{"step": -1, "knob": "max_page_sharing", "errno": "EINVAL"}]
    text = format_result(r)
    assert "sharing" in text and "996" in text and "knob max_page_sharing" in text
    assert json.loads(dumps_result(r)) == r
    assert json.loads(dumps_result(dict(r, snapshots=[], errors=[])))["snapshots"] == []


# ---------------------------------------------------------------------------------------------
# The recorded corpus


TRACES = sorted(CORPUS.glob("*.yaml"))


def test_corpus_size():
    assert len(TRACES) >= 40


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_corpus_trace_is_documented_and_recorded(path):
    assert path.read_text().startswith("# "), "each trace starts with a comment"
    trace = load_trace(path)
    recorded = json.loads(path.with_suffix(".kernel.json").read_text())
    assert recorded["engine"] == "kernel" and recorded["version"] == 1
    expected_steps = [s.index for s in trace.steps if s.kind in ("scan", "snapshot")]
    assert [s["step"] for s in recorded["snapshots"]] == expected_steps
    for snap in recorded["snapshots"]:
        assert list(snap) == ["step", *SNAPSHOT_FIELDS, "procs"]
