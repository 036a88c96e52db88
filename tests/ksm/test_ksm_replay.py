"""The emulator against the kernel: every trace of the corpus replays to the recorded output.

The ``.kernel.json`` files were recorded by ``vmhost ksm oracle`` on the real
6.18 kernel (tests/reality/test_ksm_oracle_live.py re-records part of them live), so a
difference here is a difference between the emulator and Linux. Each replay
also runs the invariant checker after every step.
"""

import json

import pytest

from vmhost.ksm.replay import replay
from vmhost.ksm.trace import compare_results, load_trace

from helpers import CORPUS
TRACES = sorted(p for p in CORPUS.glob("*.yaml") if p.with_suffix(".kernel.json").exists())


def test_corpus_is_large_enough():
    assert len(TRACES) >= 40


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_replay_matches_kernel(path):
    recorded = json.loads(path.with_suffix(".kernel.json").read_text())
    result = replay(load_trace(path), check_invariants=True)
    assert compare_results(result, recorded) == []
