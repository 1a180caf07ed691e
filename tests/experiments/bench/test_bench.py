"""The layer benchmark runs end to end, and the functions it times compute real gradients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meprop_jax
from experiments.bench import main as bench
from meprop_jax import optim


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


# Whole training steps (--steps) and one layer's backward + update (--with-update): structure
# only; the timings of a tiny quick run mean nothing and are never asserted.


def test_quick_steps_section_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    records = bench.main(["--steps", "--quick", "--out", str(out), "--plot", str(plot)])
    assert plot.is_file() and plot.stat().st_size > 0
    data = json.loads(out.read_text())
    assert data["args"]["section"] == "steps" and len(data["records"]) == len(records)
    ((sizes, batch, k, steps),) = bench.QUICK_STEP_CONFIGS
    modes = {r["mode"]: r for r in data["records"]}
    fwd_bwd = {v + bench.FWD_BWD for v in bench.STEP_VARIANTS}
    assert set(modes) == {*bench.STEP_VARIANTS, *fwd_bwd, "forward"}
    for rec in data["records"]:
        assert rec["section"] == "steps" and rec["batch"] == batch
        assert rec["extra"]["sizes"] == list(sizes) and rec["extra"]["steps_per_call"] == steps
        assert len(rec["times_ms"]) == data["args"]["repeats"] and rec["median_ms"] > 0
        memory = rec["extra"]["memory"]
        assert memory["peak"] > 0 and memory["peak"] == memory["total"] - memory["data"]
    assert modes["dense"]["ratio_vs_dense"] == 1.0 and modes["dense"]["k"] == 0
    assert modes["meprop+sparse"]["k"] == k and modes["meprop+sparse"]["extra"]["update"] == (
        "sparse_adam"
    )
    bound = modes["forward"]["ratio_vs_dense"]
    for variant in bench.STEP_VARIANTS:
        extra = modes[variant]["extra"]
        assert extra["bound"] == pytest.approx(bound)
        assert extra["fraction_of_bound"] == pytest.approx(modes[variant]["ratio_vs_dense"] / bound)
        assert extra["fwd_bwd_ms"] > 0 and extra["update_ms"] >= 0
    assert any("memory (steps" in line for line in data["memory_report"])
    table = bench.format_steps_table(records)
    assert "of bound" in table and "forward (bound)" in table and "meprop+sparse" in table


def test_quick_layer_with_update_section(tmp_path):
    out, plot = tmp_path / "u.json", tmp_path / "u.png"
    argv = ["--quick", "--with-update", "--modes", "unified", "--out", str(out)]
    bench.main([*argv, "--plot", str(plot)])
    assert plot.is_file() and plot.stat().st_size > 0
    data = json.loads(out.read_text())
    seen = {(r["d_out"], r["k"], r["mode"]) for r in data["records"]}
    for _, _, d_out, k in bench.QUICK_GRID:
        assert {(d_out, k, "unified+adam"), (d_out, k, "unified+sparse_adam")} <= seen
        assert {(d_out, 0, "dense"), (d_out, 0, "forward")} <= seen
    for rec in data["records"]:
        assert rec["section"] == "layer+update" and rec["extra"]["memory"]["peak"] > 0
    table = bench.format_table([bench.Record(**r) for r in data["records"]])
    assert "peak MiB" in table.splitlines()[0] and "unified+sparse_adam" in table


def test_timed_layer_steps_update_the_selected_columns():
    """After one step from the same state, lazy Adam on the compact gradient and optax Adam
    on the masked dense gradient agree (zero moments move nothing), only k kernel columns
    moved, and dx is the meProp input gradient."""
    k = 3
    x, w, b, g, key = _data()
    params = {"kernel": w, "bias": b}
    dense_fn = bench.layer_step_fn(k, "unified")
    (dense_params, _), dense_dx = jax.jit(dense_fn)(
        (params, optax.adam(1e-3).init(params)), x, g, key
    )
    tap = meprop_jax.compact_tap(w.shape[0], w.shape[1], k=k)
    state = optim.sparse_adam(1e-3).init(params, {"kernel": tap})
    step = jax.jit(bench.layer_compact_step_fn(k, "unified"))
    (sparse_params, _), sparse_dx = step((params, state), x, g, key, tap)
    np.testing.assert_allclose(sparse_dx, dense_dx, rtol=1e-5, atol=1e-6)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(sparse_params[name], dense_params[name], rtol=1e-6, atol=1e-7)
    moved = np.any(np.asarray(sparse_params["kernel"]) != np.asarray(w), axis=0)
    assert moved.sum() == k


def test_steps_arguments():
    args = bench.parse_args(["--steps", "--mlp", "784-500-500-10:50:30", "--mlp", "8-6-4:2:1:3"])
    assert args.section == "steps" and args.repeats == 7 and args.warmup == 1
    assert args.mlp == [((784, 500, 500, 10), 50, 30, 10), ((8, 6, 4), 2, 1, 3)]
    for bad in (["--mlp", "784-10:50:30"], ["--mlp", "8-6-4:2:6"], ["--mlp", "8-6-4:2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--steps", *bad])
    for bad in (
        ["--steps", "--paper-table7"],
        ["--steps", "--with-update"],
        ["--mlp", "8-6-4:2:1"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_reuse_memory_reruns_under_the_allocator_tunables(tmp_path):
    out = tmp_path / "reuse.json"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench",
            "--quick",
            "--modes",
            "unified",
            "--reuse-memory",
            "--no-progress",
            "--out",
            str(out),
        ],
        check=True,
        cwd=Path(__file__).resolve().parents[3],
        env=env,
        capture_output=True,
    )
    recorded = json.loads(out.read_text())["env"]
    assert recorded["GLIBC_TUNABLES"] == bench.REUSE_MEMORY_TUNABLES
