"""The README's Quick start on a machine that has only the main install.

libvirt-python and the docker SDK are extras: the main install must not need them, the commands
that do must name the extra in one line (exit 2), and the fast part of the suite must be
collectable without them. "Without them" is made here by blocking their import in a child
interpreter (``sys.modules[name] = None`` makes ``import name`` fail), on this machine where
they are installed.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

from helpers import ROOT
FAST = "not kernel and not qemu and not libvirt and not docker and not chromium"
BLOCK = "import sys; sys.modules['libvirt'] = None; sys.modules['docker'] = None; "


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_main_install_needs_no_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
             for d in project["dependencies"]}
    assert not names & {"libvirt-python", "docker"}, names
    extras = project["optional-dependencies"]
    assert extras["libvirt"] == ["libvirt-python>=9"] and extras["docker"] == ["docker>=7"]
    assert extras["test"] == ["vmhost[dev,libvirt,docker]"]


def test_missing_extra_is_one_line_naming_it(tmp_path):
    cli = "from vmhost.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "host.yaml"
    r = run_blocked(cli, "import", "libvirt", "--uri", "test:///default", "-o", str(out))
    assert r.returncode == 2 and r.stdout == "" and not out.exists(), r.stderr
    assert r.stderr.count("\n") == 1 and "pip install 'vmhost[libvirt]'" in r.stderr
    assert "libvirt-dev pkg-config" in r.stderr and "Traceback" not in r.stderr
    tool = "import runpy; sys.argv[0] = 'tools/container.py'; runpy.run_path('tools/container.py', run_name='__main__')"
    r = run_blocked(tool, "build", "--context", str(ROOT))
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "pip install '.[docker]'" in r.stderr


def test_fast_part_collects_without_the_extras():
    code = "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    r = run_blocked(code, "--collect-only", "-q", "-p", "no:cacheprovider", "-m", FAST, "tests")
    assert r.returncode == 0, r.stdout[-2000:]
    assert "test_libvirt_import.py" not in r.stdout and "test_container.py" not in r.stdout
    assert "tests/cli/test_quickstart.py::test_fast_part_collects_without_the_extras" in r.stdout
    # and without -m, the same modules are collected (and fail on the missing import), not hidden
    r = run_blocked(code, "--collect-only", "-q", "-p", "no:cacheprovider", "tests/cli/test_container.py")
    assert r.returncode != 0 and "docker" in r.stdout


def test_density_shows_a_line_before_the_first_guest():
    r = subprocess.run([sys.executable, "-m", "vmhost.cli", "density", "configs/density-tiny.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stderr.splitlines()[0]
    assert first.startswith("density: [") and " 0/" in first and "booting guest 1" in first
    assert "VMs per host" in r.stdout


def test_the_wheel_carries_the_compiled_engine(tmp_path):
    """`pip install .` builds a wheel; setup.py compiles the scan loop into it. Unpacked on its
    own, the wheel's code runs every compiled path without compiling (numba says when it saves)."""
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                        "-q", "-w", str(wheels)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("vmhost-*.whl")
    import zipfile
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        names = z.namelist()
    compiled = {Path(n).name.split(".")[0] for n in names if n.endswith(".nbi")}
    cached = {p.stem for p in (ROOT / "vmhost").rglob("*.py") if "@njit(cache=True" in p.read_text()}
    assert cached and cached <= compiled, cached - compiled
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_DEBUG_CACHE"] = "1"
    r = subprocess.run([sys.executable, "-m", "vmhost.ksm.warmup"], cwd=tmp_path / "site",
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[cache] data loaded" in r.stdout + r.stderr
    assert "[cache] data saved" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
