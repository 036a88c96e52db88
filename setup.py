"""Build hook: the KSM engine's compiled code is made when the package is built, not on first use.

Everything else about the package is in pyproject.toml. This file only extends `build_py`:
after the sources are copied into the build tree, `python -m vmhost.ksm.warmup` runs there
once, so numba writes its cache (`__pycache__/*.nbi`, `*.nbc`) beside the built modules and
the wheel carries it. That cache is keyed by one hash of the emulator's sources
(vmhost/ksm/jitcache.py), the Python and numba versions and this CPU, so an install on the
machine that built it (what `pip install .` does) starts with the compiled code; anywhere
else the first run compiles, as it would without this hook. An editable install compiles on first use.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCompiledEngine(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        # `-m` puts the build tree (the working directory) first on sys.path; PYTHONPATH is
        # left alone, since pip's isolated build environment reaches its packages through it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
        for stale in Path(self.build_lib).rglob("*.nb[ic]"):     # from an earlier build
            stale.unlink()
        done = subprocess.run([sys.executable, "-m", "vmhost.ksm.warmup"],
                              cwd=self.build_lib, env=env)
        if done.returncode != 0:
            # Not fatal: the first run compiles instead.
            self.warn("could not compile the KSM engine ahead of time; the first run will")


setup(cmdclass={"build_py": BuildPyWithCompiledEngine})
