"""A report: paragraphs, tables and plots in order, written as one directory.

A command builds a :class:`Report` from its result and writes it; the directory then holds
``report.html`` for people (the whole report, offline), ``result.json`` for programs (the result
itself) and one ``<table>.csv`` per table for spreadsheets, and any further text files the
command gives (such as the plain-text ``report.txt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from vmhost.reports.files import atomic_directory, dumps_json, write_csv
from vmhost.reports.model import BarPlot, LinePlot, Table
from vmhost.reports.page import render_page


Plot = LinePlot | BarPlot


class Plots:
    """A report module's plots, in the order they are declared: ``@PLOTS.add`` over a function
    of the result that returns a plot, a list of plots, or None (no plot for this result).
    Adding a plot to a report is writing that one function."""

    def __init__(self):
        self.makers: list[Callable[[dict], Plot | list[Plot] | None]] = []

    def add(self, make: Callable[[dict], Plot | list[Plot] | None]) -> Callable:
        self.makers.append(make)
        return make

    def of(self, res: dict) -> list[Plot]:
        out: list[Plot] = []
        for make in self.makers:
            plot = make(res)
            out.extend(plot if isinstance(plot, list) else [] if plot is None else [plot])
        return out


class Report:
    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.items: list[str | Table | LinePlot | BarPlot] = []

    @classmethod
    def of(cls, title: str, subtitle: str, paragraphs: Iterable[str],
           plots: Iterable[LinePlot | BarPlot], tables: Iterable[Table]) -> "Report":
        """A report in the usual order: the headline paragraphs, the plots, the tables."""
        rep = cls(title, subtitle)
        for p in paragraphs:
            rep.text(p)
        for plot in plots:
            rep.plot(plot)
        for t in tables:
            rep.table(t)
        return rep

    def text(self, paragraph: str) -> None:
        self.items.append(str(paragraph))

    def table(self, table: Table) -> None:
        if not isinstance(table, Table):
            raise TypeError(f"not a Table: {type(table).__name__}")
        if any(isinstance(t, Table) and t.name == table.name for t in self.items):
            raise ValueError(f"two tables named {table.name!r}")
        self.items.append(table)

    def plot(self, plot: LinePlot | BarPlot) -> None:
        if not isinstance(plot, (LinePlot, BarPlot)):
            raise TypeError(f"not a plot: {type(plot).__name__}")
        self.items.append(plot)

    def html(self) -> str:
        return render_page(self.title, self.subtitle, self.items)

    def write(self, directory: str | Path, result: dict, files: dict[str, str] | None = None) -> None:
        """Write the report directory atomically: report.html, result.json, <table>.csv, and
        ``files`` (name -> text)."""
        files = dict(files or {})
        tables = [t for t in self.items if isinstance(t, Table)]
        taken = {"report.html", "result.json"} | {f"{t.name}.csv" for t in tables}
        for name in files:
            if Path(name).name != name or name in ("", ".", "..") or name in taken:
                raise ValueError(f"extra report file {name!r} is not a plain, unused file name")
        page, data = self.html(), dumps_json(result)
        with atomic_directory(directory) as tmp:
            (tmp / "report.html").write_text(page)
            (tmp / "result.json").write_text(data)
            for t in tables:
                write_csv(tmp / f"{t.name}.csv", t)
            for name, text in files.items():
                (tmp / name).write_text(text)
