"""The transformer section: a timed meProp step that updates k columns, its quick run and flags."""

import json
import statistics

import jax
import numpy as np
import pytest

from experiments import loop
from experiments.bench import cli, harness, transformer
from tests.experiments.bench.test_cli import _usage_error


def _changed_columns(before, after) -> int:
    """Output columns of a kernel ``[in, ...out]`` that the step changed."""
    diff = np.asarray(after) != np.asarray(before)
    return int(np.sum(np.any(diff.reshape(diff.shape[0], -1), axis=0)))


def test_timed_meprop_step_updates_k_columns_and_dense_all():
    """One Adam step from fresh moments moves a parameter only where its gradient is nonzero:
    the meProp step changes at most k columns of every converted kernel, the dense step all."""
    batch, length, d, k = 2, 8, 64, 8
    model = transformer.block(d)
    x, y, mask, params = transformer.block_data(batch, length, d, seed=3)
    tx = loop.make_optimizer("adam", harness.ADAM_LR)
    steps = {}
    for name, apply_fn in (
        ("dense", model.apply),
        ("meprop", transformer.block_apply(model, k, "unified")),
    ):
        step = jax.jit(transformer.train_step_fn(apply_fn, tx))
        (new, _), (loss, dx_sum) = step((params, tx.init(params)), x, y, mask)
        assert np.isfinite(float(loss)) and np.isfinite(float(dx_sum))
        steps[name] = new
    for kernel in (("attention", "query"), ("attention", "value"), ("mlp_in",), ("mlp_out",)):
        # kernels [in, ...out]; the attention's output projection [heads, head_dim, d] below

        def get(tree, kernel=kernel):
            for key in kernel:
                tree = tree[key]
            return tree["kernel"]

        width = int(np.prod(get(params).shape[1:]))
        assert 0 < _changed_columns(get(params), get(steps["meprop"])) <= k, kernel
        assert _changed_columns(get(params), get(steps["dense"])) == width, kernel
    out = [tree["attention"]["out"]["kernel"] for tree in (params, steps["meprop"])]
    before, after = (np.asarray(w).reshape(-1, d) for w in out)  # [heads * head_dim, d]
    assert 0 < _changed_columns(before, after) <= k


def test_quick_run_writes_records_with_the_converted_layers(tmp_path, capsys):
    out = tmp_path / "transformer.json"
    records = cli.main(["--transformer", "--quick", "--repeats", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "one encoder block's training step" in printed
    (batch, _, d, k) = transformer.QUICK_TRANSFORMER_CONFIGS[0]
    assert [r.mode for r in records] == ["dense", "unified", "forward"]
    assert all(r.section == "transformer" and r.batch == batch and r.d_in == d for r in records)
    assert records[0].ratio_vs_dense == 1.0 and len(records[1].times_ms) == 2
    for r in records:  # ratios are dense's time over the row's, round by round, from one run
        pairs = zip(records[0].times_ms, r.times_ms, strict=True)
        assert r.ratio_vs_dense == pytest.approx(statistics.median(d / t for d, t in pairs))
    layers = {layer["path"]: layer for layer in records[1].extra["layers"]}
    attention = [f"attention/{name}" for name in ("query", "key", "value", "out")]
    for path in (*attention, "mlp_in", "mlp_out"):
        assert layers[path]["k"] == k and layers[path]["reason"] == "sparsified"
    assert records[1].k == k and records[0].k == 0 and records[2].k == 0
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["records"]] == ["dense", "unified", "forward"]


def test_default_grid_is_the_issue_shapes():
    shapes = {(b, n, d): k for b, n, d, k in transformer.TRANSFORMER_CONFIGS}
    assert shapes == {
        (8, 64, 256): 32,
        (8, 64, 1024): 128,
        (32, 128, 256): 32,
        (32, 128, 1024): 128,
    }
    assert cli.parse_args(["--transformer"]).section == "transformer"
    grid = cli.parse_args(["--transformer", "--transformer-grid", "4x16x128x16"])
    assert grid.transformer_grid == [(4, 16, 128, 16)]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--transformer", "--transformer-grid", "4x16x128"], "BATCHxLENGTHxDxK"),
        (["--transformer", "--transformer-grid", "4x16x128x128"], "K (128) must be below D"),
        (["--transformer-grid", "4x16x128x16"], "--transformer-grid configures --transformer"),
        (["--transformer", "--grid", "2x3x4x1"], "--paper-table7, --grid and --with-update"),
        (["--transformer", "--plot", "x.png"], "it draws no --plot"),
        (["--transformer", "--modes", "unified", "random"], "a single --modes value"),
        (["--transformer", "--dtype", "bfloat16"], "float32 blocks only"),
        (["--transformer", "--steps"], "--steps and --transformer are separate sections"),
    ],
)
def test_bad_flags_are_usage_errors(argv, needle, capsys):
    assert needle in _usage_error(argv, capsys)
