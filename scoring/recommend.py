"""Score cutoffs from outcomes: which MQL line reaches a target precision or a weekly volume.

Inputs are plain numbers: ``scores``, the score of every lead in the window (what the volume is
counted on), ``labelled``, ``(score, converted)`` for the leads whose outcome is known (what
precision and recall are counted on), and ``weeks``, the window's length in weeks.

At a cutoff ``c`` (a lead qualifies when its score is ``>= c``):

* ``precision = converted qualifying / labelled qualifying`` (``None`` with no labelled lead above);
* ``recall = converted qualifying / converted`` (``None`` with no converted lead at all);
* ``weekly_volume = qualifying leads / weeks``.

:func:`for_precision` picks the **lowest** cutoff whose precision reaches the target (so the most
converting leads are kept among the cutoffs that are precise enough); :func:`for_volume` picks the
lowest cutoff whose weekly volume does not exceed the target. Candidate cutoffs are the distinct
scores seen, so every figure is exactly what that line would have given on this data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scoring.errors import InvalidInput

__all__ = ["CutoffStats", "cutoff_table", "for_precision", "for_volume"]


@dataclass(frozen=True)
class CutoffStats:
    """The figures of one cutoff (see the module docstring)."""

    cutoff: float
    precision: float | None
    recall: float | None
    weekly_volume: float
    leads: int
    labelled: int
    converted: int


def cutoff_table(scores: Sequence[float], labelled: Sequence[tuple[float, bool]], *, weeks: float) -> list[CutoffStats]:
    """Every candidate cutoff, highest first. ``weeks`` must be positive."""
    if not weeks > 0:
        raise InvalidInput(f"weeks must be positive, got {weeks!r}")
    candidates = sorted({*scores, *(score for score, _ in labelled)}, reverse=True)
    volume = sorted(scores, reverse=True)
    outcomes = sorted(labelled, key=lambda pair: pair[0], reverse=True)
    total_converted = sum(1 for _, converted in labelled if converted)
    table: list[CutoffStats] = []
    v = o = converted = 0
    for cutoff in candidates:
        while v < len(volume) and volume[v] >= cutoff:
            v += 1
        while o < len(outcomes) and outcomes[o][0] >= cutoff:
            converted += outcomes[o][1]
            o += 1
        table.append(
            CutoffStats(
                cutoff=cutoff,
                precision=converted / o if o else None,
                recall=converted / total_converted if total_converted else None,
                weekly_volume=v / weeks,
                leads=v,
                labelled=o,
                converted=converted,
            )
        )
    return table


def for_precision(table: Sequence[CutoffStats], target: float) -> CutoffStats | None:
    """The lowest cutoff of ``table`` whose precision is at least ``target`` (0-1), or ``None``."""
    if not 0 < target <= 1:
        raise InvalidInput(f"target precision must be in (0, 1], got {target!r}")
    chosen = None
    for row in table:
        if row.precision is not None and row.precision >= target:
            chosen = row if chosen is None or row.cutoff < chosen.cutoff else chosen
    return chosen


def for_volume(table: Sequence[CutoffStats], weekly_volume: float) -> CutoffStats | None:
    """The lowest cutoff of ``table`` whose weekly volume is at most ``weekly_volume``, or ``None``."""
    if not weekly_volume > 0:
        raise InvalidInput(f"weekly volume must be positive, got {weekly_volume!r}")
    chosen = None
    for row in table:
        if row.weekly_volume <= weekly_volume and (chosen is None or row.cutoff < chosen.cutoff):
            chosen = row
    return chosen
