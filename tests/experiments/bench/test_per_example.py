"""Section ``per_example`` of the benchmarks, on its quick shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import cli
from experiments.bench.per_example import (
    NATIVE_ADAM_DENSE,
    _native_adam_train_scan,
    bench_per_example,
    format_per_example,
)
from experiments.bench.steps import _train_scan
from experiments.common.models import MLP
from experiments.loop import make_optimizer
from meprop_jax._src import native


def test_quick_section_times_every_group_against_its_dense_row():
    records = bench_per_example(quick=True, repeats=1, warmup=0, seed=0)
    groups = {r.section for r in records}
    assert groups == {"layer", "layer+update", "lstm", "mnist", "parser"}
    for group in groups:
        rows = [r for r in records if r.section == group]
        dense = [r for r in rows if r.mode.startswith("dense") and r.mode != NATIVE_ADAM_DENSE]
        assert len(dense) == 1 and dense[0].ratio_vs_dense == 1.0
        assert len(rows) > 1
        assert all(math.isfinite(r.median_ms) and r.median_ms > 0 for r in rows)
    modes = {r.mode for r in records if r.section == "layer"}
    assert any("+compact:out_in" in m and m.endswith("[xla]") for m in modes)
    mnist_modes = {r.mode: r.k for r in records if r.section == "mnist"}
    assert (mnist_modes.get(NATIVE_ADAM_DENSE) == 0) == native.enabled()
    text = format_per_example(records)
    assert len(text.splitlines()) == len(records) + 1


def test_cli_flag_selects_the_section():
    args = cli.parse_args(["--per-example", "--quick"])
    assert args.section == "per_example"


@pytest.mark.skipif(not native.enabled(), reason="native kernels not built")
def test_dense_steps_with_the_native_adam_pass_are_dense_adam_steps():
    """The baseline row ``dense+native_adam:out_in`` trains as dense backprop with optax.adam
    does: the same parameters after 5 steps, to float tolerance."""
    model = MLP(hidden=(24, 16), k=0, num_classes=5, kernel_layout="out_in")
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((5, 4, 12)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 5, (5, 4)), jnp.int32)
    params = model.init(jax.random.key(0), xs[0], False)["params"]
    tx = make_optimizer("adam", 1e-3)
    (expected, _), _ = jax.jit(_train_scan(model, tx))((params, tx.init(params)), xs, ys)
    run, init = _native_adam_train_scan(model, 2)
    (got, _, count, _), _ = jax.jit(run)(init(params), xs, ys)
    assert int(count) == 5
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
