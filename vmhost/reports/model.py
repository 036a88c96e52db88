"""What a report holds: series, tables and plots, as plain data checked when they are made.

The report's content is kept apart from how it is drawn (``svg``, ``page``) and written
(``files``), so that a caller builds it from a result without thinking about markup, and a
mistake in that building (a row one cell short, two series of different lengths, a table name
that is no file name) is a ValueError where the caller made it, not a broken page later.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

# a table becomes <name>.csv next to report.html: a plain file name
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def missing(v: Any) -> bool:
    """True for a value a plot cannot place: None, NaN or an infinity."""
    if v is None:
        return True
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        raise ValueError(f"{v!r} is not a number") from None


@dataclass
class Series:
    """A named run of numbers: ``Series(name, xs, ys)`` is a line's points, ``Series(name,
    values)`` a bar plot's values (one per category). None or NaN marks a missing value."""

    name: str
    xs: Sequence
    ys: Sequence | None = None

    def __post_init__(self) -> None:
        self.xs = list(self.xs)
        if self.ys is not None:
            self.ys = list(self.ys)
            if len(self.ys) != len(self.xs):
                raise ValueError(f"series {self.name!r}: {len(self.xs)} xs but {len(self.ys)} ys")

    @property
    def values(self) -> list:
        if self.ys is not None:
            raise ValueError(f"series {self.name!r}: a bar series is Series(name, values), not xs and ys")
        return self.xs

    def points(self) -> list[tuple[float, float] | None]:
        """The line's points in order, None where x or y is missing (the line breaks there)."""
        if self.ys is None:
            raise ValueError(f"series {self.name!r}: a line series needs xs and ys")
        return [None if missing(x) or missing(y) else (float(x), float(y))
                for x, y in zip(self.xs, self.ys)]


@dataclass
class Table:
    """Rows under named columns: shown in the page and written as ``<name>.csv``."""

    name: str
    columns: list[str]
    rows: list[list]

    def __post_init__(self) -> None:
        if not _TABLE_NAME.match(self.name):
            raise ValueError(f"table name {self.name!r} is not a plain file name (letters, digits, _ . -)")
        self.columns = [str(c) for c in self.columns]
        self.rows = [list(r) for r in self.rows]
        for i, r in enumerate(self.rows):
            if len(r) != len(self.columns):
                raise ValueError(f"table {self.name!r} row {i}: {len(r)} cells for {len(self.columns)} columns")


@dataclass
class LinePlot:
    """Lines over a numeric x axis. ``step`` draws each value held until the next x (a counter
    sampled at points); ``hlines`` are labelled horizontal lines such as a capacity. ``note`` is a
    caption under the plot."""

    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    step: bool = False
    hlines: list[tuple[str, float]] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        for s in self.series:
            s.points()          # checks that every series has xs and ys of numbers
        for label, y in self.hlines:
            if missing(y):
                raise ValueError(f"plot {self.title!r}: horizontal line {label!r} has no value")


@dataclass
class BarPlot:
    """Grouped bars: one group per category, one bar per series in each group. ``note`` is a
    caption under the plot."""

    title: str
    y_label: str
    categories: list[str]
    series: list[Series] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        self.categories = [str(c) for c in self.categories]
        for s in self.series:
            if len(s.values) != len(self.categories):
                raise ValueError(f"plot {self.title!r}: series {s.name!r} has {len(s.values)} values "
                                 f"for {len(self.categories)} categories")
            for v in s.values:
                missing(v)      # raises for anything that is not a number or None
