"""Verdicts, statistics over seeds and the numbers read from results.json."""

import math

import pytest

from experiments.report import tables
from experiments.report.tables import DOES_NOT_HOLD, HOLDS, NO_DATA, WITHIN_SPREAD, Stat


@pytest.mark.parametrize(
    ("sign", "diff", "spread", "expected"),
    [
        (1, 0.3, None, HOLDS),
        (1, 0.0, None, HOLDS),
        (-1, -0.2, 0.01, HOLDS),
        (1, -0.1, 0.2, WITHIN_SPREAD),
        (1, -0.1, 0.1, WITHIN_SPREAD),
        (1, -0.3, 0.2, DOES_NOT_HOLD),
        (1, -0.01, None, DOES_NOT_HOLD),  # one seed: no spread to hide in
        (-1, 0.5, 0.2, DOES_NOT_HOLD),
        (1, None, 0.2, NO_DATA),
    ],
)
def test_verdict(sign, diff, spread, expected):
    assert tables.verdict(sign, diff, spread) == expected


def test_claim_sign_follows_the_paper():
    assert tables.claim_sign(0.48) == 1
    assert tables.claim_sign(0.0) == 1  # "no worse"
    assert tables.claim_sign(-0.04) == -1
    assert tables.claim_sign(None) == 1


def test_stat_and_difference():
    a, b = Stat.of([97.0, 97.2, 97.4]), Stat.of([98.0, 98.4])
    assert a.mean == pytest.approx(97.2) and a.std == pytest.approx(0.2) and a.n == 3
    diff, spread = tables.difference(a, b)
    assert diff == pytest.approx(1.0)
    assert spread == pytest.approx(math.hypot(0.2, math.sqrt(0.08)))
    one = Stat.of([98.0, float("nan"), None])
    assert (one.mean, one.std, one.n) == (98.0, None, 1)
    assert tables.difference(a, one) == (pytest.approx(0.8), None)
    assert tables.fmt_stat(a) == "97.20 ± 0.20" and tables.fmt_stat(one) == "98.00"
    assert tables.fmt_stat(Stat.of([])) == "—"


def test_value_reads_the_best_epoch_timings_and_mesimp_sizes():
    results = {
        "best": {"epoch": 3, "dev_uas": 88.0, "test_uas": 87.5},
        "mean_timing": {"forward_s": 1.0, "backward_s": 2.0, "update_s": None},
        "mesimp": {"final_sizes": [150, 160]},
    }
    assert tables.value(results, "test", "uas") == 87.5
    assert tables.value(results, "dev", "uas") == 88.0
    assert tables.value(results, "epoch") == 3
    assert tables.value(results, "bwd") == 2.0 and tables.value(results, "upd") is None
    assert tables.value(results, "size") == 155.0  # no prune logged: the final sizes


def test_mesimp_size_is_the_size_of_the_best_dev_epochs_model():
    def epoch(n, *sizes):
        return {"epoch": n, "events": [{"epoch": n, "prune": 1, "sizes": list(s)} for s in sizes]}

    history = [epoch(1, (400, 300), (300, 250)), epoch(2), epoch(3, (200, 180)), epoch(4)]
    results = {"epochs": history, "mesimp": {"final_sizes": [200, 180]}}
    assert tables.value({**results, "best": {"epoch": 2}}, "size") == 275.0
    assert tables.value({**results, "best": {"epoch": 4}}, "size") == 190.0
    assert tables.value({**results, "best": None}, "size") == 190.0
    assert tables.value({"best": None}, "test") is None
