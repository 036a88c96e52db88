"""Differential fuzzing: random KSM traces run in the emulator and in this machine's kernel.

``vmhost ksm fuzz --seed S --count N [--start I] [--out DIR]``: trace ``i`` (``I`` .. ``I+N-1``,
so a long campaign can be resumed or split) is
``vmhost.ksm.fuzz.generate(trace_seed(S, i))``; it is replayed in the emulator (with the
invariant checker after every step) and run by the KSM oracle (``ksm_oracle.run_oracle``,
which takes the shared KSM lock; the campaign keeps the lock for turns of at most 45 s, less
than other users hold it, and gives it up between turns). Where the two results differ:

1. the kernel runs the trace once more; if the kernel does not repeat itself the trace is
   reported as ``kernel_unstable`` and not kept (the corpus only holds reproducible traces);
2. the trace is shrunk (``vmhost.ksm.fuzz.shrink``; every candidate costs a kernel run) to a
   minimal one that still differs;
3. the kernel runs the shrunk trace twice; if both runs agree it is written to ``DIR`` as
   ``fuzz_S_i.yaml`` (a header comment with the seed and the differences) and
   ``fuzz_S_i.kernel.json``, the layout of ``tests/ksm_traces/``.

An exception in the emulator is a finding too (``emulator_errors``); it is shrunk without the
kernel, on "the emulator raises the same exception".

The campaign's summary (counts, every finding, wall time) is returned and, with ``--out``,
written as ``DIR/summary.json`` after every trace (an interrupted campaign keeps its counts).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from guests.errors import InputError
from vmhost.ksm.fuzz import generate, parse, shrink, to_yaml, trace_seed
from vmhost.ksm.replay import replay
from vmhost.ksm.trace import compare_results, dumps_result
from vmhost.reality.ksm_oracle import OracleError, holding_lock, run_oracle

MAX_SHRINK_RUNS = 120     # kernel runs one shrink may use (~1 s each)
BUSY_RETRIES, BUSY_WAIT_S = 30, 2.0    # the oracle itself waits up to 300 s for the lock
TURN_S, GAP_S = 45.0, 0.5


def _emulate(doc: dict, name: str) -> dict:
    return replay(parse(doc, name), check_invariants=True)


class _Turns:
    """The oracle's lock, kept for turns of up to TURN_S (several ~1 s traces each) and given
    up for GAP_S between turns, so that other users of the real KSM get theirs."""

    def __init__(self):
        self._cm = None
        self._since = 0.0

    def take(self) -> None:
        if self._cm is not None and time.monotonic() - self._since > TURN_S:
            self.give_up()
            time.sleep(GAP_S)
        if self._cm is None:
            cm = holding_lock()
            cm.__enter__()              # waits for the lock (InputError after LOCK_TIMEOUT_S)
            self._cm, self._since = cm, time.monotonic()

    def give_up(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


_turns = _Turns()


def _kernel(doc: dict, name: str) -> dict | None:
    """The kernel's result, or None if the oracle could not give one. While another user
    holds the real KSM (the oracle waits up to 300 s for the lock, then refuses), the same
    trace is tried again, up to BUSY_RETRIES times."""
    for attempt in range(BUSY_RETRIES + 1):
        try:
            _turns.take()
            return run_oracle(parse(doc, name))
        except OracleError as exc:
            print(f"ksm fuzz: {name}: oracle: {exc}", file=sys.stderr)
            return None
        except InputError as exc:     # KSM busy: locked, running, or used by a process
            _turns.give_up()
            print(f"ksm fuzz: {name}: {exc}; waiting", file=sys.stderr, flush=True)
            time.sleep(BUSY_WAIT_S)
    return None


def _differs(doc: dict, name: str) -> list[str] | None:
    """The differences emulator vs kernel ([] = agree), None if the oracle failed."""
    kern = _kernel(doc, name)
    if kern is None:
        return None
    return compare_results(_emulate(doc, name), kern)


def _error_kind(doc: dict, name: str) -> str | None:
    try:
        _emulate(doc, name)
    except Exception as exc:  # noqa: BLE001 - a crash of the emulator is what we look for
        return type(exc).__name__
    return None


class Campaign:
    def __init__(self, seed: int, count: int, out: Path | None = None, do_shrink: bool = True,
                 emulator_only: bool = False, log: Callable[[str], None] | None = None,
                 start: int = 0, thp: bool = True):
        self.seed, self.count, self.out, self.start, self.thp = seed, count, out, start, thp
        self.do_shrink, self.emulator_only = do_shrink, emulator_only
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.summary = {"seed": seed, "start": start, "count": count, "thp": thp,
                        "emulator_only": emulator_only,
                        "run": 0, "agreed": 0, "mismatches": [], "kernel_unstable": [],
                        "oracle_errors": [], "emulator_errors": [], "seconds": 0.0}

    def run(self) -> dict:
        t0 = time.monotonic()
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            for n, i in enumerate(range(self.start, self.start + self.count)):
                self.one(i)
                self._progress(n, t0)
        finally:
            _turns.give_up()
        return self.summary

    def _progress(self, i: int, t0: float) -> None:
        s = self.summary
        s["seconds"] = round(time.monotonic() - t0, 1)
        self._save()     # after every trace: an interrupted campaign keeps its counts
        if (i + 1) % 10 == 0 or i + 1 == self.count:
            self.log(f"ksm fuzz: {i + 1}/{self.count} traces, {s['agreed']} agree, "
                     f"{len(s['mismatches'])} differ, {len(s['emulator_errors'])} emulator "
                     f"errors, {len(s['kernel_unstable'])} kernel unstable, "
                     f"{len(s['oracle_errors'])} oracle errors, {s['seconds']:.0f} s")

    def _save(self) -> None:
        if self.out is not None:
            tmp = self.out / "summary.json.part"
            tmp.write_text(json.dumps(self.summary, indent=1) + "\n")
            tmp.replace(self.out / "summary.json")

    def one(self, i: int) -> None:
        s = self.summary
        seed = trace_seed(self.seed, i)
        name = f"fuzz_{self.seed}_{i}"
        doc = generate(seed, self.thp)
        s["run"] += 1
        try:
            emu = _emulate(doc, name)
        except Exception as exc:  # noqa: BLE001
            kind = type(exc).__name__
            small = shrink(doc, lambda d: _error_kind(d, name) == kind) if self.do_shrink else doc
            s["emulator_errors"].append({"trace": i, "seed": seed, "error": f"{kind}: {exc}",
                                         "where": traceback.format_exc().splitlines()[-3].strip(),
                                         "steps": len(doc["steps"]),
                                         "shrunk_steps": len(small["steps"])})
            self._write(name, small, f"emulator raises {kind}: {exc}", None)
            return
        if self.emulator_only:
            s["agreed"] += 1
            return
        kern = _kernel(doc, name)
        if kern is None:
            s["oracle_errors"].append({"trace": i, "seed": seed})
            return
        diffs = compare_results(emu, kern)
        if not diffs:
            s["agreed"] += 1
            return
        again = _kernel(doc, name)
        if again is None or compare_results(kern, again):
            s["kernel_unstable"].append({"trace": i, "seed": seed, "diffs": diffs[:5]})
            return
        small, small_diffs, small_kern = doc, diffs, kern
        if self.do_shrink:
            runs = [0]

            def fails(d):
                if runs[0] >= MAX_SHRINK_RUNS:
                    return False
                runs[0] += 1
                return bool(_differs(d, name))
            small = shrink(doc, fails)
            small_kern = _kernel(small, name)
            check = _kernel(small, name)
            if small_kern is None or check is None or compare_results(small_kern, check):
                small, small_kern = doc, kern   # the small one is not reproducible: keep it whole
            small_diffs = compare_results(_emulate(small, name), small_kern)
            if not small_diffs:
                small, small_kern, small_diffs = doc, kern, diffs
        s["mismatches"].append({"trace": i, "seed": seed, "steps": len(doc["steps"]),
                                "shrunk_steps": len(small["steps"]), "diffs": small_diffs[:8]})
        self._write(name, small, "emulator (first) vs kernel (second):\n"
                    + "\n".join(small_diffs[:8]), small_kern)
        self.log(f"ksm fuzz: {name}: differs ({len(doc['steps'])} steps, shrunk to "
                 f"{len(small['steps'])}): {small_diffs[0]}")

    def _write(self, name: str, doc: dict, what: str, kernel: dict | None) -> None:
        if self.out is None:
            return
        head = (f"Found by vmhost ksm fuzz --seed {self.seed} ({name}), shrunk.\n{what}\n"
                "Before it joins tests/ksm_traces/: say what it checks and where in "
                "ksm-behaviour.md.")
        (self.out / f"{name}.yaml").write_text(to_yaml(doc, head))
        if kernel is not None:
            (self.out / f"{name}.kernel.json").write_text(dumps_result(kernel))


def run_campaign(seed: int, count: int, out: str | None = None, do_shrink: bool = True,
                 emulator_only: bool = False, start: int = 0, thp: bool = True) -> dict:
    """Traces ``start`` .. ``start + count - 1`` of campaign ``seed`` (see the module doc)."""
    return Campaign(seed, count, Path(out) if out else None, do_shrink, emulator_only,
                    start=start, thp=thp).run()
