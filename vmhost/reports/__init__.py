"""Reports: a result as an offline HTML page with plots, JSON for programs and CSV tables.

One job per module: ``model`` (the content: series, tables, plots), ``numbers`` (ticks and
number formatting), ``svg`` (drawing a plot), ``page`` (the HTML page), ``files`` (the atomic
directory, JSON, CSV), ``report`` (:class:`Report`, which ties them together) and one module
per command that builds its report from a result (``density``, ``fleet``, ``hotremove``).
"""

from vmhost.reports.model import BarPlot, LinePlot, Series, Table
from vmhost.reports.report import Report

__all__ = ["BarPlot", "LinePlot", "Report", "Series", "Table"]
