"""Fixtures shared by the tests, and the markers that split the suite by what a test needs.

Markers (registered in pyproject.toml): ``kernel`` (this machine's real KSM or memory, as root),
``qemu`` (real QEMU guests), ``libvirt`` (libvirt-python, or a real libvirtd), ``docker`` (a Docker
engine), ``chromium`` (headless Chromium). The full run (scripts/test) has all of them and runs
every test; the fast part runs anywhere vmhost and pytest are installed:

    python3 -m pytest -m "not kernel and not qemu and not libvirt and not docker and not chromium"

A module that imports an optional package at its top (``import libvirt``, ``import docker``) marks
every test it has with ``pytestmark``; when the ``-m`` expression leaves out all of its tests, the
module is not even imported (``pytest_ignore_collect`` below), so the fast part needs no extra.
"""

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from hw.topology import Topology
from vmhost.host import Host
from vmhost.mm import invariants

MIB = 1 << 20


@pytest.fixture
def host():
    """A small one-node host (64 MiB in 4 MiB blocks) on the default profile."""
    return Host(Topology.uniform(1, 64 * MIB), block_pages=1024)


@pytest.fixture
def old_host():
    return Host(Topology.uniform(1, 64 * MIB), block_pages=1024, profile="linux-2.6.33")


def ids(*values):
    return np.array(values, dtype=np.uint64)


@pytest.fixture
def checked():
    """Call checked(host) at the end of a test: the invariant checker must pass."""
    def run(h, before=None):
        invariants.check(h, before)
    return run


def _module_marks(path: Path) -> set[str]:
    """The names in a module's ``pytestmark = pytest.mark.X`` (or a list of them), read without
    importing the module."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return set()
    marks: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            for v in values:
                if isinstance(v, ast.Attribute) and isinstance(v.value, ast.Attribute) \
                        and v.value.attr == "mark":
                    marks.add(v.attr)
    return marks


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    """Leave out a test module none of whose tests the ``-m`` expression selects."""
    expr = config.getoption("markexpr")
    if not expr or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    marks = _module_marks(collection_path)
    if not marks:
        return None
    # a test of the module may carry more marks than the module's: left out only if no test
    # with the module's marks plus any of the registered ones would be selected
    others = sorted({line.split(":")[0].strip() for line in config.getini("markers")} - marks)
    try:
        from _pytest.mark.expression import Expression
        compiled = Expression.compile(expr)
        for bits in range(1 << len(others)):
            have = marks | {m for i, m in enumerate(others) if bits >> i & 1}
            if compiled.evaluate(lambda name, _have=have, **_kw: name in _have):
                return None
    except Exception:                     # noqa: BLE001 - an unknown form: let pytest decide
        return None
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In the full run (scripts/test sets VMHOST_NO_SKIP=1) a skipped test is a failed one: every
    component a test needs exists on the project's machines."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("VMHOST_NO_SKIP") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in the full run (nothing may skip there): {reason}"
