"""The command line: bad input gives one line and exit status 2, good input works."""

import json
import subprocess
import sys

import pytest


def vmhost(*args):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, words", [
    (["bench", "rmap", "--children", "-3"], "--children"),
    (["bench", "rmap", "--pages", "0"], "--pages"),
    (["bench", "rmap", "--profile", "linux-9"], "linux-9"),
    (["bench", "rmap", "--pages", "many"], "many"),
    (["frobnicate"], "frobnicate"),
    ([], "required"),
])
def test_bad_input_is_one_line_and_status_2(args, words):
    r = vmhost(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr


def test_bench_rmap_json_keys():
    r = vmhost("bench", "rmap", "--children", "20", "--pages", "10", "--profile", "linux-2.6.33", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("walks", "avg_vmas_per_walk", "max_vmas_per_walk", "total_vmas_visited",
                "peak_rss_bytes", "wall_s"):
        assert key in out
    assert out["walks"] == 210 and out["avg_vmas_per_walk"] == 21.0
