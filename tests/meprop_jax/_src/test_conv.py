"""meProp convolutions: the op, ``meprop_jax.conv``.

Gradients against the masked-cotangent reference (the dense convolution VJP of a cotangent
whose unselected output channels are zeroed), over strides, padding, dilations, feature groups
and layouts; the cost on the jaxpr (no backward convolution spans every output channel);
non-finite gradients and the ranking precision, as ``meprop_jax.linear`` has them; bad
arguments. The layers are tested in ``tests/meprop_jax/{linen,nnx}/test_conv.py``.
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import meprop_jax
from meprop_jax._src import conv as _conv
from meprop_jax._src import selection as _selection

MODES = ("unified", "per_example", "random")


def reference_mask(g: np.ndarray, k: int, mode: str, groups: int, key, dn) -> np.ndarray:
    """The kept entries of ``g`` (a bool array of its shape), computed independently."""
    batch_axis, feature_axis = dn.out_spec[:2]
    g_bf = np.moveaxis(np.abs(np.asarray(g, np.float64)), (batch_axis, feature_axis), (0, -1))
    n, out = g_bf.shape[0], g_bf.shape[-1]
    width = out // groups
    per_example = g_bf.reshape(n, -1, out).sum(axis=1)  # [batch, out]
    keep = np.zeros((n, out), bool)
    if mode == "random":
        keep = np.asarray(_selection.random_mask(key, (n, out), k, groups))
    for j in range(groups):
        block = slice(j * width, (j + 1) * width)
        if mode == "unified":
            top = np.argsort(-per_example[:, block].sum(axis=0), kind="stable")[:k]
            keep[:, j * width + top] = True
        elif mode == "per_example":
            for row in range(n):
                top = np.argsort(-per_example[row, block], kind="stable")[:k]
                keep[row, j * width + top] = True
    shape = [1] * g.ndim
    shape[batch_axis], shape[feature_axis] = n, out
    return np.broadcast_to(keep.reshape(shape), g.shape)


CASES = {
    # name: (x shape, kernel shape, conv kwargs)
    "nhwc_same": ((2, 7, 6, 5), (3, 3, 5, 24), dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "strided_valid": (
        (3, 9, 8, 4),
        (3, 2, 4, 10),
        dict(window_strides=(2, 3), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")),
    ),
    "explicit_padding_dilations": (
        (2, 6, 7, 3),
        (3, 3, 3, 9),
        dict(
            padding=((1, 2), (0, 1)),
            lhs_dilation=(2, 1),
            rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "groups": (
        (2, 6, 6, 4),
        (3, 3, 2, 12),
        dict(feature_group_count=2, dimension_numbers=("NHWC", "HWIO", "NHWC")),
    ),
    "nchw": ((2, 5, 7, 6), (11, 5, 3, 3), dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "conv1d": (
        (4, 11, 3),
        (5, 3, 13),
        dict(window_strides=2, dimension_numbers=("NWC", "WIO", "NWC")),
    ),
    "conv3d": (
        (2, 4, 5, 3, 2),
        (2, 3, 2, 2, 7),
        dict(padding="VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")),
    ),
}


def conv_vjp(x, w, b, g, fn):
    @jax.jit  # one compiled program: much faster than op-by-op dispatch
    def run(x, w, b, g):
        y, vjp = jax.vjp(fn, x, w, b)
        return y, vjp(g)

    return run(x, w, b, g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_matches_masked_cotangent_reference(name, mode):
    x_shape, w_shape, kwargs = CASES[name]
    k = 1 + len(name) % 2  # k = 1 and k = 2 across the cases
    kx, kw, kb, kg, krand = jax.random.split(jax.random.key(hash((name, mode, k)) % 2**31), 5)
    dn = lax.conv_dimension_numbers(x_shape, w_shape, kwargs["dimension_numbers"])
    out = w_shape[dn.rhs_spec[0]]
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)
    b = jax.random.normal(kb, (out,))
    dense = functools.partial(_conv._forward, _cfg(x, w, kwargs))
    y_ref = dense(x, w, b)
    g = jax.random.normal(kg, y_ref.shape)
    key = krand if mode == "random" else None
    sparse = lambda x, w, b: meprop_jax.conv(x, w, b, k=k, mode=mode, key=key, **kwargs)
    y, (dx, dw, db) = conv_vjp(x, w, b, g, sparse)
    groups = kwargs.get("feature_group_count", 1)
    mask = reference_mask(np.asarray(g), k, mode, groups, krand, dn)
    assert mask.sum() < g.size  # something was dropped
    g_masked = jnp.where(mask, g, 0.0)
    _, (dx_ref, dw_ref, _) = conv_vjp(x, w, b, g_masked, dense)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    lead = tuple(a for a in range(g.ndim) if a != dn.out_spec[1])
    np.testing.assert_allclose(db, jnp.sum(g, axis=lead), rtol=1e-6)  # dense bias gradient
    # Kernel gradient: zero outside the kept channels, which are k (per group) for unified.
    out_axis = dn.rhs_spec[0]
    touched = np.any(np.asarray(dw) != 0, axis=tuple(a for a in range(w.ndim) if a != out_axis))
    if mode == "unified":
        assert touched.sum() == k * groups


def _cfg(x, w, kwargs):
    rank = x.ndim - 2
    dn = lax.conv_dimension_numbers(x.shape, w.shape, kwargs["dimension_numbers"])
    padding = kwargs.get("padding", "SAME")
    return _conv._ConvConfig(
        0,
        "unified",
        _conv._tuple(kwargs.get("window_strides", 1), rank),
        padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        _conv._tuple(kwargs.get("lhs_dilation"), rank),
        _conv._tuple(kwargs.get("rhs_dilation"), rank),
        dn,
        kwargs.get("feature_group_count", 1),
        None,
    )


@pytest.mark.parametrize("mode", ["per_example", "random"])
def test_per_example_union_covers_every_channel(mode):
    """batch * k >= out: the union spans all channels; still the masked reference."""
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 8))
    g = jax.random.normal(jax.random.key(2), (6, 5, 5, 8))
    key = jax.random.key(3)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    fn = lambda x, w: meprop_jax.conv(x, w, k=2, mode=mode, key=key, dimension_numbers=dn)
    _, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(g)
    mask = reference_mask(np.asarray(g), 2, mode, 1, key, dn)
    dense = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    _, vjp_ref = jax.vjp(dense, x, w)
    dx_ref, dw_ref = vjp_ref(jnp.where(mask, g, 0.0))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def _convs(jaxpr):
    found = []

    def visit(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.append(eqn)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    if hasattr(sub, "jaxpr"):
                        visit(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_backward_convolutions_avoid_full_channel_count(mode, layout):
    out, k = 24, 3  # 24 appears in no other dimension, and batch * k = 6 < 24
    if layout == "NHWC":
        x_shape, w_shape, dn = (2, 7, 6, 5), (3, 3, 5, out), ("NHWC", "HWIO", "NHWC")
    else:
        x_shape, w_shape, dn = (2, 5, 7, 6), (out, 5, 3, 3), ("NCHW", "OIHW", "NCHW")
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)
    key = jax.random.key(0)

    def loss(x, w):
        y = meprop_jax.conv(x, w, k=k, mode=mode, key=key, dimension_numbers=dn)
        return jnp.sum(y * y)

    convs = _convs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))
    full = [e for e in convs if any(out in v.aval.shape for v in (*e.invars, *e.outvars))]
    assert len(convs) == 3  # forward, dx, dkernel
    assert len(full) == 1  # the forward convolution only
    assert full[0].outvars[0].aval.shape[dn[2].index("C")] == out


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_non_finite_channels_are_flagged_as_linear_flags_columns(mode, layout):
    # NaN or inf in channels 1, 3 and 5 of example 0, k = 1: every one of them must show in
    # dkernel (meprop_jax.linear's rule for its columns), not only the one selected.
    x = normal(1, (2, 5, 5, 3))
    w, g = normal(2, (3, 3, 3, 8)), normal(3, (2, 5, 5, 8))
    g = g.at[0, 2, 2, 1].set(jnp.nan).at[0, 0, 1, 3].set(jnp.inf).at[0, 4, 4, 5].set(jnp.nan)
    dn = ("NHWC", "HWIO", "NHWC")
    if layout == "NCHW":
        x, w, g = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), g.transpose(0, 3, 1, 2)
        dn = ("NCHW", "OIHW", "NCHW")
    fn = functools.partial(
        meprop_jax.conv, k=1, mode=mode, key=jax.random.key(0), dimension_numbers=dn
    )
    _, (dx, dw, db) = conv_vjp(x, w, jnp.zeros(8), g, fn)
    out_axis = dn[1].index("O")
    bad_channels = np.any(~np.isfinite(np.moveaxis(np.asarray(dw), out_axis, 0)), axis=(1, 2, 3))
    assert np.flatnonzero(bad_channels).tolist() == [1, 3, 5]
    assert np.flatnonzero(~np.isfinite(np.asarray(db))).tolist() == [1, 3, 5]
    bad_examples = np.any(~np.isfinite(np.asarray(dx)), axis=(1, 2, 3))
    if mode == "unified":  # more than k non-finite channels: all of dx, as in linear
        assert bad_examples.tolist() == [True, True]
    else:  # each example's own selection: example 1 stays finite
        assert bad_examples.tolist() == [True, False]


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_channels_are_ranked_in_the_gradients_precision(mode):
    # Channel 1's gradient is larger by 1e-12, which float32 cannot tell from channel 0's.
    with jax.enable_x64(True):
        x, w = jnp.ones((1, 1, 1, 1), jnp.float64), jnp.ones((1, 1, 1, 2), jnp.float64)
        g = jnp.array([1.0, 1.0 + 1e-12], jnp.float64).reshape(1, 1, 1, 2)
        fn = functools.partial(
            meprop_jax.conv, k=1, mode=mode, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        dw = jax.vjp(lambda w: fn(x, w), w)[1](g)[0]
        assert dw.dtype == jnp.float64
        assert dw.reshape(-1).tolist() == [0.0, 1.0 + 1e-12]


def test_conv_errors():
    x, w, dn = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)), ("NHWC", "HWIO", "NHWC")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        meprop_jax.conv(x, w, k=1, mode="random", dimension_numbers=dn)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        meprop_jax.conv(x, w, jnp.ones(3), k=1, dimension_numbers=dn)
    with pytest.raises(ValueError, match="feature_group_count"):
        meprop_jax.conv(x, w, k=1, feature_group_count=3, dimension_numbers=dn)


def test_doctests():
    result = doctest.testmod(_conv, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
