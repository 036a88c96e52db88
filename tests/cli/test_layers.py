"""The import contract: which layer may import which (README, "Layout").

Every ``import`` of every module is read from its syntax tree, including imports inside
functions (a lazy import is still a dependency); only imports under ``if TYPE_CHECKING:`` are
left out (they exist for annotations, never at run time).

- ``hw`` imports nothing of ours; ``guests`` may import ``hw`` only;
- ``vmhost.mm`` never imports ``vmhost.ksm`` (it calls KSM through ``vmhost.mm.hooks``);
- the emulator (hardware, guests, the host kernel's mm and KSM, the QEMU process model and
  what builds them) never imports the studies, the reports, the reality checks or the CLI;
- the studies and reports never import the CLI, nor the reality checks; the reports never
  import the studies (a study hands its report its result and text).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT
PACKAGES = ("hw", "guests", "vmhost")

EMULATOR = ("hw", "guests", "vmhost.clock", "vmhost.profile", "vmhost.process", "vmhost.host",
            "vmhost.qemu", "vmhost.mm", "vmhost.ksm", "vmhost.policies", "vmhost.config",
            "vmhost.progress", "vmhost.system", "vmhost.footprint")
STUDIES = ("vmhost.density", "vmhost.hostsim", "vmhost.fleet", "vmhost.hotremove")
ABOVE_EMULATOR = STUDIES + ("vmhost.reports", "vmhost.reality", "vmhost.commands", "vmhost.cli",
                            "vmhost.benchmarks")
CLI = ("vmhost.commands", "vmhost.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)   # "from pkg import module"
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            graph[name] = _imports(path, name)
    return graph


GRAPH = _graph()


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...],
                allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{m} imports {dep}" for m, deps in GRAPH.items() if _in(m, importers)
                  for dep in deps if _in(dep, forbidden) and not _in(m, allowed))


def test_the_graph_is_read():
    assert "vmhost.mm.hooks" in GRAPH and "vmhost.ksm.engine" in GRAPH
    assert "vmhost.mm.hooks" in GRAPH["vmhost.ksm.engine"]


@pytest.mark.parametrize("importers, forbidden, allowed", [
    (("hw",), ("guests", "vmhost"), ()),
    (("guests",), ("vmhost",), ()),
    (("vmhost.mm",), ("vmhost.ksm",), ()),
    (EMULATOR, ABOVE_EMULATOR, ()),
    (STUDIES, CLI + ("vmhost.reality", "vmhost.benchmarks"), ()),
    (("vmhost.reports",), CLI + ("vmhost.reality",), ()),
    (("vmhost",), CLI, CLI),
], ids=["hw", "guests", "mm-ksm", "emulator", "studies", "reports", "cli"])
def test_layers(importers, forbidden, allowed):
    assert _violations(importers, forbidden, allowed) == []


#: The README's "Layout" table, bottom up: every import points to its own row or one above it.
LEVELS = (
    ("hw",),
    ("guests",),
    ("vmhost.clock", "vmhost.profile"),
    ("vmhost.mm",),
    ("vmhost.process", "vmhost.host"),
    ("vmhost.ksm",),
    ("vmhost.__init__", "vmhost.qemu", "vmhost.system", "vmhost.policies", "vmhost.config",
     "vmhost.footprint", "vmhost.progress"),
    ("vmhost.reports",),
    STUDIES,
    ("vmhost.reality",),
    ("vmhost.benchmarks",),
    CLI,
)


def _level(module: str) -> int:
    """The row of ``module``: the last row naming it or a package it is in (so that
    ``vmhost.ksm.engine`` is in ksm's row, not in the row of the ``vmhost`` package)."""
    module = "vmhost.__init__" if module == "vmhost" else module    # the package itself, only
    rows = [i for i, row in enumerate(LEVELS) if _in(module, row)]
    assert rows, f"{module} is in no row of the README's Layout table (LEVELS)"
    return max(rows)


def test_a_module_in_no_row_of_the_layout_table_is_named():
    with pytest.raises(AssertionError, match="vmhost.newstudy is in no row"):
        _level("vmhost.newstudy")
    assert _level("vmhost") == _level("vmhost.system") and _level("vmhost.ksm.engine") == 5


def test_every_import_points_down_the_layout_table():
    up = sorted(f"{m} (row {_level(m)}) imports {dep} (row {_level(dep)})"
                for m, deps in GRAPH.items() for dep in deps if _level(dep) > _level(m))
    assert up == []


def test_no_study_and_report_import_each_other():
    """A study may hand its result to its report module; a report never imports a study (the
    layout table's order holds that too; this names the pair when it breaks)."""
    def imports(a: str, b: str) -> bool:
        return any(_in(dep, (b,)) for m, deps in GRAPH.items() if _in(m, (a,)) for dep in deps)
    reports = sorted(m for m in GRAPH if m.startswith("vmhost.reports."))
    studies = sorted(m for m in GRAPH if _in(m, STUDIES))
    both = {(s, r) for s in studies for r in reports if imports(s, r) and imports(r, s)}
    assert both == set()


def test_the_contract_catches_a_lazy_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from vmhost.ksm import engine\n"
                 "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vmhost.density\n")
    assert _imports(p, "vmhost.mm.m") == {"vmhost.ksm", "vmhost.ksm.engine"}
