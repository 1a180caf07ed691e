"""Tests of experiments.loop.probes: the timing probes' budget and their records."""

import pytest

from experiments.loop import probes
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
    # Epoch 1 also runs each program once untimed; later epochs only time them.
    assert later["probe_s"] < 3 * (
        later["probe_forward_s"] + later["probe_forward_backward_s"] + later["probe_step_s"]
    )
