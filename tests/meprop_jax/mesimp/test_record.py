"""meSimp: the activity record, the prune rule, shrinking, export and the moment reset."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import serialization

import meprop_jax
from meprop_jax import mesimp

# A hand-worked output gradient: 3 examples, 5 units; the last example took no part.
G = jnp.array(
    [
        [1.0, -5.0, 0.0, 2.0, 0.5],
        [3.0, 0.0, 0.1, -2.0, 4.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


def record_counts(g, *, k, mode, groups=1):
    """The record tap's gradient of one call whose output gradient is ``g``."""
    out = g.shape[-1]
    x = jnp.eye(g.shape[0], 2)
    kernel = jnp.zeros((2, out))

    def loss(record):
        y = meprop_jax.multi_linear(
            [x], [kernel], k=k, mode=mode, key=jax.random.key(0), groups=groups, record=record
        )
        return jnp.sum(y * g)

    return jax.grad(loss)(meprop_jax.record_tap(out // groups))


def test_per_example_record_counts_each_examples_own_top_k():
    # Row 0 keeps |-5|, |2| (units 1, 3); row 1 keeps |4|, |3| (units 4, 0); row 2 is all 0.
    hits, examples = record_counts(G, k=2, mode="per_example")
    assert hits.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert examples == 2.0


def test_unified_record_counts_the_batch_columns_where_an_example_updates_them():
    # Column sums of |g|: 4, 5, 0.1, 4, 4.5 -> the batch keeps units 1 and 4. Row 1's gradient
    # at unit 1 is 0, so only row 0 updated it.
    hits, examples = record_counts(G, k=2, mode="unified")
    assert hits.tolist() == [0.0, 1.0, 0.0, 0.0, 2.0]
    assert examples == 2.0


def test_a_selected_zero_is_not_counted():
    # One nonzero entry and k=3: the top-3 fills up with two zero columns (an inactive ReLU
    # unit's gradient is exactly 0), which update nothing and so do not count.
    g = jnp.array([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    for mode in ("per_example", "unified"):
        hits, examples = record_counts(g, k=3, mode=mode)
        assert hits.tolist() == [0.0, 1.0, 0.0, 1.0], mode
        assert examples == 2.0


def test_random_and_dense_records():
    dense_rows = G.at[:2].add(jnp.where(G[:2] == 0, 0.25, 0.0))  # no zero in a counted row
    hits, examples = record_counts(dense_rows, k=2, mode="random")
    assert examples == 2.0 and hits.sum() == 4.0 and hits.max() <= 2.0
    hits, examples = record_counts(G, k=0, mode="unified")  # dense: every nonzero entry
    assert hits.tolist() == [2.0, 1.0, 1.0, 2.0, 2.0] and examples == 2.0


def test_grouped_record_ties_a_units_columns():
    # Two groups of three columns; unit j is columns j and j + 3. With k=1 per group, row 0
    # keeps columns 1 and 5 (units 1, 2), row 1 keeps columns 0 and 3 (unit 0 twice).
    g = jnp.array([[0.0, 2.0, 1.0, 0.5, 0.0, 3.0], [4.0, 0.0, 0.0, 5.0, 1.0, 0.0]])
    hits, examples = record_counts(g, k=1, mode="per_example", groups=2)
    assert hits.tolist() == [1.0, 1.0, 1.0] and examples == 2.0


def test_record_tap_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="record must be RecordTap"):
        meprop_jax.linear(jnp.ones((2, 3)), jnp.ones((3, 4)), k=1, record=mesimp.record_tap(3))


# ------------------------------------------------------------------------------------- Dense


class MLP(nn.Module):
    hidden: tuple = (8, 8)
    k: int = 3
    mode: str = "per_example"
    record: bool = True

    @nn.compact
    def __call__(self, x):
        for i, size in enumerate(self.hidden):
            layer = meprop_jax.Dense(
                size, k=self.k, mode=self.mode, record=self.record, name=f"hidden_{i}"
            )
            x = nn.relu(layer(x))
        return meprop_jax.Dense(3, name="output")(x)


class StockMLP(nn.Module):
    hidden: tuple

    @nn.compact
    def __call__(self, x):
        for i, size in enumerate(self.hidden):
            x = nn.relu(nn.Dense(size, name=f"hidden_{i}")(x))
        return nn.Dense(3, name="output")(x)


LAYERS = ["hidden_0", "hidden_1", "output"]
X = jax.random.normal(jax.random.key(0), (6, 5))
Y = jnp.arange(6) % 3


def loss_fn(model, params, record, taps, x=X):
    variables = {"params": params, mesimp.COLLECTION: record}
    if taps is not None:
        variables[mesimp.TAP_COLLECTION] = taps
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


@pytest.mark.parametrize("mode", ["unified", "per_example", "random"])
def test_record_false_is_the_plain_layer_bit_for_bit(mode):
    rngs = {"params": jax.random.key(1), "meprop": jax.random.key(2)}
    plain = MLP(mode=mode, record=False)
    recorded = MLP(mode=mode, record=True)
    v_plain = plain.init(rngs, X)
    v_rec = recorded.init(rngs, X)
    assert set(v_plain) == {"params"}
    assert set(v_rec) == {"params", mesimp.COLLECTION, mesimp.TAP_COLLECTION}
    jax.tree.map(np.testing.assert_array_equal, v_plain["params"], v_rec["params"])

    def grads(model, variables):
        def loss(params):
            logits = model.apply(
                {**variables, "params": params}, X, rngs={"meprop": rngs["meprop"]}
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

        return jax.value_and_grad(loss)(variables["params"])

    (l_plain, g_plain), (l_rec, g_rec) = grads(plain, v_plain), grads(recorded, v_rec)
    assert l_plain == l_rec
    jax.tree.map(np.testing.assert_array_equal, g_plain, g_rec)


def test_dense_record_accumulates_and_the_mask_silences_units():
    model = MLP()
    variables = model.init(jax.random.key(1), X)
    params, record, taps = (variables[c] for c in ("params", "mesimp", "mesimp_taps"))
    mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    record = {**record, "hidden_0": {**record["hidden_0"], "mask": mask}}
    grads, tap_grads = jax.grad(lambda p, t: loss_fn(model, p, record, t), argnums=(0, 1))(
        params, taps
    )
    step = jax.jit(mesimp.accumulate)(record, tap_grads)  # pure: runs inside a jitted step
    twice = mesimp.accumulate(step, tap_grads)
    _, state = model.apply(
        {"params": params, "mesimp": record}, X, capture_intermediates=True, mutable=True
    )
    for name in ("hidden_0", "hidden_1"):
        node = step[name]
        assert node["examples"].dtype == jnp.int32 and int(node["examples"]) == X.shape[0]
        # Per example k=3 of 8 units: an example's dL/dy is nonzero exactly at its active
        # (ReLU > 0) units, so it updates min(3, active) of them; the zeros that fill up its
        # top-3 do not count.
        active = np.sum(state["intermediates"][name]["__call__"][0] > 0, axis=-1)
        assert int(node["hits"].sum()) == int(np.minimum(3, active).sum())
        assert int(twice[name]["examples"]) == 2 * X.shape[0]
        np.testing.assert_array_equal(twice[name]["hits"], 2 * node["hits"])
    # Masked units output 0 and learn nothing.
    hidden = state["intermediates"]["hidden_0"]["__call__"][0]
    assert not np.any(hidden[:, jnp.array([1, 4])]) and np.all(
        np.any(hidden != 0, axis=0)[mask > 0]
    )
    assert not np.any(step["hidden_0"]["hits"][jnp.array([1, 4])])
    assert not np.any(grads["hidden_0"]["kernel"][:, jnp.array([1, 4])])
    assert not np.any(grads["hidden_0"]["bias"][jnp.array([1, 4])])
    assert not np.any(grads["hidden_1"]["kernel"][jnp.array([1, 4])])
    # Evaluation needs no taps and computes the same outputs.
    with_taps = model.apply({"params": params, "mesimp": record, "mesimp_taps": taps}, X)
    np.testing.assert_array_equal(model.apply({"params": params, "mesimp": record}, X), with_taps)


# ------------------------------------------------------------------------------ prune rule


def test_prune_rule_threshold_permanence_and_reset():
    record = {
        "layer": {
            "hits": jnp.array([0, 1, 2, 9, 20], jnp.int32),
            "examples": jnp.array(20, jnp.int32),
            "mask": jnp.array([1.0, 1.0, 1.0, 0.0, 1.0]),
        }
    }
    # floor(0.1 * 20) = 2: units 0 and 1 go, unit 3 stays pruned despite its hits.
    pruned = jax.jit(mesimp.prune)(record)
    assert pruned["layer"]["mask"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert pruned["layer"]["hits"].tolist() == [0] * 5 and int(pruned["layer"]["examples"]) == 0
    # floor(0.25 * 20) = 5 removes unit 2 as well.
    assert mesimp.prune(record, threshold=0.25)["layer"]["mask"].tolist() == [0, 0, 0, 0, 1]
    # An empty record (threshold 0) prunes nothing more, and pruned units never come back.
    again = mesimp.prune(pruned)
    assert again["layer"]["mask"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert mesimp.keep_sets(again)["layer"].tolist() == [False, False, True, False, True]
    # floor(0.1 * 19) = 1, the authors' int(refer * 0.1).
    rule = mesimp.prune_rule(jnp.array([0, 1, 2]), jnp.array(19), jnp.ones(3, bool))
    assert rule.tolist() == [False, True, True]


# -------------------------------------------------------------------------- shrink, export


def trained_state(steps=2):
    """Params, Adam state and a record with units pruned in both hidden layers."""
    model = MLP(hidden=(10, 9))
    variables = model.init(jax.random.key(3), X)
    params, record, taps = (variables[c] for c in ("params", "mesimp", "mesimp_taps"))
    opt = optax.adam(0.1)
    opt_state = opt.init(params)
    for _ in range(steps):
        grads = jax.grad(lambda p: loss_fn(model, p, record, None))(params)
        with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict promotion
            updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    keep0 = jnp.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)  # 7 of 10 survive
    keep1 = jnp.array([0, 1, 1, 0, 1, 0, 0, 1, 1], bool)  # 5 of 9 survive
    record = {
        "hidden_0": {**record["hidden_0"], "mask": keep0.astype(jnp.float32)},
        "hidden_1": {**record["hidden_1"], "mask": keep1.astype(jnp.float32)},
    }
    return model, params, opt_state, record, taps


def test_shrink_keeps_the_function_of_the_masked_network():
    model, params, opt_state, record, _ = trained_state()
    before = model.apply({"params": params, "mesimp": record}, X)
    shrunk = mesimp.shrink(
        params, opt_state, mesimp.keep_sets(record), LAYERS, pad_to=4, record=record
    )
    assert shrunk.units == (7, 5) and shrunk.widths == (8, 8)
    assert shrunk.record["hidden_0"]["mask"].tolist() == [1.0] * 7 + [0.0]
    assert shrunk.params["hidden_0"]["kernel"].shape == (5, 8)
    assert shrunk.params["hidden_1"]["kernel"].shape == (8, 8)
    assert shrunk.params["output"]["kernel"].shape == (8, 3)
    small = MLP(hidden=shrunk.widths)
    after = small.apply({"params": shrunk.params, "mesimp": shrunk.record}, X)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    # Padding units have zero weights and learn nothing.
    taps = mesimp.zero_taps(shrunk.record)
    grads, tap_grads = jax.grad(lambda p, t: loss_fn(small, p, shrunk.record, t), argnums=(0, 1))(
        shrunk.params, taps
    )
    assert not np.any(shrunk.params["hidden_0"]["kernel"][:, 7:])
    assert not np.any(grads["hidden_0"]["kernel"][:, 7:])
    assert not np.any(grads["hidden_1"]["kernel"][:, 5:])
    assert not np.any(grads["output"]["kernel"][5:])
    assert np.any(grads["hidden_0"]["kernel"][:, :7])
    # An example all of whose live hidden_1 units are off in the ReLU sends that layer no
    # gradient and is not counted.
    _, state = small.apply(
        {"params": shrunk.params, "mesimp": shrunk.record},
        X,
        capture_intermediates=True,
        mutable=True,
    )
    live = np.any(state["intermediates"]["hidden_1"]["__call__"][0] > 0, axis=1)
    counted = mesimp.accumulate(shrunk.record, tap_grads)
    assert int(counted["hidden_1"]["examples"]) == int(live.sum()) > 0


def test_shrink_gathers_adam_moments_like_the_params():
    _, params, opt_state, record, _ = trained_state()
    shrunk = mesimp.shrink(params, opt_state, mesimp.keep_sets(record), LAYERS, pad_to=4)
    adam, new_adam = opt_state[0], shrunk.opt_state[0]
    assert int(new_adam.count) == int(adam.count) == 2
    cols0 = np.array([0, 2, 3, 5, 6, 8, 9])
    cols1 = np.array([1, 2, 4, 7, 8])
    for old, new in ((adam.mu, new_adam.mu), (adam.nu, new_adam.nu), (params, shrunk.params)):
        assert np.any(old["hidden_0"]["kernel"])
        np.testing.assert_array_equal(
            new["hidden_0"]["kernel"][:, :7], old["hidden_0"]["kernel"][:, cols0]
        )
        np.testing.assert_array_equal(new["hidden_0"]["bias"][:7], old["hidden_0"]["bias"][cols0])
        np.testing.assert_array_equal(
            new["hidden_1"]["kernel"][:7, :5], old["hidden_1"]["kernel"][np.ix_(cols0, cols1)]
        )
        np.testing.assert_array_equal(new["output"]["kernel"][:5], old["output"]["kernel"][cols1])
        np.testing.assert_array_equal(new["output"]["bias"], old["output"]["bias"])
        assert not np.any(new["hidden_0"]["kernel"][:, 7:]) and not np.any(
            new["output"]["kernel"][5:]
        )


def test_export_loads_into_a_stock_mlp_and_predicts_identically():
    model, params, opt_state, record, _ = trained_state()
    before = model.apply({"params": params, "mesimp": record}, X)
    shrunk = mesimp.shrink(
        params, opt_state, mesimp.keep_sets(record), LAYERS, pad_to=4, record=record
    )
    exported, sizes = mesimp.export(shrunk.params, mesimp.keep_sets(shrunk.record), LAYERS)
    assert sizes == (7, 5)
    stock = StockMLP(hidden=sizes)
    template = stock.init(jax.random.key(9), X)
    loaded = serialization.from_bytes(template, serialization.to_bytes({"params": exported}))
    np.testing.assert_allclose(stock.apply(loaded, X), before, rtol=1e-6, atol=1e-6)


def test_shrink_needs_a_keep_set_per_hidden_layer():
    _, params, opt_state, record, _ = trained_state(steps=0)
    keep = {"hidden_0": mesimp.keep_sets(record)["hidden_0"]}
    with pytest.raises(ValueError, match=r"no keep set for \[.hidden_1.\]"):
        mesimp.shrink(params, opt_state, keep, LAYERS)
    keep = {"hidden_0": jnp.ones(3, bool), "hidden_1": jnp.ones(9, bool)}
    with pytest.raises(ValueError, match="must be \\[10\\]"):
        mesimp.shrink(params, opt_state, keep, LAYERS)


# ------------------------------------------------------------------------------------- LSTM


class Tagger(nn.Module):
    hidden: int = 8

    @nn.compact
    def __call__(self, x):
        cell = meprop_jax.LSTMCell(self.hidden, k=2, mode="per_example", record=True)
        h = nn.RNN(cell, variable_broadcast=["params", "mesimp", "mesimp_taps"])(x)
        return meprop_jax.Dense(3, name="output")(h)


def test_lstm_record_and_shrink():
    model = Tagger()
    x = jax.random.normal(jax.random.key(4), (2, 3, 5))  # [batch, time, in]
    variables = model.init(jax.random.key(5), x)
    params, record, taps = (variables[c] for c in ("params", "mesimp", "mesimp_taps"))

    def loss(params, taps):
        out = model.apply({"params": params, "mesimp": record, "mesimp_taps": taps}, x)
        return jnp.sum(out**2)

    tap_grads = jax.grad(loss, argnums=1)(params, taps)
    counted = mesimp.accumulate(record, tap_grads)
    node = counted["LSTMCell_0"]
    assert int(node["examples"]) == 6  # every time step of every sequence
    # k=2 per gate, 4 gates: each example selects between 2 and 8 of the 8 units.
    assert 12 <= int(node["hits"].sum()) <= 48 and int(node["hits"].max()) <= 6

    keep = jnp.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
    record = {"LSTMCell_0": {**record["LSTMCell_0"], "mask": keep.astype(jnp.float32)}}
    before = model.apply({"params": params, "mesimp": record}, x)
    opt_state = optax.adam(1e-3).init(params)
    shrunk = mesimp.shrink_lstm(
        params, opt_state, keep, "LSTMCell_0", ["output"], pad_to=2, record=record
    )
    assert shrunk.units == (5,) and shrunk.widths == (6,)
    assert shrunk.params["LSTMCell_0"]["hi"]["kernel"].shape == (6, 6)
    assert shrunk.opt_state[0].mu["LSTMCell_0"]["ii"]["kernel"].shape == (5, 6)
    after = Tagger(hidden=6).apply({"params": shrunk.params, "mesimp": shrunk.record}, x)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- moment reset


def test_reset_moments_zeroes_adam_and_adagrad_and_keeps_the_count():
    params = {"w": jnp.ones((2, 3))}
    grads = {"w": jnp.full((2, 3), 0.5)}
    adam = optax.chain(optax.clip(5.0), optax.adam(1e-3))
    for opt, moments in ((adam, 2), (optax.adagrad(0.1), 1)):
        state = opt.init(params)
        with jax.numpy_dtype_promotion("standard"):
            _, state = opt.update(grads, state, params)
        leaves, reset = jax.tree.leaves(state), jax.tree.leaves(mesimp.reset_moments(state))
        assert (
            sum(leaf.shape == (2, 3) and bool(np.all(np.asarray(leaf) != 0)) for leaf in leaves)
            == moments
        )
        for before, after in zip(leaves, reset, strict=True):
            expected = np.zeros_like(before) if before.shape == (2, 3) else before
            np.testing.assert_array_equal(after, expected)
    adam_state = adam.init(params)
    with jax.numpy_dtype_promotion("standard"):
        _, adam_state = adam.update(grads, adam_state, params)
    assert int(mesimp.reset_moments(adam_state)[1][0].count) == 1
    sparse = meprop_jax.optim.sparse_adagrad(0.1).init(params)  # accumulators start at 0.1
    assert np.all(sparse.inner[0].sum_of_squares["w"] == 0.1)
    assert not np.any(mesimp.reset_moments(sparse).inner[0].sum_of_squares["w"])


def test_module_docstring_example_runs():
    for module in (mesimp, mesimp.record):
        results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert results.attempted > 0, module.__name__
        assert results.failed == 0, module.__name__
