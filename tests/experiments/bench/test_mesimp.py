"""The mesimp section: ratios to the right reference, and each row timing its own model."""

import itertools
import statistics

import jax
import numpy as np
import optax
import pytest

from experiments.bench import mesimp, report
from tests.experiments.bench.scripted_timing import ScriptedTiming

# One scanned step per call and no warm-up: after the run each training row has taken exactly
# REPEATS steps, so the columns its Adam moments touched show which k it trained with.
CFG = mesimp.MeSimpConfig((16, 32, 32, 10), 8, 4, (10, 7), 1, 64, 16)
REPEATS = 3
WIDTHS = (16, 16)  # 10 and 7 survivors padded to a multiple of 16

# Seconds per timed call; training rows are per step (one step per call), decoding per pass.
# Each row's calls follow its reference's round by round (the machine's speed changes alike for
# both), so its ratio is the same in every round.
TRAIN_S, DECODE_S = [0.012, 0.010, 0.011], [0.020, 0.030, 0.025]  # medians 11 and 25 ms


def _like(reference, median_ms):
    return [t * median_ms / (1e3 * statistics.median(reference)) for t in reference]


DURATIONS = {
    "dense": TRAIN_S,  # 11 ms
    "meprop": _like(TRAIN_S, 8),
    "forward": _like(TRAIN_S, 5),  # bound 11 / 5 = 2.2x
    "mesimp": _like(TRAIN_S, 3),  # 11 / 3 = 3.67x, above the target and the bound
    "mesimp:plain": _like(TRAIN_S, 2.5),
    "decode:full": DECODE_S,  # 25
    "decode:padded": _like(DECODE_S, 15),
    "decode:exported": _like(DECODE_S, 11),  # 25 / 11 = 2.27x, below the 2.5x target
}
MEDIAN_MS = {name: 1e3 * statistics.median(s) for name, s in DURATIONS.items()}


@pytest.fixture(scope="module")
def run():
    monkeypatch = pytest.MonkeyPatch()
    timing = ScriptedTiming(DURATIONS.__getitem__)
    monkeypatch.setattr(mesimp, "time_fns", timing)
    try:
        records = mesimp.bench_mesimp(CFG, repeats=REPEATS, warmup=0)
    finally:
        monkeypatch.undo()
    return {r.mode: r for r in records}, timing


def test_config_pads_the_survivors():
    assert CFG.widths == WIDTHS
    assert mesimp.PAPER_CONFIG.widths == (160, 160)
    assert mesimp.PAPER_CONFIG.units == (154, 154) and mesimp.PAPER_CONFIG.k == 160


def test_ratios_compare_training_with_dense_and_decoding_with_the_full_model(run):
    rows, _ = run
    assert list(rows) == list(mesimp.ROWS) == list(DURATIONS)
    for name, r in rows.items():
        assert r.section == "mesimp" and r.median_ms == pytest.approx(MEDIAN_MS[name])
        assert r.times_ms == pytest.approx([1e3 * s for s in DURATIONS[name]])
        train = name in mesimp.TRAIN_ROWS
        reference = "dense" if train else "decode:full"
        assert r.extra["reference"] == reference
        assert r.ratio_vs_dense == pytest.approx(MEDIAN_MS[reference] / MEDIAN_MS[name])
        assert r.batch == (CFG.batch if train else CFG.eval_batch)
    assert rows["mesimp"].ratio_vs_dense == pytest.approx(11 / 3)
    assert rows["decode:exported"].ratio_vs_dense == pytest.approx(25 / 11)
    for r in rows.values():
        if r.mode in mesimp.TRAIN_ROWS:
            assert r.extra["bound"] == pytest.approx(11 / 5)
    assert rows["mesimp"].extra["meets_target"] is True
    assert rows["decode:exported"].extra["meets_target"] is False


def test_table_prints_the_ratios_and_the_verdicts(run):
    rows, _ = run
    table = report.format_mesimp_table(list(rows.values()), REPEATS)
    assert "meSimp step: 3.67x dense (target >= 3.0x: met; meProp's bound" in table
    assert "bound dense / forward 2.20x: beaten)" in table
    assert "decoding: exported 16-10-7-10 2.27x the full model (target >= 2.5x: NOT MET)" in table
    lines = {line.split()[0]: line for line in table.splitlines()[3:11]}
    assert "16-16-16-10 masked" in lines["mesimp"] and "1.00x" in lines["dense"]
    assert "2.20x" in lines["forward"] and "1.67x" in lines["decode:padded"]
    with pytest.raises(ValueError, match="unknown mode 'unified'"):
        report.format_mesimp_table([*rows.values(), rows["dense"].__class__(
            **{**rows["dense"].__dict__, "mode": "unified"})])  # fmt: skip


def _kernels(params):
    return {name: tuple(layer["kernel"].shape) for name, layer in params.items()}


def _shapes(hidden):
    sizes = (16, *hidden, 10)
    names = [f"hidden_{i}" for i in range(len(hidden))] + ["output"]
    return dict(zip(names, itertools.pairwise(sizes), strict=True))


def _adam_mu(opt_state):
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(states) == 1
    return states[0].mu


def _touched_columns(kernel_moment):
    return int(np.sum(np.any(np.asarray(kernel_moment) != 0, axis=0)))


def test_training_rows_train_their_own_models(run):
    rows, timing = run
    state = {}
    for name in ("dense", "meprop", "mesimp", "mesimp:plain"):
        fn, args = timing.fns[name]
        _, state[name] = fn(*args)  # one more step; returns the new state
        assert rows[name].extra["sizes"] == [16, *(WIDTHS if "mesimp" in name else (32, 32)), 10]
    assert _kernels(state["dense"][0]) == _kernels(state["meprop"][0]) == _shapes((32, 32))
    assert _kernels(state["mesimp"][0]) == _kernels(state["mesimp:plain"][0]) == _shapes(WIDTHS)
    # REPEATS + 1 steps of unified meProp touch at most 4k of the 32 columns; dense, all.
    dense_mu, meprop_mu = _adam_mu(state["dense"][1]), _adam_mu(state["meprop"][1])
    assert _touched_columns(meprop_mu["hidden_1"]["kernel"]) <= (REPEATS + 1) * CFG.k
    assert _touched_columns(dense_mu["hidden_1"]["kernel"]) > (REPEATS + 1) * CFG.k
    # The meSimp row trains the masked model and keeps its record: the padding units keep zero
    # weights and moments, and every step adds its batch to the examples counted.
    params, opt_state, record = state["mesimp"]
    for i, units in enumerate(CFG.units):
        layer = f"hidden_{i}"
        assert np.asarray(record[layer]["mask"]).tolist() == [1.0] * units + [0.0] * (16 - units)
        assert int(record[layer]["examples"]) == (REPEATS + 1) * CFG.batch
        assert not np.any(np.asarray(params[layer]["kernel"])[:, units:])
        assert not np.any(np.asarray(_adam_mu(opt_state)[layer]["kernel"])[:, units:])
        assert np.all(np.any(np.asarray(params[layer]["kernel"])[:, :units] != 0, axis=0))
    # hidden_1 and the output read hidden_0's and hidden_1's padding through zero rows.
    assert not np.any(np.asarray(params["hidden_1"]["kernel"])[CFG.units[0] :])
    assert not np.any(np.asarray(params["output"]["kernel"])[CFG.units[1] :])
    assert len(state["mesimp:plain"]) == 2  # (params, opt_state): no record


def test_forward_row_is_the_full_models_loss(run):
    _, timing = run
    fn, (params, xs, ys) = timing.fns["forward"]
    assert _kernels(params) == _shapes((32, 32))
    assert xs.shape == (CFG.steps, CFG.batch, 16) and np.isfinite(float(fn(params, xs, ys)))


def test_decoding_rows_run_the_full_padded_and_exported_models(run):
    _, timing = run
    logits, sizes = {}, {}
    for name in mesimp.DECODE_ROWS:
        fn, (variables, xs) = timing.fns[name]
        assert xs.shape == (CFG.examples // CFG.eval_batch, CFG.eval_batch, 16)
        sizes[name] = _kernels(variables["params"])
        logits[name] = np.asarray(fn(variables, xs))
        assert logits[name].shape == (*xs.shape[:2], 10)
    assert sizes == {
        "decode:full": _shapes((32, 32)),
        "decode:padded": _shapes(WIDTHS),
        "decode:exported": _shapes(CFG.units),
    }
    # The exported model is the padded one without its masked units: the same function.
    np.testing.assert_allclose(logits["decode:exported"], logits["decode:padded"], atol=1e-5)
    assert not np.allclose(logits["decode:full"], logits["decode:exported"], atol=1e-3)
