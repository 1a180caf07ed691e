"""Tests of experiments.loop.probes: the timing probes' budget and their records."""

import pytest

from experiments.loop import probes
from experiments.loop.results import log_epoch
from experiments.loop.task import RunResult


def test_probe_counts_proportional() -> None:
    assert probes.probe_counts([1100], 100) == [100]
    assert probes.probe_counts([40], 100) == [40]
    assert probes.probe_counts([60, 30, 10], 10) == [6, 3, 1]
    assert probes.probe_counts([99, 1], 10) == [10, 1]


@pytest.mark.slow
def test_timing_breakdown_fields(reference: RunResult) -> None:
    for record in reference.history:
        t = record["timing"]
        for field in ("forward_s", "backward_s", "update_s", "train_wall_s", "eval_s"):
            assert isinstance(t[field], float) and t[field] >= 0.0, field
        assert t["probe_steps"] == 3  # 3 of the 9 steps, in proportion: 2 flat + 1 sequence
        assert t["probe_forward_s"] > 0 and t["probe_forward_backward_s"] > 0
        assert t["probe_step_s"] > 0
        # The probes' own wall time covers at least the three timed runs.
        raw = t["probe_forward_s"] + t["probe_forward_backward_s"] + t["probe_step_s"]
        assert t["probe_s"] >= raw
    assert reference.history[0]["timing"]["compile_s"] > 0  # epoch 1 compiles the programs
    later = reference.history[1]["timing"]
    # A probe program gets its untimed warm-up run only in the epoch that compiles it; later
    # epochs compile nothing, so they only time them (checked without a wall-clock bound,
    # which other jobs on the machine would break).
    assert later["compile_s"] == 0


def test_estimates_beyond_the_measured_epoch_are_scaled_to_fit() -> None:
    """The logged case: an epoch of 4.27 s estimated at 0.85 + 2.70 + 4.92 s."""
    raw = {"forward_s": 0.85, "backward_s": 2.70, "update_s": 4.92, "probe_step_s": 0.4}
    t = probes.bound_by_wall(raw, 4.27)
    assert t["forward_s"] + t["backward_s"] + t["update_s"] == pytest.approx(4.27)
    assert t["probe_scale"] == pytest.approx(4.27 / 8.47)
    # One factor for all three: the proportions stay; the raw probe times are kept.
    assert t["backward_s"] / t["forward_s"] == pytest.approx(2.70 / 0.85)
    assert t["update_s"] / t["forward_s"] == pytest.approx(4.92 / 0.85)
    assert t["probe_step_s"] == 0.4
    fits = probes.bound_by_wall(raw, 10.0)
    assert {k: fits[k] for k in raw} == raw and fits["probe_scale"] == 1.0
    assert probes.bound_by_wall(dict(probes.NO_PROBES), 1.0)["probe_scale"] is None


def test_the_log_line_gives_the_estimates_as_part_of_the_measured_time() -> None:
    timing = {"train_wall_s": 4.27, "eval_s": 0.5, "probe_s": 0.3, "compile_s": 0.0}
    timing |= probes.bound_by_wall({"forward_s": 0.85, "backward_s": 2.70, "update_s": 4.92}, 4.27)
    record = {"epoch": 17, "loss": 0.1, "dev_acc": 98.0, "test_acc": 97.9, "timing": timing}
    lines: list[str] = []
    log_epoch(record, 20, lines.append)
    assert (
        "train 4.27s  (of which est. fwd 0.43s bwd 1.36s upd 2.48s, probes scaled to fit)"
        in (lines[0])
    )
    timing |= probes.bound_by_wall({"forward_s": 0.5, "backward_s": 1.0, "update_s": 1.5}, 4.27)
    lines.clear()
    log_epoch(record, 20, lines.append)
    assert "(of which est. fwd 0.50s bwd 1.00s upd 1.50s)" in lines[0]


@pytest.mark.slow
def test_estimates_never_exceed_the_measured_epoch(reference: RunResult) -> None:
    for record in reference.history:
        t = record["timing"]
        assert 0.0 < t["probe_scale"] <= 1.0
        assert t["forward_s"] + t["backward_s"] + t["update_s"] <= t["train_wall_s"] * (1 + 1e-9)
