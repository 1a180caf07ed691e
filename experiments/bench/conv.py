"""Section ``conv``: one convolution layer's backward, dense against meProp.

Times the backward pass of one 3x3, stride-1, ``SAME``-padded convolution in NHWC layout
(``y = conv(x, W) + b``, :func:`meprop_jax.conv`): the VJP that returns ``dx``, ``dW`` and
``db`` for a random cotangent ``g``, for dense backprop (``k = 0``) and for each meProp mode
and ``k`` (output channels kept, see :func:`meprop_jax.conv`), on shapes
``(batch, size, in, out)`` with ``size x size`` images. The forward pass alone is timed beside
them, and every row is timed interleaved with the others of its shape
(:func:`experiments.bench.harness.time_fns`), so ``speedup`` is the dense backward's median
over the row's, both from the same run. ``ideal`` is ``out / k``: the two backward
convolutions shrink by that factor, the selection and the scatter of ``dW`` do not.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import meprop_jax
from experiments.bench.harness import (
    DENSE,
    FORWARD,
    Record,
    _block,
    _compile,
    _record,
    memory_stats,
    time_fns,
)

SECTION = "conv"
KERNEL_SIZE = (3, 3)
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# (batch, size, in, out, ks): MNIST-sized feature maps of a small CNN's first and second
# convolutions.
CONV_CONFIGS: tuple[tuple[int, int, int, int, tuple[int, ...]], ...] = (
    (64, 28, 32, 64, (4, 8, 16, 32)),
    (64, 14, 64, 128, (8, 16, 32, 64)),
)
QUICK_CONV_CONFIGS: tuple[tuple[int, int, int, int, tuple[int, ...]], ...] = ((4, 6, 3, 8, (2, 4)),)


def conv_entry(text: str) -> tuple[int, int, int, int, int]:
    """Parses ``--conv-grid BATCHxSIZExINxOUTxK`` (e.g. ``64x28x32x64x8``).

    Raises:
      argparse.ArgumentTypeError: not five positive ints, or ``K >= OUT`` (dense backprop).
    """
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 5 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxSIZExINxOUTxK with positive ints, e.g. 64x28x32x64x8; got {text!r}"
        )
    if parts[4] >= parts[3]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: K ({parts[4]}) must be below OUT ({parts[3]}); k >= out is dense backprop"
        )
    return parts  # type: ignore[return-value]


def conv_configs(
    entries: Sequence[tuple[int, int, int, int, int]] | None, quick: bool
) -> list[tuple[int, int, int, int, tuple[int, ...]]]:
    """The shapes to time, each with its ``k`` values: ``entries`` grouped by shape, or the
    defaults (:data:`QUICK_CONV_CONFIGS` with ``quick``)."""
    if not entries:
        return list(QUICK_CONV_CONFIGS if quick else CONV_CONFIGS)
    shapes: dict[tuple[int, int, int, int], list[int]] = {}
    for *shape, k in entries:
        ks = shapes.setdefault(tuple(shape), [])
        if k not in ks:
            ks.append(k)
    return [(*shape, tuple(ks)) for shape, ks in shapes.items()]


def conv_forward_fn() -> Callable[..., jax.Array]:
    """``(x, W, b) -> conv(x, W) + b``, the (unchanged) forward pass."""
    return lambda x, w, b: meprop_jax.conv(x, w, b, k=0, dimension_numbers=DIMENSION_NUMBERS)


def conv_grad_fn(k: int, mode: str) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """``(x, W, b, g, key) -> (dx, dW, db)``: the VJP of one meProp convolution.

    ``k = 0`` is dense backprop. ``key`` is the PRNG key of ``mode="random"`` (an argument, so
    that the channels are drawn at run time) and is ignored by the other modes.
    """

    def grads(x, w, b, g, key):
        def f(x, w, b):
            return meprop_jax.conv(
                x, w, b, k=k, mode=mode, key=key, dimension_numbers=DIMENSION_NUMBERS
            )

        _, vjp_fn = jax.vjp(f, x, w, b)
        return vjp_fn(g)

    return grads


def conv_data(
    batch: int, size: int, c_in: int, c_out: int, dtype: Any, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Standard-normal ``x [batch, size, size, in]``, ``W [3, 3, in, out]`` (fan-in scaled),
    ``b [out]``, ``g [batch, size, size, out]``, and a PRNG key for the random mode."""
    kx, kw, kb, kg, kr = jax.random.split(jax.random.key(seed), 5)
    fan_in = KERNEL_SIZE[0] * KERNEL_SIZE[1] * c_in
    x = jax.random.normal(kx, (batch, size, size, c_in), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (*KERNEL_SIZE, c_in, c_out), jnp.float32) * fan_in**-0.5
    b = jax.random.normal(kb, (c_out,), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (batch, size, size, c_out), jnp.float32).astype(dtype)
    w = w.astype(dtype)
    _block((x, w, b, g))
    return x, w, b, g, kr


def bench_conv_shape(
    batch: int,
    size: int,
    c_in: int,
    c_out: int,
    ks: Sequence[int],
    modes: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    dtype: str = "float32",
    seed: int = 0,
) -> list[Record]:
    """Times, on one data set, the forward pass, the dense backward and each (k, mode) backward.

    Returns:
      Records (section ``conv``, ``d_in``/``d_out`` the channels) in the order dense, each
      ``k`` with its modes, forward; ``extra`` holds ``spatial``, ``kernel``, XLA's ``gflop``,
      ``memory`` and, for meProp rows, ``ideal_speedup = out / k``.
    """
    x, w, b, g, key = conv_data(batch, size, c_in, c_out, jnp.dtype(dtype), seed)
    grad_args = (x, w, b, g, key)
    info: dict[Any, tuple[float, dict[str, int]]] = {}
    fns: dict[Any, tuple[Callable[..., Any], Sequence[Any]]] = {}

    def add(name: Any, fn: Callable[..., Any], args: Sequence[Any], data: int) -> None:
        compiled, flops = _compile(fn, args)
        fns[name] = (compiled, args)
        info[name] = (flops, memory_stats(compiled, data))

    add(DENSE, conv_grad_fn(0, "unified"), grad_args, x.nbytes + g.nbytes)
    for k in ks:
        for mode in modes:
            add((k, mode), conv_grad_fn(k, mode), grad_args, x.nbytes + g.nbytes)
    add(FORWARD, conv_forward_fn(), (x, w, b), x.nbytes)
    stats = time_fns(fns, repeats, warmup)
    dtype_name = str(jnp.dtype(dtype))

    def record(name: Any, k: int, mode: str) -> Record:
        flops, memory = info[name]
        extra: dict[str, Any] = {
            "spatial": [size, size],
            "kernel": list(KERNEL_SIZE),
            "gflop": flops / 1e9,
            "memory": memory,
        }
        if k:
            extra["ideal_speedup"] = c_out / k
        return _record(
            SECTION, batch, c_in, c_out, k, mode, dtype_name, stats[name], stats[DENSE], extra
        )

    records = [record(DENSE, 0, DENSE)]
    records += [record((k, mode), k, mode) for k in ks for mode in modes]
    records.append(record(FORWARD, 0, FORWARD))
    return records
