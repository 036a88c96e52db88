"""Writing a report directory: all of it or none of it, JSON and CSV that programs can read.

A report directory is read by people and by scripts, often while a new run is writing the next
one, so it is never seen half-written: everything goes into a temporary directory beside it,
which is renamed into place only when complete (an old directory of the same name is moved
aside first and removed after; on any error the temporary directory is removed and the old
one, if any, is put back).

JSON has no NaN, infinity or numpy types, and strict parsers reject Python's extensions, so
numpy scalars and arrays become plain numbers and lists, and a NaN or infinity becomes null.
CSV cells are written by the csv module: numbers as Python writes them (they read back
exactly), booleans as true/false (as in the JSON), a missing value as an empty cell.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vmhost.reports.model import Table


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory that becomes ``directory`` when the block ends
    without an error (replacing any old one); on an error nothing changes."""
    d = Path(directory)
    parent = d.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=parent))
    try:
        yield tmp
        if not d.exists():
            os.rename(tmp, d)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{d.name}.old.", dir=parent))
        os.rename(d, old / d.name)
        try:
            os.rename(tmp, d)
        except BaseException:
            os.rename(old / d.name, d)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plain(o: Any) -> Any:
    """``o`` with numpy values made Python values, tuples made lists, and NaN/inf made None."""
    if isinstance(o, dict):
        return {(k.item() if isinstance(k, np.generic) else k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return plain(o.tolist())
    if isinstance(o, np.generic):
        return plain(o.item())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def dumps_json(o: Any, *, compact: bool = False) -> str:
    """The one JSON encoder of the project: ``o`` as strict JSON (numpy values plain, NaN and
    infinity null); indented with a final newline for files, or ``compact`` on one line."""
    if compact:
        return json.dumps(plain(o), allow_nan=False)
    return json.dumps(plain(o), indent=2, allow_nan=False) + "\n"


def _cell(v: Any) -> Any:
    v = plain(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else v


def write_csv(path: Path, table: Table) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(table.columns)
        w.writerows([_cell(v) for v in row] for row in table.rows)
