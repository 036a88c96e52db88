"""Axis ticks at round numbers, and numbers written for people.

A reader compares a plot against its axis, so the ticks are the round values one would say out
loud (steps of 1, 2, 2.5 or 5 times a power of ten), the axis spans exactly the first to the
last tick, and an axis of whole things (VMs, guests) never gets a tick between two of them.
Labels carry as many decimals as the step needs and no more; large values get thousands
separators or a k/M/G/T suffix so that they stay short enough for an axis.
"""

from __future__ import annotations

import math

_MANTISSAS = (1.0, 2.0, 2.5, 5.0, 10.0)
_SUFFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"))


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """About ``target`` round ticks from at or below ``lo`` to at or above ``hi``. With
    ``integer`` the step is a whole number (and never 2.5). An empty range is widened around
    its one value (0 becomes 0..1)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"no ticks for the range {lo!r}..{hi!r}")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = (lo, lo + pad) if lo == 0 else (lo - pad, hi + pad)
        if integer:
            lo, hi = math.floor(lo), math.ceil(hi)
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in _MANTISSAS
                if m * mag >= raw * (1 - 1e-9) and not (integer and (m == 2.5 and mag < 10)))
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    d = decimals(step)
    return [round(i * step, d) + 0.0 for i in range(first, last + 1)]


def decimals(step: float) -> int:
    """The fewest decimals that write ``step`` (and so every multiple of it) exactly."""
    for d in range(0, 16):
        if abs(round(step, d) - step) <= abs(step) * 1e-9:
            return d
    return 16


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels for ticks at a regular step: the decimals the step needs; k/M/G/T for millions and
    more (the same suffix on every tick); scientific for the very small."""
    if not ticks:
        return []
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    big = max(abs(t) for t in ticks)
    if 0 < step < 1e-3:
        return [f"{t:.3g}" for t in ticks]
    if big >= 1e15:
        return [f"{t:.3g}" for t in ticks]
    for scale, suffix in _SUFFIXES:
        if big >= scale:
            d = decimals(step / scale)
            return ["0" if t == 0 else f"{t / scale:.{d}f}{suffix}" for t in ticks]
    d = decimals(step)
    return [f"{t:,.{d}f}" for t in ticks]


def fmt(v) -> str:
    """One value for a tooltip or a table cell: about four significant digits, thousands
    separators, ``-`` for a missing value; whole numbers stay whole."""
    if hasattr(v, "item"):          # a numpy scalar: its Python value
        v = v.item()
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "-"
    if f == 0:
        return "0"
    if f.is_integer() and abs(f) < 1e15:
        return f"{int(f):,}"
    a = abs(f)
    if a >= 1e15 or a < 1e-4:
        return f"{f:.3g}"
    if a >= 1000:
        return f"{f:,.0f}"
    return f"{f:.4g}"
