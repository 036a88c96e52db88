"""The small shared helpers of vmhost/reality that need no root: a process's liveness, where a
run's dumps go, and an oracle command's exit status."""

import os
import subprocess
import sys

from guests.errors import InputError
from vmhost.reality.guard import alive
from vmhost.reality.ksm_oracle import OracleError, outcome
from vmhost.reality.lab import dump_directory


def test_alive_sees_running_zombie_and_reaped_processes():
    assert alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)      # exited, not yet reaped
    assert not alive(child.pid)                                   # a zombie is not alive
    child.wait()
    assert not alive(child.pid)


def test_dump_directory_is_made_or_temporary(tmp_path):
    given, remove = dump_directory(tmp_path / "a" / "b", "unused-")
    assert given == tmp_path / "a" / "b" and given.is_dir()
    remove()
    assert given.is_dir()                                         # the caller's: kept
    temp, remove = dump_directory(None, "vmhost-test-")
    assert temp.is_dir() and temp.name.startswith("vmhost-test-")
    (temp / "g1.elf").write_bytes(b"x")
    remove()
    assert not temp.exists()


def test_outcome_is_the_value_or_one_line_and_a_status(capsys):
    assert outcome("x oracle", lambda: 7) == (7, 0)
    assert capsys.readouterr().err == ""

    def refused():
        raise InputError("t.yaml: steps[0]: bad")

    def failed():
        raise OracleError("ksmd did not answer")

    assert outcome("x oracle", refused) == (None, 2)
    assert capsys.readouterr().err == "t.yaml: steps[0]: bad\n"
    assert outcome("x oracle", failed) == (None, 1)
    assert capsys.readouterr().err == "x oracle: ksmd did not answer\n"
