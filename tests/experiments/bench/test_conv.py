"""The conv section times meProp convolution backwards that are the masked dense ones, and
reports the timings it measured."""

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments.bench import cli, conv, harness
from tests.experiments.bench.scripted_timing import ScriptedTiming
from tests.meprop_jax._src.test_conv import reference_mask

SHAPE = (3, 5, 2, 6)  # batch, size, in, out


def _data():
    return conv.conv_data(*SHAPE, jnp.float32, seed=1)


def _dense_vjp(x, w, b, g):
    """The stock convolution's VJP, independent of meprop_jax."""

    def f(x, w, b):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=conv.DIMENSION_NUMBERS
        ) + b.reshape(1, 1, 1, -1)

    return jax.vjp(f, x, w, b)[1](g)


@pytest.mark.parametrize("mode", ["unified", "per_example", "random"])
def test_timed_gradients_are_the_masked_dense_gradients(mode):
    x, w, b, g, key = _data()
    k = 2
    fn, _ = harness._compile(conv.conv_grad_fn(k, mode), (x, w, b, g, key))
    dx, dw, db = fn(x, w, b, g, key)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, conv.DIMENSION_NUMBERS)
    mask = reference_mask(np.asarray(g), k, mode, 1, key, dn)
    assert 0 < mask.sum() < g.size
    dx_ref, dw_ref, _ = _dense_vjp(x, w, b, jnp.where(mask, g, 0.0))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, g.sum(axis=(0, 1, 2)), rtol=1e-5)  # the bias stays dense
    touched = np.any(np.asarray(dw) != 0, axis=(0, 1, 2))
    if mode == "unified":
        assert touched.sum() == k


def test_timed_dense_backward_and_forward_are_the_stock_convolution():
    x, w, b, g, key = _data()
    dense, _ = harness._compile(conv.conv_grad_fn(0, "unified"), (x, w, b, g, key))
    for got, want in zip(dense(x, w, b, g, key), _dense_vjp(x, w, b, g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    y = conv.conv_forward_fn()(x, w, b)
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv.DIMENSION_NUMBERS)
    np.testing.assert_allclose(y, want + b, rtol=1e-5, atol=1e-5)


def _durations(name):
    """Seconds per timed call: dense 6 ms median, forward 2 ms, meProp rows by k."""
    if name == conv.DENSE:
        return [0.009, 0.006, 0.004]
    if name == conv.FORWARD:
        return [0.002, 0.001, 0.005]
    k, mode = name
    base = 1e-4 * k + (1e-3 if mode == "per_example" else 0.0)
    return [3 * base, base, 2 * base]


def test_conv_rows_report_the_times_of_their_own_functions(monkeypatch):
    timing = ScriptedTiming(_durations)
    monkeypatch.setattr(conv, "time_fns", timing)
    modes = ("unified", "per_example")
    records = conv.bench_conv_shape(*SHAPE, (2, 4), modes, repeats=3, warmup=1, seed=1)
    assert [(r.k, r.mode) for r in records] == [
        (0, "dense"),
        *((k, m) for k in (2, 4) for m in modes),
        (0, "forward"),
    ]
    for r in records:
        name = r.mode if not r.k else (r.k, r.mode)
        want = [1e3 * s for s in _durations(name)]
        assert r.section == "conv" and (r.batch, r.d_in, r.d_out) == (3, 2, 6)
        assert r.extra["spatial"] == [5, 5] and r.extra["kernel"] == [3, 3]
        assert r.times_ms == pytest.approx(want)
        dense = [1e3 * s for s in _durations(conv.DENSE)]
        paired = statistics.median(d / w for d, w in zip(dense, want, strict=True))
        assert r.ratio_vs_dense == pytest.approx(paired)
        assert r.extra.get("ideal_speedup") == (6 / r.k if r.k else None)
    # The dense row timed the dense gradients; a k = 2 unified row touches two channels.
    x, w, b, g, _ = _data()
    dense_fn, args = timing.fns[conv.DENSE]
    np.testing.assert_allclose(dense_fn(*args)[1], _dense_vjp(x, w, b, g)[1], rtol=1e-5, atol=1e-5)
    sparse_fn, args = timing.fns[2, "unified"]
    assert np.any(np.asarray(sparse_fn(*args)[1]) != 0, axis=(0, 1, 2)).sum() == 2


@pytest.mark.slow
def test_quick_conv_run_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "conv.json", tmp_path / "conv.png"
    argv = ["--conv", "--quick", "--modes", "unified", "--repeats", "1", "--warmup", "0"]
    records = cli.main([*argv, "--out", str(out), "--plot", str(plot)])
    _, size, _, c_out, ks = conv.QUICK_CONV_CONFIGS[0]
    assert [(r.k, r.mode) for r in records] == [
        (0, "dense"),
        *((k, "unified") for k in ks),
        (0, "forward"),
    ]
    data = json.loads(out.read_text())
    assert data["args"]["section"] == "conv"
    assert [r["d_out"] for r in data["records"]] == [c_out] * len(records)
    assert plot.read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert "size" in table.splitlines()[1] and f"{size}x{size}" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--conv", "--steps"], "--steps and --conv are separate sections"),
        (["--conv", "--grid", "8x64x48x4"], "--conv times one convolution"),
        (["--conv-grid", "4x6x3x8x2"], "--conv-grid configures --conv"),
        (["--conv", "--conv-grid", "4x6x3x8x8"], "K (8) must be below OUT (8)"),
        (["--conv", "--conv-grid", "4x6x3x8"], "expected BATCHxSIZExINxOUTxK"),
    ],
)
def test_conv_arguments_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_conv_grid_groups_ks_by_shape():
    args = cli.parse_args(["--conv", "--conv-grid", "4x6x3x8x2", "--conv-grid", "4x6x3x8x4"])
    assert args.section == "conv"
    assert conv.conv_configs(args.conv_grid, args.quick) == [(4, 6, 3, 8, (2, 4))]
    assert conv.conv_configs(None, False) == list(conv.CONV_CONFIGS)
