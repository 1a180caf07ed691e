"""The layer benchmark runs end to end, and the functions it times compute real gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench


def test_quick_run_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "b.json", tmp_path / "p.png"
    records = bench.main(["--quick", "--out", str(out), "--plot", str(plot)])
    assert plot.is_file() and plot.stat().st_size > 0
    data = json.loads(out.read_text())
    for key in ("jax_version", "backend", "device_kind", "cpu_count", "date", "args"):
        assert key in data, key
    assert data["args"]["quick"] is True
    assert len(data["records"]) == len(records) > 0
    seen = set()
    for rec in data["records"]:
        assert rec["section"] == "layer"
        assert rec["median_ms"] > 0 and rec["min_ms"] > 0
        assert rec["min_ms"] <= rec["median_ms"]
        assert len(rec["times_ms"]) == data["args"]["repeats"]
        assert all(t > 0 for t in rec["times_ms"])
        assert rec["ratio_vs_dense"] > 0 and np.isfinite(rec["ratio_vs_dense"])
        seen.add((rec["batch"], rec["d_in"], rec["d_out"], rec["k"], rec["mode"]))
    # Every quick configuration is timed in every mode, next to dense and the forward pass.
    for batch, d_in, d_out, k in bench.QUICK_GRID:
        for mode in bench.DEFAULT_MODES:
            assert (batch, d_in, d_out, k, mode) in seen
        assert (batch, d_in, d_out, 0, "dense") in seen
        assert (batch, d_in, d_out, 0, "forward") in seen
    dense = [r for r in data["records"] if r["mode"] == "dense"]
    assert all(r["ratio_vs_dense"] == 1.0 for r in dense)


def test_table_and_grid_parsing():
    args = bench.parse_args(["--grid", "2x3x4x1", "--grid", "2X3X4X2", "--modes", "per-example"])
    assert args.grid == [(2, 3, 4, 1), (2, 3, 4, 2)]
    assert args.modes == ["per_example"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--grid", "2x3x4"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "topk"])
    assert bench.layer_grid(bench.parse_args(["--paper-table7"]))[0] == (1024, 8192, 8192, 8)


def _timed(k, mode, args):
    fn, _ = bench._compile(bench.layer_grad_fn(k, mode), args)
    return [np.asarray(a, np.float64) for a in fn(*args)]


def _data(batch=6, d_in=10, d_out=12):
    return bench.layer_data(batch, d_in, d_out, jnp.float32, seed=3)


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
    gs = np.where(mask, g, 0.0)
    dx, dw, db = _timed(k, "unified", args)
    np.testing.assert_allclose(dx, gs @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.T @ gs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, g.sum(0), rtol=1e-5, atol=1e-5)
    # Per example: every row keeps its own k largest |g|.
    rows = np.argsort(-np.abs(g), axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(g, bool)
    np.put_along_axis(mask, rows, True, axis=1)
    gs = np.where(mask, g, 0.0)
    dx, dw, _ = _timed(k, "per_example", args)
    np.testing.assert_allclose(dx, gs @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.T @ gs, rtol=1e-5, atol=1e-5)
    # Random: dW is x^T (g masked to k entries per row), so at most batch * k columns move.
    dx, dw, _ = _timed(k, "random", args)
    assert np.all(np.isfinite(dx)) and np.count_nonzero(np.abs(dw).sum(0)) <= g.shape[0] * k
    assert np.any(dw != 0)


def test_time_fn_reports_every_call():
    stats = bench.time_fn(jax.jit(lambda a: a + 1.0), (jnp.ones(3),), repeats=4, warmup=1)
    assert len(stats.times_ms) == 4 and 0 < stats.min_ms <= stats.median_ms
    with pytest.raises(ValueError):
        bench.time_fn(lambda: None, (), repeats=0, warmup=0)


def test_paper_table7_plot_and_table(tmp_path):
    # Synthetic records: the --paper-table7 shape itself takes minutes on a CPU.
    batch, d_in, d_out = bench.PAPER_TABLE7_SHAPE
    records = [
        bench.Record("layer", batch, d_in, d_out, 0, "dense", "float32", 300.0, 290.0, [300.0], 1.0)
    ]
    for k, paper in bench.PAPER_TABLE7_SPEEDUP.items():
        ms = 300.0 / (paper / 2)
        extra = {"gflop": 1.0, "ideal_speedup": d_out / k, "paper_speedup": paper}
        records.append(
            bench.Record(
                "layer",
                batch,
                d_in,
                d_out,
                k,
                "unified",
                "float32",
                ms,
                ms,
                [ms],
                300.0 / ms,
                extra,
            )
        )
    table = bench.format_table(records)
    assert "paper" in table.splitlines()[0] and "36.8x" in table
    assert len({len(line) for line in table.splitlines()[:2]}) == 1  # header and rule align
    bench.plot_speedup(tmp_path / "t7.png", records, paper=True)
    assert (tmp_path / "t7.png").stat().st_size > 0
