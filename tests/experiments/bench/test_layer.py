"""The layer section times what it names and reports the timings it measured."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meprop_jax
from experiments.bench import harness, layer
from meprop_jax import optim
from tests.experiments.bench.scripted_timing import ScriptedTiming


def _timed(k, mode, args):
    fn, _ = harness._compile(layer.layer_grad_fn(k, mode), args)
    return [np.asarray(a, np.float64) for a in fn(*args)]


def _data(batch=6, d_in=10, d_out=12):
    return layer.layer_data(batch, d_in, d_out, jnp.float32, seed=3)


def _keep(g, mask):
    return np.where(mask, g, 0.0)


def test_timed_gradients_dense_equals_unified_at_k_out():
    args = _data()
    x, w, _, g = (np.asarray(a, np.float64) for a in args[:4])
    dense = _timed(0, "unified", args)
    np.testing.assert_allclose(dense[0], g @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense[1], x.T @ g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense[2], g.sum(0), rtol=1e-5, atol=1e-5)
    # k = out keeps every column: the unified function must give the dense gradients.
    for got, want in zip(_timed(w.shape[1], "unified", args), dense, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_timed_gradients_are_sparse_meprop_gradients():
    args = _data()
    x, w, _, g = (np.asarray(a, np.float64) for a in args[:4])
    k = 3
    # Unified: the k columns with the largest sum |g| over the batch.
    cols = np.argsort(-np.abs(g).sum(0), kind="stable")[:k]
    mask = np.zeros_like(g, bool)
    mask[:, cols] = True
    dx, dw, db = _timed(k, "unified", args)
    np.testing.assert_allclose(dx, _keep(g, mask) @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.T @ _keep(g, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, g.sum(0), rtol=1e-5, atol=1e-5)
    # Per example: every row keeps its own k largest |g|.
    mask = np.zeros_like(g, bool)
    np.put_along_axis(mask, np.argsort(-np.abs(g), axis=1, kind="stable")[:, :k], True, axis=1)
    dx, dw, _ = _timed(k, "per_example", args)
    np.testing.assert_allclose(dx, _keep(g, mask) @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.T @ _keep(g, mask), rtol=1e-5, atol=1e-5)


def test_timed_random_gradients_keep_k_entries_of_every_row():
    args = _data()
    x, w, _, g = (np.asarray(a, np.float64) for a in args[:4])
    k = 3
    assert np.abs(g).min() > 1e-3  # every kept entry is told apart from a dropped one
    dx, dw, _ = _timed(k, "random", args)
    # x^T has full column rank (batch < in), so dW = x^T g_kept gives g_kept back.
    kept_g = np.linalg.lstsq(x.T, dw, rcond=None)[0]
    kept = np.isclose(kept_g, g, atol=1e-4)
    dropped = np.isclose(kept_g, 0.0, atol=1e-4)
    assert np.all(kept | dropped)
    assert kept.sum(axis=1).tolist() == [k] * g.shape[0]
    # dx uses the same entries; and the random rows do not all pick the same columns.
    np.testing.assert_allclose(dx, _keep(g, kept) @ w.T, rtol=1e-5, atol=1e-5)
    assert len({tuple(np.flatnonzero(row)) for row in kept}) > 1


def _durations(name):
    """Seconds per timed call: dense 6 ms median, forward 2 ms, meProp rows by k and mode."""
    if name == layer.DENSE:
        return [0.009, 0.006, 0.004]
    if name == layer.FORWARD:
        return [0.002, 0.001, 0.005]
    k, mode = name
    base = 1e-4 * k + 1e-3 * layer.DEFAULT_MODES.index(mode.split("+")[0])
    return [3 * base, base, 2 * base + (1e-4 if mode.endswith("+sparse_adam") else 0.0)]


def _check_timings(records):
    dense = [1e3 * s for s in _durations(layer.DENSE)]
    for r in records:
        name = r.mode if r.mode in (layer.DENSE, layer.FORWARD) else (r.k, r.mode)
        want = [1e3 * s for s in _durations(name)]
        assert r.times_ms == pytest.approx(want)
        assert r.median_ms == pytest.approx(statistics.median(want))
        assert r.min_ms == pytest.approx(min(want))
        # Round by round: the median of dense's time over the row's in the same round.
        paired = statistics.median(d / w for d, w in zip(dense, want, strict=True))
        assert r.ratio_vs_dense == pytest.approx(paired)


def test_layer_rows_report_the_times_of_their_own_functions(monkeypatch):
    timing = ScriptedTiming(_durations)
    monkeypatch.setattr(layer, "time_fns", timing)
    batch, d_in, d_out, ks = 6, 10, 12, (3, 5)
    records = layer.bench_layer_shape(
        batch, d_in, d_out, ks, layer.DEFAULT_MODES, repeats=3, warmup=1, seed=3
    )
    names = [(r.k, r.mode) for r in records]
    assert names == [
        (0, "dense"),
        *((k, m) for k in ks for m in layer.DEFAULT_MODES),
        (0, "forward"),
    ]
    _check_timings(records)
    for r in records:
        assert r.extra.get("ideal_speedup") == (d_out / r.k if r.k else None)

    # Each row times its own function: the forward row the forward pass alone (x W + b, about
    # half a dense backward's flops), the dense row the dense gradients.
    x, w, b, g = (np.asarray(a, np.float64) for a in _data()[:4])
    fwd, fwd_args = timing.fns[layer.FORWARD]
    np.testing.assert_allclose(fwd(*fwd_args), x @ w + b, rtol=1e-5, atol=1e-5)
    dense_fn, dense_args = timing.fns[layer.DENSE]
    np.testing.assert_allclose(dense_fn(*dense_args)[1], x.T @ g, rtol=1e-5, atol=1e-5)
    gflop = {r.mode: r.extra["gflop"] for r in records if not r.k}
    matmul = 2 * batch * d_in * d_out / 1e9
    assert matmul <= gflop["forward"] < 1.2 * matmul
    assert 2 * matmul <= gflop["dense"] < 2.4 * matmul


def test_layer_update_rows_report_the_times_of_their_own_functions(monkeypatch):
    timing = ScriptedTiming(_durations)
    monkeypatch.setattr(layer, "time_fns", timing)
    records = layer.bench_layer_update_shape(
        6, 10, 12, (3,), ("unified",), repeats=3, warmup=1, seed=3, paper_speedups={3: 9.9}
    )
    assert [(r.k, r.mode) for r in records] == [
        (0, "dense"),
        (3, "unified+adam"),
        (3, "unified+sparse_adam"),
        (0, "forward"),
    ]
    assert {r.section for r in records} == {"layer+update"}
    _check_timings(records)
    paper = {r.mode: r.extra.get("paper_speedup") for r in records}
    assert paper["unified+sparse_adam"] == 9.9 and paper["unified+adam"] is None
    # The forward row reads the kernel the update rows moved, and returns only x W + b.
    x = np.asarray(_data()[0], np.float64)
    fwd, _ = timing.fns[layer.FORWARD]
    out = np.asarray(fwd(), np.float64)
    assert out.shape == (6, 12)
    assert not np.allclose(out, x @ np.asarray(_data()[1]) + np.asarray(_data()[2]), atol=1e-6)


def test_timed_layer_steps_update_the_selected_columns():
    """After one step from the same state, lazy Adam on the compact gradient and optax Adam
    on the masked dense gradient agree (zero moments move nothing), only k kernel columns
    moved, and dx is the meProp input gradient."""
    k = 3
    x, w, b, g, key = _data()
    params = {"kernel": w, "bias": b}
    dense_fn = layer.layer_step_fn(k, "unified")
    (dense_params, _), dense_dx = jax.jit(dense_fn)(
        (params, optax.adam(1e-3).init(params)), x, g, key
    )
    tap = meprop_jax.compact_tap(w.shape[0], w.shape[1], k=k)
    state = optim.sparse_adam(1e-3).init(params, {"kernel": tap})
    step = jax.jit(layer.layer_compact_step_fn(k, "unified"))
    (sparse_params, _), sparse_dx = step((params, state), x, g, key, tap)
    np.testing.assert_allclose(sparse_dx, dense_dx, rtol=1e-5, atol=1e-6)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(sparse_params[name], dense_params[name], rtol=1e-6, atol=1e-7)
    moved = np.any(np.asarray(sparse_params["kernel"]) != np.asarray(w), axis=0)
    assert moved.sum() == k
