"""Differential fuzzing: the trace generator, the shrinker, and a fixed-seed batch on the kernel.

The batch runs generated traces in the emulator and in this machine's KSM (root, Linux 6.18)
and fails on any difference; ``vmhost ksm fuzz --seed S --count N --out DIR`` is the long
campaign, which writes each difference shrunk, in the corpus's layout.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from vmhost.ksm.fuzz import KNOB_CHOICES, generate, parse, shrink, to_yaml, trace_seed
from vmhost.ksm.replay import replay
from vmhost.ksm.trace import CONTENT_KINDS, STEP_KINDS, compare_results, load_trace

from helpers import CORPUS, ROOT
BATCH_SEED, BATCH_COUNT = 2026, 30


def _coverage(docs):
    seen = Counter()
    for doc in docs:
        for name in doc.get("knobs", {}):
            seen["knob " + name] += 1
        for body in doc["processes"].values():
            for r in body["regions"]:
                for opt in ("thp", "shared", "prot"):
                    seen["region " + opt] += opt in r
        for step in doc["steps"]:
            (kind, body), = step.items()
            seen["step " + kind] += 1
            if kind == "fill":
                c = body["content"]
                seen["content " + (c if isinstance(c, str) else next(iter(c)))] += 1
            elif kind == "madvise":
                seen["advice " + body["advice"]] += 1
            elif kind == "knob":
                for name, value in body.items():
                    seen["knob " + name] += 1
                    seen[f"knob {name}={value}"] += 1
            elif kind == "scan":
                seen[f"scan {body}"] += 1
    return seen


def test_generator_is_deterministic_valid_and_covers_the_contract():
    docs = [generate(trace_seed(7, i)) for i in range(300)]
    assert generate(trace_seed(7, 3)) == docs[3]
    assert docs[0] != docs[1]
    for doc in docs:
        trace = parse(doc)
        assert trace is not None
        assert trace.total_pages() <= 4 * 3 * 512
        assert sum(s.args["count"] for s in trace.steps if s.kind == "scan") <= 16
    seen = _coverage(docs)
    missing = [k for k in (["step " + k for k in STEP_KINDS]
                           + ["content " + k for k in CONTENT_KINDS]
                           + ["advice mergeable", "advice unmergeable", "advice dontneed",
                              "region thp", "region shared", "region prot", "knob run=2",
                              "scan 1", "scan 2", "scan 3", "scan 4"]
                           + ["knob " + name for name, _, _ in KNOB_CHOICES])
               if not seen[k]]
    assert missing == []


def test_no_thp_changes_only_the_thp_regions():
    for i in range(100):
        a, b = generate(trace_seed(13, i)), generate(trace_seed(13, i), thp=False)
        for name in a["processes"]:
            for ra, rb in zip(a["processes"][name]["regions"], b["processes"][name]["regions"]):
                assert rb == {k: v for k, v in ra.items() if k != "thp"}
        assert a["steps"] == b["steps"] and a.get("knobs") == b.get("knobs")


def test_prctl_on_is_always_switched_off_before_a_scan_or_fork():
    for i in range(300):
        steps = generate(trace_seed(11, i))["steps"]
        for j, step in enumerate(steps):
            if step.get("prctl", {}).get("merge") is True:
                assert steps[j + 1] == {"prctl": dict(step["prctl"], merge=False)}


def test_yaml_round_trip(tmp_path):
    for i in range(60):
        doc = generate(trace_seed(3, i))
        path = tmp_path / f"t{i}.yaml"
        path.write_text(to_yaml(doc, "a comment\nover two lines"))
        assert path.read_text().startswith("# a comment\n# over two lines\n")
        loaded = load_trace(path)
        expected = parse(doc, str(path))
        assert (loaded.knobs, loaded.processes, loaded.steps) == \
               (expected.knobs, expected.processes, expected.steps)


def test_shrink_finds_a_minimal_trace():
    doc = generate(trace_seed(5, 0))
    doc["steps"] += [{"fork": {"proc": "p0", "child": "kid"}},
                     {"fill": {"proc": "kid", "region": "r0", "start": 0, "count": 1,
                               "content": {"same": 9}}},
                     {"scan": 3}]

    def fails(d):  # "differs" when the child writes value 9 and a scan follows
        steps = d["steps"]
        writes = [i for i, s in enumerate(steps)
                  if s.get("fill", {}).get("proc") == "kid"
                  and s["fill"]["content"] == {"same": 9}]
        return bool(writes) and any("scan" in s for s in steps[writes[0]:])
    small = shrink(doc, fails)
    assert [next(iter(s)) for s in small["steps"]] == ["fork", "fill", "scan"]
    assert small["steps"][2] == {"scan": 1}
    assert list(small["processes"]) == ["p0"] and "knobs" not in small
    assert len(small["processes"]["p0"]["regions"]) == 1


def test_emulator_survives_many_traces():
    # emulator side only, invariant checker after every step (the kernel batch is below)
    for i in range(25):
        replay(parse(generate(trace_seed(99, i))), check_invariants=True)


@pytest.mark.kernel
def test_fixed_seed_batch_against_the_kernel(tmp_path):
    # without THP regions: the kernel does not always find a huge page; the long campaign
    # (vmhost ksm fuzz without --no-thp) covers them
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "vmhost.cli", "ksm", "fuzz", "--seed",
                          str(BATCH_SEED), "--count", str(BATCH_COUNT), "--out", str(tmp_path),
                          "--no-shrink", "--no-thp", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    summary = json.loads(run.stdout)
    assert summary["run"] == BATCH_COUNT
    assert summary["mismatches"] == [] and summary["emulator_errors"] == [], run.stdout
    assert summary["oracle_errors"] == [] and summary["kernel_unstable"] == []
    assert summary["agreed"] == BATCH_COUNT and run.returncode == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_cli_bad_count():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "vmhost.cli", "ksm", "fuzz", "--seed", "1",
                          "--count", "0"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "--count must be positive" in run.stderr


KNOWN_DIR = CORPUS / "known_differences"
KNOWN = sorted(KNOWN_DIR.glob("*.yaml"))


def _known_table() -> set[str]:
    """Trace names in the README's table of known differences."""
    text = (CORPUS / "README.md").read_text()
    section = text.split("### Known differences", 1)[1].split("\n\n| trace | cause |", 1)[1]
    rows = section.split("\n\n", 1)[0].splitlines()[1:]
    return {row.split("|")[1].strip() for row in rows if row.startswith("| ")}


def test_known_differences_are_documented_and_still_differ():
    """Differences the fuzzer found that are not fixed yet, each with its cause in its header
    and a row in the README's table. When one starts to agree, move it (and its .kernel.json)
    into tests/ksm_traces/ and drop its row."""
    assert _known_table() == {p.stem for p in KNOWN}
    for path in KNOWN:
        assert path.read_text().startswith("# KNOWN DIFFERENCE")
        recorded = json.loads(path.with_suffix(".kernel.json").read_text())
        diffs = compare_results(replay(load_trace(path), check_invariants=True), recorded)
        assert diffs, f"{path.name} now agrees with the kernel: move it into the corpus"
