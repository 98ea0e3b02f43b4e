"""Cutoff recommendations against hand-computed examples."""

from __future__ import annotations

import pytest

from scoring.errors import InvalidInput
from scoring.recommend import cutoff_table, for_precision, for_volume

# Ten labelled leads: converted at 90, 80, 70, 40; not at 85, 60, 50, 30, 20, 10.
LABELLED = [
    (90, True),
    (85, False),
    (80, True),
    (70, True),
    (60, False),
    (50, False),
    (40, True),
    (30, False),
    (20, False),
    (10, False),
]
# Volume is counted on every scored lead of the window (here: 4 weeks), labelled or not.
SCORES = [s for s, _ in LABELLED] + [95, 75, 65, 55]


def test_table_by_hand() -> None:
    table = {row.cutoff: row for row in cutoff_table(SCORES, LABELLED, weeks=4)}
    # >= 80: labelled 90 85 80 (2 converted of 3); all leads 95 90 85 80 (4); recall 2/4.
    row = table[80]
    assert (row.labelled, row.converted, row.leads) == (3, 2, 4)
    assert row.precision == pytest.approx(2 / 3)
    assert row.recall == pytest.approx(0.5)
    assert row.weekly_volume == pytest.approx(1.0)
    # >= 70: 90 85 80 70 -> 3 of 4; leads 95 90 85 80 75 70 -> 6
    assert (table[70].precision, table[70].recall, table[70].weekly_volume) == (0.75, 0.75, 1.5)
    # >= 40: 7 labelled, 4 converted; 11 leads
    assert table[40].precision == pytest.approx(4 / 7)
    assert table[40].recall == 1.0
    # 95 is a cutoff with no labelled lead above it
    assert table[95].precision is None
    assert table[95].leads == 1


@pytest.mark.parametrize(
    ("target", "cutoff"),
    # >= 70 and >= 65 both hold 3 converted of 4 labelled (no labelled lead between them): 65 keeps more.
    [(0.75, 65), (0.7, 65), (0.6, 55), (4 / 7, 40), (0.5, 30), (0.4, 10), (1.0, 90), (0.8, 90)],
)
def test_for_precision_takes_the_lowest_cutoff_that_is_precise_enough(target: float, cutoff: float) -> None:
    chosen = for_precision(cutoff_table(SCORES, LABELLED, weeks=4), target)
    assert chosen is not None
    assert chosen.cutoff == cutoff


@pytest.mark.parametrize(("weekly", "cutoff"), [(1.0, 80), (1.5, 70), (1.4, 75), (0.25, 95), (100, 10)])
def test_for_volume_takes_the_lowest_cutoff_within_capacity(weekly: float, cutoff: float) -> None:
    chosen = for_volume(cutoff_table(SCORES, LABELLED, weeks=4), weekly)
    assert chosen is not None
    assert chosen.cutoff == cutoff


def test_unreachable_targets_give_none() -> None:
    table = cutoff_table(SCORES, [(50, False), (40, False)], weeks=1)
    assert for_precision(table, 0.1) is None
    assert for_volume(table, 0.5) is None


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_targets(bad: float) -> None:
    with pytest.raises(InvalidInput):
        for_precision([], bad)
    if bad <= 0:
        with pytest.raises(InvalidInput):
            for_volume([], bad)
    with pytest.raises(InvalidInput):
        cutoff_table([], [], weeks=0)
