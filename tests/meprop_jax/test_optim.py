"""Tests for ``meprop_jax.optim``: column-sparse updates from compact meProp gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import meprop_jax
from meprop_jax import optim
from meprop_jax._src.taps import CompactGrad, compact_tap

IN, OUT, N_OUT = 5, 12, 3
LR = 0.05
RULES = ("adam", "adagrad", "sgd")


def make_opt(rule: str, clip: float | None) -> optim.SparseOptimizer:
    if rule == "adam":
        return optim.sparse_adam(LR, clip=clip)
    if rule == "adagrad":
        return optim.sparse_adagrad(LR, clip=clip)
    return optim.sparse_sgd(LR, clip=clip)


def make_optax(rule: str, clip: float | None) -> optax.GradientTransformation:
    opt = {"adam": optax.adam, "adagrad": optax.adagrad, "sgd": optax.sgd}[rule](LR)
    return opt if clip is None else optax.chain(optax.clip(clip), opt)


class Reference:
    """NumPy float32 reference of the three rules, lazy on a kernel's selected columns."""

    def __init__(self, rule: str, clip: float | None):
        self.rule, self.clip = rule, clip

    def init(self, shape) -> list[np.ndarray]:
        if self.rule == "adam":
            return [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
        if self.rule == "adagrad":
            return [np.full(shape, 0.1, np.float32)]
        return []

    def step(self, g, slots, t):
        """Returns (update to add to the parameter, new slots)."""
        g = g.astype(np.float32)
        if self.clip is not None:
            g = np.clip(g, -self.clip, self.clip)
        if self.rule == "adam":
            m, v = slots
            m = (1 - 0.9) * g + 0.9 * m
            v = (1 - 0.999) * (g * g) + 0.999 * v
            m_hat = m / (1 - np.float32(0.9) ** np.float32(t))
            v_hat = v / (1 - np.float32(0.999) ** np.float32(t))
            return -LR * (m_hat / (np.sqrt(v_hat) + 1e-8)), [m, v]
        if self.rule == "adagrad":
            (acc,) = slots
            acc = g * g + acc
            return -LR * (g / np.sqrt(acc + 1e-7)), [acc]
        return -LR * g, []

    def dense(self, p, g, slots, t):
        delta, slots = self.step(g, slots, t)
        return p + delta, slots

    def columns(self, p, block, cols, slots, t):
        """Updates only the columns ``cols < out`` of ``p`` ``[in, out]`` and of the slots."""
        p, slots = p.copy(), [s.copy() for s in slots]
        valid = cols < p.shape[1]
        c = cols[valid]
        delta, new = self.step(block[valid].T, [s[:, c] for s in slots], t)
        p[:, c] += delta
        for s, n in zip(slots, new, strict=True):
            s[:, c] = n
        return p, slots


def kernel_leaves(state: optim.SparseState, name: str) -> list:
    """The kernel's state leaves as stored (``Transposed`` or ``[in, out]``), in tree order."""
    is_t = lambda x: isinstance(x, optim.Transposed)
    flat = jax.tree_util.tree_flatten_with_path(state.inner, is_leaf=is_t)[0]
    return [
        leaf for path, leaf in flat if jax.tree_util.keystr(path).endswith(f"['{name}']['kernel']")
    ]


def kernel_slots(state: optim.SparseState, name: str) -> list[np.ndarray]:
    """The kernel's state arrays in its ``[in, out]`` layout, whatever the stored layout."""
    plain, _ = optim.param_layout(kernel_leaves(state, name))
    return [np.asarray(a) for a in plain]


def adam_count(state: optim.SparseState) -> int:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [s for s in jax.tree.leaves(state.inner, is_leaf=is_adam) if is_adam(s)]
    return int(adam.count)


def tap_grad(block, cols, out: int = OUT) -> CompactGrad:
    """A single backward pass's compact gradient of columns ``cols`` (padding ``>= out``)."""
    cols = np.asarray(cols)
    selected = np.zeros(out, np.float32)
    selected[cols[cols < out]] = 1
    return CompactGrad(jnp.asarray(block), jnp.asarray(cols, jnp.float32), jnp.asarray(selected))


def random_problem(rng):
    params = {
        "hidden": {
            "kernel": rng.standard_normal((IN, OUT)).astype(np.float32),
            "bias": rng.standard_normal(OUT).astype(np.float32),
        },
        "out": {"kernel": rng.standard_normal((OUT, N_OUT)).astype(np.float32)},
    }
    return params


def random_grads(rng, width: int, step: int, all_columns: bool = False):
    """Dense grads of the other leaves and a tap with changing columns (and padding)."""
    if all_columns:
        cols = rng.permutation(OUT)
    else:
        cols = rng.choice(OUT, width, replace=False)
        if step % 2:  # padding entries: out-of-range, zero block rows
            cols[-2:] = OUT + np.arange(2)
    block = 3 * rng.standard_normal((cols.size, IN)).astype(np.float32)
    block[cols >= OUT] = 0
    grads = {
        "hidden": {"kernel": None, "bias": rng.standard_normal(OUT).astype(np.float32)},
        "out": {"kernel": 3 * rng.standard_normal((OUT, N_OUT)).astype(np.float32)},
    }
    return grads, {"hidden": {"kernel": tap_grad(block, cols)}}


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize(
    ("rule", "transposed"), [("adam", True), ("adam", False), ("adagrad", True), ("sgd", True)]
)
def test_column_update_matches_numpy_reference(rule, transposed, clip):
    rng = np.random.default_rng(0)
    params = random_problem(rng)
    width = 5
    opt, ref = make_opt(rule, clip), Reference(rule, clip)
    zero_taps = {"hidden": {"kernel": compact_tap(IN, OUT, k=width)}}
    state = opt.init(params, zero_taps if transposed else None)
    leaves = kernel_leaves(state, "hidden")
    assert len(leaves) == {"adam": 2, "adagrad": 1, "sgd": 0}[rule]
    assert all(isinstance(a, optim.Transposed) == transposed for a in leaves)
    ref_params = {k: dict(v) for k, v in params.items()}
    ref_slots = {
        (m, n): ref.init(a.shape) for m, leaves in params.items() for n, a in leaves.items()
    }
    update = jax.jit(opt.update)
    params = jax.tree.map(jnp.asarray, params)
    for t in range(1, 5):
        grads, taps = random_grads(rng, width, t)
        old_kernel = np.asarray(params["hidden"]["kernel"])
        old_slots = kernel_slots(state, "hidden")
        params, state = update(grads, state, params, taps)
        if rule == "adam":
            assert adam_count(state) == t
        tap = taps["hidden"]["kernel"]
        cols = np.asarray(tap.cols).astype(int)
        for (m, n), slots in ref_slots.items():
            if (m, n) == ("hidden", "kernel"):
                ref_params[m][n], ref_slots[m, n] = ref.columns(
                    ref_params[m][n], np.asarray(tap.block), cols, slots, t
                )
            else:
                ref_params[m][n], ref_slots[m, n] = ref.dense(
                    ref_params[m][n], grads[m][n], slots, t
                )
        for m, n in ref_slots:
            np.testing.assert_allclose(params[m][n], ref_params[m][n], rtol=2e-5, atol=1e-6)
        got_slots, want_slots = kernel_slots(state, "hidden"), ref_slots["hidden", "kernel"]
        for got, want in zip(got_slots, want_slots, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
        # Unselected columns of the kernel and of its state are untouched, bit for bit.
        rest = np.setdiff1d(np.arange(OUT), cols)
        kernel = np.asarray(params["hidden"]["kernel"])
        np.testing.assert_array_equal(kernel[:, rest], old_kernel[:, rest])
        for new, old in zip(kernel_slots(state, "hidden"), old_slots, strict=True):
            np.testing.assert_array_equal(new[:, rest], old[:, rest])
        if rule != "sgd":  # a selected column with a nonzero gradient does move
            assert not np.array_equal(kernel[:, cols[cols < OUT]], old_kernel[:, cols[cols < OUT]])


def dense_gradient(tap: CompactGrad) -> np.ndarray:
    """The ``[in, out]`` gradient a compact one stands for."""
    dense = np.zeros((IN, OUT), np.float32)
    cols = np.asarray(tap.cols).astype(int)
    valid = cols < OUT
    dense[:, cols[valid]] = np.asarray(tap.block)[valid].T
    return dense


@pytest.mark.parametrize(
    ("rule", "clip", "all_columns"),
    [
        ("adam", None, True),
        ("adam", 0.5, True),
        ("adagrad", 0.5, True),
        ("sgd", None, True),
        # A zero gradient leaves AdaGrad and SGD weights alone, so the two rules agree.
        ("adagrad", None, False),
        ("sgd", 0.5, False),
    ],
)
def test_matches_dense_optax(rule, clip, all_columns):
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, random_problem(rng))
    opt, stock = make_opt(rule, clip), make_optax(rule, clip)
    zero_taps = {"hidden": {"kernel": compact_tap(IN, OUT, k=OUT if all_columns else 5)}}
    state = opt.init(params, zero_taps)
    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict promotion
        stock_state = stock.init(params)
    stock_params = params
    update = jax.jit(opt.update, donate_argnums=(1, 2))
    for t in range(4):
        grads, taps = random_grads(rng, 5, t, all_columns=all_columns)
        dense_grads = jax.tree.map(lambda a: a, grads, is_leaf=lambda a: a is None)
        dense_grads["hidden"]["kernel"] = dense_gradient(taps["hidden"]["kernel"])
        with jax.numpy_dtype_promotion("standard"):
            updates, stock_state = stock.update(dense_grads, stock_state, stock_params)
            stock_params = optax.apply_updates(stock_params, updates)
        params, state = update(grads, state, params, taps)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(stock_params), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if rule == "adam":
        mu, nu = kernel_slots(state, "hidden")
        stock_adam = stock_state[-1][0] if clip is not None else stock_state[0]
        np.testing.assert_allclose(mu, stock_adam.mu["hidden"]["kernel"], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(nu, stock_adam.nu["hidden"]["kernel"], rtol=1e-6, atol=1e-8)


def test_schedule_and_no_taps_is_dense_adam():
    """Without taps every leaf is dense: the optimizer is optax.adam, schedules included."""
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, random_problem(rng))
    schedule = optax.linear_schedule(0.1, 0.01, 3)
    opt, stock = optim.sparse_adam(schedule), optax.adam(schedule)
    state = opt.init(params)
    with jax.numpy_dtype_promotion("standard"):
        stock_state = stock.init(params)
    stock_params = params
    for _ in range(3):
        grads = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
        params, state = opt.update(grads, state, params)
        with jax.numpy_dtype_promotion("standard"):
            updates, stock_state = stock.update(grads, stock_state, stock_params)
            stock_params = optax.apply_updates(stock_params, updates)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(stock_params), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


class MLP(nn.Module):
    k: int = 3
    mode: str = "unified"
    sparse_update: bool = True

    @nn.compact
    def __call__(self, x):
        for features in (OUT, OUT):
            layer = meprop_jax.Dense(
                features, k=self.k, mode=self.mode, sparse_update=self.sparse_update
            )
            x = nn.tanh(layer(x))
        return meprop_jax.Dense(N_OUT)(x)  # dense output layer: no tap


def loss_fn(model, params, taps, x, y):
    variables = {"params": params} if taps is None else {"params": params, "meprop_taps": taps}
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def make_step(model, opt):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, taps, x, y):
        grad_fn = optim.value_and_compact_grad(functools.partial(loss_fn, model), has_aux=True)
        (loss, _), (grads, tap_grads) = grad_fn(params, taps, x, y)
        params, state = opt.update(grads, state, params, tap_grads)
        return params, state, loss, tap_grads

    return step


def batch(rng, n: int, n_in: int = 7):
    x = jnp.asarray(rng.standard_normal((n, n_in)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, N_OUT, n), jnp.int32)


def test_flax_model_trains_and_moves_only_selected_columns():
    rng = np.random.default_rng(3)
    model = MLP()
    x, y = batch(rng, 8)
    variables = model.init(jax.random.key(0), x)
    params, taps = variables["params"], variables["meprop_taps"]
    assert set(taps) == {"Dense_0", "Dense_1"}  # the dense output layer has none
    assert taps["Dense_0"]["kernel"].block.shape == (3, 7)
    opt = optim.sparse_adam(0.05)
    state = opt.init(params, taps)

    # The compact gradient is the authors' masked dense gradient, kept compact.
    stock = functools.partial(loss_fn, MLP(sparse_update=False))
    dense_grads = jax.grad(lambda p: stock(p, None, x, y)[0])(params)
    (_, (grads, tap_grads)) = optim.value_and_compact_grad(
        functools.partial(loss_fn, model), has_aux=True
    )(params, taps, x, y)
    assert grads["Dense_0"]["kernel"] is None and grads["Dense_1"]["kernel"] is None
    for name in ("Dense_0", "Dense_1"):
        tap = tap_grads[name]["kernel"]
        rebuilt = np.zeros(params[name]["kernel"].shape, np.float32)
        rebuilt[:, np.asarray(tap.cols).astype(int)] = np.asarray(tap.block).T
        np.testing.assert_allclose(rebuilt, dense_grads[name]["kernel"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads[name]["bias"], dense_grads[name]["bias"], rtol=1e-5)

    step = make_step(model, opt)
    losses = []
    for _ in range(4):
        old = jax.tree.map(np.asarray, params)
        params, state, loss, tap_grads = step(params, state, taps, x, y)
        losses.append(float(loss))
        for name in ("Dense_0", "Dense_1"):
            cols = np.asarray(tap_grads[name]["kernel"].cols).astype(int)
            changed = np.flatnonzero(
                np.any(np.asarray(params[name]["kernel"]) != old[name]["kernel"], 0)
            )
            assert set(changed) <= set(cols)
            assert changed.size > 0
        assert np.any(np.asarray(params["Dense_2"]["kernel"]) != old["Dense_2"]["kernel"])
    assert losses[-1] < losses[0]
    # Evaluation needs no taps.
    assert model.apply({"params": params}, x).shape == (8, N_OUT)


def test_per_example_union_with_padding():
    rng = np.random.default_rng(4)
    model = MLP(k=2, mode="per_example")
    x, y = batch(rng, 3)
    x = x.at[1].set(x[0])  # two equal rows: the union has fewer than 3 * 2 columns
    y = y.at[1].set(y[0])
    variables = model.init(jax.random.key(1), x)
    params, taps = variables["params"], variables["meprop_taps"]
    assert taps["Dense_0"]["kernel"].block.shape == (6, 7)  # min(3 * 2, 12) columns
    opt = optim.sparse_adam(0.05)
    state = opt.init(params, taps)
    old = jax.tree.map(np.asarray, params)
    stock = functools.partial(loss_fn, MLP(k=2, mode="per_example", sparse_update=False))
    dense_grads = jax.grad(lambda p: stock(p, None, x, y)[0])(params)
    params, state, _, tap_grads = make_step(model, opt)(params, state, taps, x, y)
    ref = Reference("adam", None)
    for name in ("Dense_0", "Dense_1"):
        tap = tap_grads[name]["kernel"]
        cols = np.asarray(tap.cols).astype(int)
        assert len(set(cols)) == cols.size
        padding = cols >= OUT
        assert padding.any()
        np.testing.assert_array_equal(np.asarray(tap.block)[padding], 0)
        valid = cols[~padding]
        want = np.asarray(dense_grads[name]["kernel"])
        np.testing.assert_allclose(np.asarray(tap.block)[~padding].T, want[:, valid], rtol=1e-5)
        np.testing.assert_array_equal(np.delete(want, valid, axis=1), 0)
        kernel = old[name]["kernel"]
        want_kernel, _ = ref.columns(kernel, np.asarray(tap.block), cols, ref.init(kernel.shape), 1)
        np.testing.assert_allclose(params[name]["kernel"], want_kernel, rtol=2e-5, atol=1e-7)
        np.testing.assert_array_equal(
            np.delete(np.asarray(params[name]["kernel"]), valid, axis=1),
            np.delete(kernel, valid, axis=1),
        )
    # A per-example tap fits one batch shape only.
    with pytest.raises(ValueError, match="batch shape"):
        optim.value_and_compact_grad(lambda p, t: loss_fn(model, p, t, x[:2], y[:2])[0])(
            params, taps
        )


def test_sharded_batch_matches_single_device():
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(5)
    model = MLP(k=3)
    x, y = batch(rng, 16)
    variables = model.init(jax.random.key(2), x)
    params, taps = variables["params"], variables["meprop_taps"]
    opt = optim.sparse_adam(0.05)
    step = make_step(model, opt)
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    single = step(copy(params), opt.init(params, taps), taps, x, y)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        xs, ys = jax.device_put(x, P("data")), jax.device_put(y, P("data"))
        assert jax.typeof(xs).sharding.spec[0] == "data"
        params_r, taps_r = jax.device_put((copy(params), taps), P())
        sharded = step(params_r, opt.init(params_r, taps_r), taps_r, xs, ys)
    is_tap = lambda t: isinstance(t, CompactGrad)
    single_cols = [t.cols for t in jax.tree.leaves(single[3], is_leaf=is_tap)]
    sharded_cols = [t.cols for t in jax.tree.leaves(sharded[3], is_leaf=is_tap)]
    for got, want in zip(sharded_cols, single_cols, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(sharded[:3]), jax.tree.leaves(single[:3]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tap_errors():
    x, w = jnp.ones((4, IN)), jnp.ones((IN, OUT))
    with pytest.raises(ValueError, match="sparsified layer"):
        meprop_jax.linear(x, w, k=0, tap=compact_tap(IN, OUT, k=1))
    with pytest.raises(ValueError, match="compact_tap"):
        meprop_jax.linear(x, w, k=3, tap=compact_tap(IN, OUT, k=2))
    with pytest.raises(ValueError, match="batch_shape"):
        compact_tap(IN, OUT, k=2, mode="per_example")
    params = {"a": {"kernel": w}}
    with pytest.raises(ValueError, match="match no parameter"):
        optim.sparse_sgd(0.1).init(params, {"b": {"kernel": compact_tap(IN, OUT, k=2)}})


def test_compiled_step_builds_no_dense_kernel_arrays():
    """Inside a jitted, donated step only in-place column scatters write kernel-sized arrays.

    No dense gradient, no zero-filled ``[in, out]`` array and no copy of a kernel or of its
    state (a copy would mean XLA could not update the donated buffer in place).
    """
    model = MLP(k=3)
    x, y = batch(np.random.default_rng(6), 8, n_in=9)
    variables = model.init(jax.random.key(3), x)
    params, taps = variables["params"], variables["meprop_taps"]
    opt = optim.sparse_adam(0.05)
    state = opt.init(params, taps)
    step = make_step(model, opt)
    hlo = step.lower(params, state, taps, x, y).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    shapes = ("f32[9,12]", "f32[12,9]", "f32[12,12]")  # Dense_0 and Dense_1 kernels and state
    writers = [
        line.strip()
        for line in entry.splitlines()
        if any(f"= {shape}" in line for shape in shapes) and "parameter(" not in line
    ]
    assert len(writers) == 6  # kernel, mu and nu of two layers
    assert all("scatter" in line for line in writers), writers
