"""The steps section reports per-step times, the bound and the update estimate it measured."""

import statistics

import numpy as np
import pytest

from experiments.bench import steps
from tests.experiments.bench.scripted_timing import ScriptedTiming

SIZES, BATCH, K, STEPS = (16, 32, 32, 10), 8, 4, 3

# Seconds per timed call of STEPS scanned steps, and the median of each per step, in ms.
# Every row's calls follow dense's round by round, so a row's ratio is the same in every round.
DENSE_S = [0.036, 0.030, 0.027]  # 10 ms per step


def _like(ms_per_step):
    return [t * ms_per_step / 10.0 for t in DENSE_S]


DURATIONS = {
    "dense": DENSE_S,
    "meprop": _like(7),
    "meprop+sparse": _like(5),
    "meprop+feedback": _like(8),
    "dense:fwd+bwd": _like(8),
    "meprop:fwd+bwd": _like(9),  # above the step, so no update estimate
    "meprop+sparse:fwd+bwd": _like(3),
    "meprop+feedback:fwd+bwd": _like(6),
    "forward": _like(3),
}
PER_STEP_MS = {name: 1e3 * statistics.median(s) / STEPS for name, s in DURATIONS.items()}


@pytest.fixture(scope="module")
def run():
    monkeypatch = pytest.MonkeyPatch()
    timing = ScriptedTiming(DURATIONS.__getitem__)
    monkeypatch.setattr(steps, "time_fns", timing)
    try:
        records = steps.bench_steps_config(SIZES, BATCH, K, STEPS, repeats=3, warmup=1)
    finally:
        monkeypatch.undo()
    return {r.mode: r for r in records}, timing


def test_rows_are_per_step_times_of_their_own_functions(run):
    rows, _ = run
    assert list(rows) == list(DURATIONS)
    for name, r in rows.items():
        assert r.section == "steps" and r.batch == BATCH and r.d_in == 16 and r.d_out == 32
        assert r.times_ms == pytest.approx([1e3 * s / STEPS for s in DURATIONS[name]])
        assert r.median_ms == pytest.approx(PER_STEP_MS[name])
        assert r.min_ms == pytest.approx(1e3 * min(DURATIONS[name]) / STEPS)
        assert r.ratio_vs_dense == pytest.approx(10.0 / PER_STEP_MS[name])
        assert r.k == (0 if name.split(":")[0] in ("dense", "forward") else K)
        assert r.extra["sizes"] == list(SIZES) and r.extra["steps_per_call"] == STEPS


def test_bound_and_update_estimates(run):
    rows, _ = run
    for r in rows.values():
        assert r.extra["bound"] == pytest.approx(10.0 / 3.0)  # dense step / forward
    # A variant's share of the bound is forward time over its step time.
    assert rows["dense"].extra["fraction_of_bound"] == pytest.approx(3 / 10)
    assert rows["meprop"].extra["fraction_of_bound"] == pytest.approx(3 / 7)
    assert rows["meprop+sparse"].extra["fraction_of_bound"] == pytest.approx(3 / 5)
    assert rows["forward"].extra["fraction_of_bound"] == pytest.approx(1.0)
    assert rows["dense"].extra["fwd_bwd_ms"] == pytest.approx(8.0)
    assert rows["dense"].extra["update_ms"] == pytest.approx(2.0)
    assert rows["meprop+sparse"].extra["update_ms"] == pytest.approx(2.0)
    assert rows["meprop"].extra["update_ms"] == 0.0  # noise, not a negative update
    updates = [rows[v].extra["update"] for v in steps.STEP_VARIANTS]
    assert updates == ["adam", "adam", "sparse_adam", "adam"]
    assert "fwd_bwd_ms" not in rows["dense:fwd+bwd"].extra


def test_forward_row_computes_the_loss_alone(run):
    rows, timing = run
    fwd, args = timing.fns["forward"]
    loss = np.asarray(fwd(*args))
    # STEPS summed cross-entropies of 10 classes from a fresh MLP: near STEPS * log(10).
    assert loss.shape == () and 0.5 * STEPS * np.log(10) < loss < 2 * STEPS * np.log(10)
    memory = rows["forward"].extra["memory"]
    assert memory["output"] < 64  # the loss only: no parameters, optimizer state or gradients
    assert rows["dense"].extra["memory"]["output"] > 4 * (16 * 32 + 32 * 32 + 32 * 10)
