"""Interleaved timing, statistics and XLA's memory figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import harness


def test_time_fns_interleaves_calls_and_times_each_with_the_clock():
    log: list[str] = []
    now = [0.0]
    cost = {"a": [0.003, 0.001, 0.002], "b": [0.010, 0.030, 0.020]}

    def fn(name):
        def call():
            if len(log) >= 2:  # the first two calls are the warm-up ones
                now[0] += cost[name][sum(n == name for n in log[2:])]
            log.append(name)
            return jnp.zeros(())

        return call

    stats = harness.time_fns(
        {"a": (fn("a"), ()), "b": (fn("b"), ())}, repeats=3, warmup=1, clock=lambda: now[0]
    )
    # Warm-up of each first, then one call of each per round: a load change hits both alike.
    assert log == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert stats["a"].times_ms == pytest.approx((3.0, 1.0, 2.0))
    assert stats["a"].median_ms == pytest.approx(2.0) and stats["a"].min_ms == pytest.approx(1.0)
    assert stats["b"].median_ms == pytest.approx(20.0) and stats["b"].min_ms == pytest.approx(10.0)


def test_time_fns_waits_for_every_output():
    class Pending:
        waited = 0

        def block_until_ready(self):
            Pending.waited += 1
            return self

    harness.time_fns({"f": (lambda: (Pending(), [Pending()]), ())}, repeats=2, warmup=1)
    assert Pending.waited == 2 * 3  # two leaves, three calls


def test_time_fn_rejects_bad_counts():
    stats = harness.time_fn(jax.jit(lambda a: a + 1.0), (jnp.ones(3),), repeats=4, warmup=0)
    assert len(stats.times_ms) == 4
    for repeats, warmup in ((0, 0), (1, -1)):
        with pytest.raises(ValueError, match="repeats >= 1"):
            harness.time_fn(lambda: None, (), repeats=repeats, warmup=warmup)


def test_paired_ratio_follows_the_rounds_when_the_machine_changes_speed():
    # The machine runs twice as slowly from the fourth round on, and a row's last call falls
    # in a fast stretch again. Round by round the row is 1.25x faster; the medians would set
    # dense's slow rounds against the row's fast ones and say 2.5x.
    dense = harness.Stats.from_seconds([0.010, 0.010, 0.010, 0.020, 0.020, 0.020, 0.020])
    row = harness.Stats.from_seconds([0.008, 0.008, 0.008, 0.016, 0.016, 0.016, 0.008])
    assert dense.median_ms / row.median_ms == pytest.approx(2.5)
    assert harness.paired_ratio(dense, row) == pytest.approx(1.25)
    assert harness.paired_ratio(dense, dense) == pytest.approx(1.0)
    # Timings not taken together (different counts) fall back to the medians.
    assert harness.paired_ratio(dense, harness.Stats.from_seconds([0.005])) == pytest.approx(4.0)


def test_stats_from_seconds():
    stats = harness.Stats.from_seconds([0.004, 0.001, 0.002, 0.010])
    assert stats.median_ms == pytest.approx(3.0) and stats.min_ms == pytest.approx(1.0)
    assert stats.times_ms == pytest.approx((4.0, 1.0, 2.0, 10.0))


def test_memory_stats_of_a_donated_program():
    state = jnp.ones((256,), jnp.float32)
    batch = jnp.ones((64,), jnp.float32)

    def step(s, x):
        return s + x.sum(), x * 2.0

    donated = harness.memory_stats(harness._compile_donated(step, (state, batch)), batch.nbytes)
    plain = harness.memory_stats(jax.jit(step).lower(state, batch).compile(), batch.nbytes)
    # The donated state is aliased to the new one: counted once, where a plain program holds
    # both (the batch, read by every variant alike, is left out of the peak).
    assert donated["alias"] == state.nbytes and plain["alias"] == 0
    assert donated["argument"] == plain["argument"] == state.nbytes + batch.nbytes
    assert donated["data"] == batch.nbytes
    assert plain["peak"] - donated["peak"] == state.nbytes + plain["temp"] - donated["temp"]
    assert donated["peak"] >= state.nbytes + batch.nbytes  # the new state and x * 2


def test_memory_stats_without_an_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    assert harness.memory_stats(NoAnalysis()) == {}
    assert np.isnan(harness._flops(NoAnalysis()))


def test_carry_hands_the_donated_state_on_and_live_reads_it_anew():
    box = harness.Carry(jnp.zeros(3))
    step = harness._compile_donated(lambda s, d: (s + d, s.sum()), (box.value, jnp.ones(3)))
    call = box.stepper(step, jnp.ones(3))
    outs = [float(call()) for _ in range(3)]
    assert outs == [0.0, 3.0, 6.0]
    np.testing.assert_array_equal(box.value, [3.0, 3.0, 3.0])
    read = harness.Carry(None).stepper(lambda s, v: (s, v), harness.Live(lambda: box.value))
    np.testing.assert_array_equal(read(), [3.0, 3.0, 3.0])
