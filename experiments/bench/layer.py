"""Section ``layer``: one linear layer's backward, alone or with its Adam update.

The ``layer`` section times the backward pass of one linear layer ``y = x W + b`` -- the VJP
that returns ``dx``, ``dW`` and ``db`` for a random cotangent ``g`` -- for dense backprop
(``k = 0``) and for each meProp mode, on a grid of ``(batch, in, out, k)``. For every
configuration it also times the forward pass alone, so the two can be compared: the timed
backward is ``jit(lambda x, W, b, g: vjp(f, x, W, b)[1](g))``, whose forward output is unused
and removed by XLA (the residuals of a linear layer are its inputs), and XLA's own flop
estimate, printed beside each row, confirms that a dense backward costs two forward-sized
products, not three.

``--with-update`` (section ``layer+update``) times the layer's backward pass *and* an Adam
update of its kernel and bias, one training step of the layer: dense backward + optax Adam
(``dense``), meProp's masked dense ``dW`` + optax Adam, the authors' rule (``<mode>+adam``),
and meProp with a compact ``dW`` + :func:`meprop_jax.optim.sparse_adam`, which touches only the
selected columns (``<mode>+sparse_adam``). The kernel, bias and Adam state are donated and
carried from call to call (shared by the variants of one state layout), so that the column
scatters update them in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import meprop_jax
from experiments.bench.harness import (
    ADAM_LR,
    DENSE,
    FORWARD,
    Carry,
    Record,
    _block,
    _compile,
    _compile_donated,
    _copy,
    _flops,
    _record,
    memory_stats,
    time_fns,
)
from meprop_jax import optim

# (batch, in, out, k). (256, 4096, 4096, 32) is the acceptance case.
DEFAULT_GRID: tuple[tuple[int, int, int, int], ...] = (
    (50, 784, 500, 30),
    (50, 500, 500, 30),
    (10, 500, 500, 20),
    (256, 4096, 4096, 32),
    (256, 4096, 4096, 128),
)
QUICK_GRID: tuple[tuple[int, int, int, int], ...] = (
    (8, 64, 48, 4),
    (8, 64, 48, 12),
)
DEFAULT_MODES: tuple[str, ...] = ("unified", "per_example", "random")

# Sun et al. 2017, Table 7: one linear layer's backward on a GPU, batch 1024, in = out = 8192,
# unified top-k; speedup over the dense backward (308 ms).
PAPER_TABLE7_SHAPE = (1024, 8192, 8192)
PAPER_TABLE7_SPEEDUP: dict[int, float] = {
    8: 36.8,
    16: 33.6,
    32: 27.5,
    64: 21.4,
    128: 14.5,
    256: 8.0,
    512: 4.4,
}
PAPER_TABLE7_DENSE_MS = 308.0


def layer_forward_fn() -> Callable[..., jax.Array]:
    """``(x, W, b) -> x W + b``, the (unchanged) forward pass."""
    return lambda x, w, b: meprop_jax.linear(x, w, b, k=0)


def layer_grad_fn(k: int, mode: str) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """``(x, W, b, g, key) -> (dx, dW, db)``: the VJP of one meProp linear layer.

    ``k = 0`` is dense backprop. ``key`` is the PRNG key of ``mode="random"`` (an argument, so
    that the random mask is drawn at run time rather than folded into a constant) and is
    ignored by the other modes.
    """

    def grads(x, w, b, g, key):
        def f(x, w, b):
            return meprop_jax.linear(x, w, b, k=k, mode=mode, key=key)

        _, vjp_fn = jax.vjp(f, x, w, b)
        return vjp_fn(g)

    return grads


def layer_data(
    batch: int, d_in: int, d_out: int, dtype: Any, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fresh standard-normal ``(x, W, b, g)`` and a PRNG key for the random mode."""
    kx, kw, kb, kg, kr = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(kx, (batch, d_in), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d_in, d_out), jnp.float32) * d_in**-0.5).astype(dtype)
    b = jax.random.normal(kb, (d_out,), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (batch, d_out), jnp.float32).astype(dtype)
    _block((x, w, b, g))
    return x, w, b, g, kr


def bench_layer_shape(
    batch: int,
    d_in: int,
    d_out: int,
    ks: Sequence[int],
    modes: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    dtype: str = "float32",
    seed: int = 0,
    paper_speedups: Mapping[int, float] | None = None,
) -> list[Record]:
    """Times, on one data set, the forward pass, the dense backward and each (k, mode) backward.

    Returns records in the order dense, then each ``k`` with its modes, then forward.
    """
    x, w, b, g, key = layer_data(batch, d_in, d_out, jnp.dtype(dtype), seed)
    grad_args = (x, w, b, g, key)
    fwd, fwd_flops = _compile(layer_forward_fn(), (x, w, b))
    dense, dense_flops = _compile(layer_grad_fn(0, "unified"), grad_args)
    fns: dict[Any, tuple[Callable[..., Any], Sequence[Any]]] = {
        DENSE: (dense, grad_args),
        FORWARD: (fwd, (x, w, b)),
    }
    flops: dict[Any, float] = {DENSE: dense_flops, FORWARD: fwd_flops}
    for k in ks:
        for mode in modes:
            fn, flops[k, mode] = _compile(layer_grad_fn(k, mode), grad_args)
            fns[k, mode] = (fn, grad_args)
    stats = time_fns(fns, repeats, warmup)
    paper_speedups = paper_speedups or {}

    def record(name: Any, k: int, mode: str) -> Record:
        s = stats[name]
        extra: dict[str, Any] = {"gflop": flops[name] / 1e9}
        if k:
            extra["ideal_speedup"] = d_out / k
            if k in paper_speedups:
                extra["paper_speedup"] = paper_speedups[k]
        dtype_name = str(jnp.dtype(dtype))
        return _record("layer", batch, d_in, d_out, k, mode, dtype_name, s, stats[DENSE], extra)

    records = [record(DENSE, 0, DENSE)]
    records += [record((k, mode), k, mode) for k in ks for mode in modes]
    records.append(record(FORWARD, 0, FORWARD))
    return records


def layer_step_fn(k: int, mode: str) -> Callable[..., Any]:
    """``((params, adam_state), x, g, key) -> ((params, adam_state), dx)``: the layer's backward
    (dense for ``k = 0``, else meProp with the masked dense ``dW``) and an optax Adam update
    of ``params = {"kernel", "bias"}``."""
    tx = optax.adam(ADAM_LR)

    def step(carry, x, g, key):
        params, opt_state = carry

        def f(x, w, b):
            return meprop_jax.linear(x, w, b, k=k, mode=mode, key=key)

        _, vjp_fn = jax.vjp(f, x, params["kernel"], params["bias"])
        dx, dw, db = vjp_fn(g)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update({"kernel": dw, "bias": db}, opt_state, params)
            params = optax.apply_updates(params, updates)
        return (params, opt_state), dx

    return step


def layer_compact_step_fn(k: int, mode: str) -> Callable[..., Any]:
    """``((params, sparse_state), x, g, key, tap) -> (..., dx)``: the meProp backward with a
    compact ``dW`` (the kernel is not differentiated) and :func:`meprop_jax.optim.sparse_adam`,
    which updates the kernel's selected columns and the (dense) bias."""
    opt = optim.sparse_adam(ADAM_LR)

    def step(carry, x, g, key, tap):
        params, state = carry
        w = params["kernel"]

        def f(x, tap, b):
            return meprop_jax.linear(x, w, b, k=k, mode=mode, key=key, tap=tap)

        _, vjp_fn = jax.vjp(f, x, tap, params["bias"])
        dx, tap_grad, db = vjp_fn(g)
        # In a network dx feeds the layer below, whose gradients the update reads, so the
        # update depends on the backward's read of the kernel's columns and XLA scatters into
        # the donated kernel in place (see meprop_jax.optim._after). Alone, the layer has no
        # such path and XLA copies the whole kernel first; this (numerically void: dx is
        # finite) term restores the dependency.
        tap_grad = tap_grad._replace(cols=tap_grad.cols + 0.0 * dx[0, 0].astype(jnp.float32))
        with jax.numpy_dtype_promotion("standard"):
            params, state = opt.update(
                {"kernel": None, "bias": db}, state, params, {"kernel": tap_grad}
            )
        return (params, state), dx

    return step


def bench_layer_update_shape(
    batch: int,
    d_in: int,
    d_out: int,
    ks: Sequence[int],
    modes: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    dtype: str = "float32",
    seed: int = 0,
    paper_speedups: Mapping[int, float] | None = None,
) -> list[Record]:
    """Times one layer's backward + Adam update: dense, then per ``(k, mode)`` the masked
    dense gradient with optax Adam (``<mode>+adam``) and the compact gradient with
    ``sparse_adam`` (``<mode>+sparse_adam``), then the forward pass alone.

    Two donated states (optax Adam's ``[in, out]`` moments; ``sparse_adam``'s transposed ones)
    are each shared by every function of their layout.
    """
    x, w, b, g, key = layer_data(batch, d_in, d_out, jnp.dtype(dtype), seed)
    params = {"kernel": w, "bias": b}
    dense_box = Carry((params, optax.adam(ADAM_LR).init(params)))
    some_tap = {"kernel": meprop_jax.compact_tap(d_in, d_out, k=1, dtype=w.dtype)}
    sparse_params = _copy(params)
    sparse_box = Carry((sparse_params, optim.sparse_adam(ADAM_LR).init(sparse_params, some_tap)))
    _block((dense_box.value, sparse_box.value))

    fns: dict[Any, tuple[Callable[..., Any], Sequence[Any]]] = {}
    info: dict[Any, tuple[float, dict[str, int]]] = {}

    data = x.nbytes + g.nbytes

    def add(name: Any, fn: Callable[..., Any], box: Carry, *args: Any) -> None:
        compiled = _compile_donated(fn, (box.value, *args))
        fns[name] = (box.stepper(compiled, *args), ())
        info[name] = (_flops(compiled), memory_stats(compiled, data))

    add(DENSE, layer_step_fn(0, "unified"), dense_box, x, g, key)
    for k in ks:
        for mode in modes:
            add((k, f"{mode}+adam"), layer_step_fn(k, mode), dense_box, x, g, key)
            tap = meprop_jax.compact_tap(
                d_in, d_out, k=k, mode=mode, batch_shape=(batch,), dtype=w.dtype
            )
            step = layer_compact_step_fn(k, mode)
            add((k, f"{mode}+sparse_adam"), step, sparse_box, x, g, key, tap)
    fwd = jax.jit(layer_forward_fn()).lower(x, w, b).compile()
    fns[FORWARD] = (lambda: fwd(x, dense_box.value[0]["kernel"], dense_box.value[0]["bias"]), ())
    info[FORWARD] = (_flops(fwd), memory_stats(fwd, x.nbytes))
    stats = time_fns(fns, repeats, warmup)
    paper_speedups = paper_speedups or {}

    def record(name: Any, k: int, mode: str) -> Record:
        s = stats[name]
        flops, memory = info[name]
        extra: dict[str, Any] = {"gflop": flops / 1e9, "memory": memory}
        if k:
            extra["ideal_speedup"] = d_out / k
            if k in paper_speedups and mode == "unified+sparse_adam":
                extra["paper_speedup"] = paper_speedups[k]
        dtype_name = str(jnp.dtype(dtype))
        dense = stats[DENSE]
        return _record("layer+update", batch, d_in, d_out, k, mode, dtype_name, s, dense, extra)

    records = [record(DENSE, 0, DENSE)]
    for k in ks:
        for mode in modes:
            for variant in (f"{mode}+adam", f"{mode}+sparse_adam"):
                records.append(record((k, variant), k, variant))
    records.append(record(FORWARD, 0, FORWARD))
    return records
