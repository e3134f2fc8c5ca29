"""bench/choose_review_threshold.py: the rule picks the threshold that flags the most large errors
without flagging more than 30 % of the muscles."""

from __future__ import annotations

import numpy as np
from bench_scripts import load_bench_script

CHOOSE = load_bench_script("choose_review_threshold")


def test_the_rule_stops_at_the_share_of_muscles_it_may_flag():
    # 10 muscles: bad ones at confidence 0.72, 0.78 and 0.88, a good one at 0.87, the rest sure.
    confidence = np.array([0.72, 0.78, 0.88, 0.87, 0.93, 0.93, 0.93, 0.94, 0.94, 0.94])
    errors = np.array([9.0, 7.0, 6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    best, table = CHOOSE.choose(errors, confidence)
    assert best == 0.8  # 0.85 catches no more (a tie: the lowest); 0.9 catches the third but flags 40 %
    row = {r["threshold"]: r for r in table}
    assert row[0.8]["large_flagged"] == 2 and row[0.8]["flagged_share"] == 0.2
    assert row[0.9]["large_flagged"] == 3 and row[0.9]["flagged_share"] == 0.4
    assert row[0.8]["unflagged_max_abs"] == 6.0
    assert (row[0.8]["flagged"], row[0.8]["large"], row[0.8]["flagged_mean_abs"]) == (2, 3, 8.0)


def test_no_threshold_flags_anything_when_every_muscle_is_sure():
    best, table = CHOOSE.choose(np.array([1.0, 6.0]), np.array([0.99, 0.99]))
    assert best == 0.5 and all(r["large_flagged"] == 0 for r in table)  # the lowest on a tie
