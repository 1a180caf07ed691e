"""Wall-clock benchmarks of meProp's backward pass against dense backprop.

Run as ``python -m experiments.bench``. The ``layer`` section times the backward pass of one
linear layer ``y = x W + b`` -- the VJP that returns ``dx``, ``dW`` and ``db`` for a random
cotangent ``g`` -- for dense backprop (``k = 0``) and for each meProp mode, on a grid of
``(batch, in, out, k)``. For every configuration it also times the forward pass alone, so the
two can be compared: the timed backward is ``jit(lambda x, W, b, g: vjp(f, x, W, b)[1](g))``,
whose forward output is unused and removed by XLA (the residuals of a linear layer are its
inputs), and XLA's own flop estimate, printed beside each row, confirms that a dense backward
costs two forward-sized products, not three.

Every backward call returns a fresh dense ``[in, out]`` ``dW`` (meProp's, too, is zero outside
the kept columns), and producing it is not free: glibc serves a large block requested from one
of XLA's worker threads with a new ``mmap`` on every call, which is then page-faulted in 4 KiB
at a time -- at ``in = out = 4096`` in float32 (64 MiB) that is 16385 faults per call and most
of the unified backward's time. ``--reuse-memory`` runs the benchmark again under
:data:`REUSE_MEMORY_TUNABLES` (one malloc arena and high mmap and trim thresholds), which keeps
such buffers in the heap and removes the faults, for dense and meProp alike; the
allocator-related environment is recorded in the JSON output.

All functions of one configuration are timed in the same run, interleaved call by call, so
that a change in the machine's load affects them alike; each row reports the median over
``--repeats`` calls after ``--warmup`` untimed calls, and ``speedup`` is the dense backward's
median divided by the row's median.

``--paper-table7`` runs the shape of the paper's GPU measurement (Sun et al. 2017, Table 7:
batch 1024, ``in = out = 8192``) and prints the published speedups beside ours.

``--with-update`` (section ``layer+update``) times the layer's backward pass *and* an Adam
update of its kernel and bias, one training step of the layer: dense backward + optax Adam
(``dense``), meProp's masked dense ``dW`` + optax Adam, the authors' rule (``<mode>+adam``),
and meProp with a compact ``dW`` + :func:`meprop_jax.optim.sparse_adam`, which touches only the
selected columns (``<mode>+sparse_adam``). The kernel, bias and Adam state are donated and
carried from call to call (shared by the variants of one state layout), so that the column
scatters update them in place.

``--steps`` (section ``steps``) times whole training steps of the MNIST MLP
(:class:`experiments.common.models.MLP`, the model ``python -m experiments.mnist`` trains) with the
training loop's optimizers: ``dense`` (k = 0, optax Adam), ``meprop`` (masked dense gradient,
optax Adam), ``meprop+sparse`` (``--sparse-update``: compact gradients, lazy
``sparse_adam``) and ``forward`` (loss only). Each call runs ``steps`` minibatches in one
``lax.scan`` on a donated state, like a chunk of the loop; times are per step. The dense step
time over the forward time is the bound on any backward-side saving (``bound``); ``of bound``
is a variant's speedup divided by it. ``<variant>:fwd+bwd`` rows time forward + backward with
the gradients summed (the loop's probe (b)), so ``update = step - fwd+bwd``.

Memory: every compiled program's ``memory_analysis()`` (arguments + outputs - donated aliases
+ XLA temporaries, deterministic) is recorded as ``extra["memory"]`` and printed as ``peak MiB``
(less the input batches, which every variant reads alike; see :func:`memory_stats`) and
``temp MiB``; the sections with updates also check that the compact (sparse-update) path
needs no more than dense.

Sections plug in through :data:`SECTIONS`: a function ``(args) -> list[Record]`` built on
:func:`time_fns` / :func:`time_fn`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import meprop_jax
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

DENSE = "dense"
FORWARD = "forward"


@dataclasses.dataclass(frozen=True)
class Stats:
    """Timings of one function, in milliseconds."""

    median_ms: float
    min_ms: float
    times_ms: tuple[float, ...]

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> Stats:
        ms = tuple(1e3 * s for s in seconds)
        return cls(statistics.median(ms), min(ms), ms)


@dataclasses.dataclass
class Record:
    """One timed (configuration, mode) row.

    ``mode`` is ``"dense"`` for the ordinary backward, ``"forward"`` for the forward pass
    alone, or a meProp mode. ``ratio_vs_dense`` is the dense backward's median time divided by
    this row's median (so ``1.0`` for the dense row). ``extra`` holds section-specific values
    (XLA's flop estimate, the paper's speedup, ...).
    """

    section: str
    batch: int
    d_in: int
    d_out: int
    k: int
    mode: str
    dtype: str
    median_ms: float
    min_ms: float
    times_ms: list[float]
    ratio_vs_dense: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _record(
    section: str,
    batch: int,
    d_in: int,
    d_out: int,
    k: int,
    mode: str,
    dtype: str,
    stats: Stats,
    dense_ms: float,
    extra: dict[str, Any],
) -> Record:
    """A :class:`Record` from one row's timings and the dense backward's median."""
    return Record(
        section=section,
        batch=batch,
        d_in=d_in,
        d_out=d_out,
        k=k,
        mode=mode,
        dtype=dtype,
        median_ms=stats.median_ms,
        min_ms=stats.min_ms,
        times_ms=list(stats.times_ms),
        ratio_vs_dense=dense_ms / stats.median_ms,
        extra=extra,
    )


def _block(tree: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.block_until_ready()


def time_fns(
    fns: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]],
    repeats: int,
    warmup: int,
) -> dict[str, Stats]:
    """Times several functions, interleaved call by call.

    Args:
      fns: name -> ``(fn, args)``; each ``fn(*args)`` returns arrays (any pytree).
      repeats: timed calls of each function.
      warmup: untimed calls of each function first (compilation, caches, thread pools).

    Returns:
      name -> :class:`Stats`. Every call is waited for with ``block_until_ready``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for fn, args in fns.values():
        for _ in range(warmup):
            _block(fn(*args))
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            start = time.perf_counter()
            _block(fn(*args))
            seconds[name].append(time.perf_counter() - start)
    return {name: Stats.from_seconds(s) for name, s in seconds.items()}


def time_fn(fn: Callable[..., Any], args: Sequence[Any], repeats: int, warmup: int) -> Stats:
    """Median/min/all wall-clock times of ``fn(*args)`` (see :func:`time_fns`)."""
    return time_fns({"fn": (fn, args)}, repeats, warmup)["fn"]


def _compile(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[..., Any], float]:
    """Ahead-of-time compiles ``jit(fn)`` for ``args``; returns it and XLA's flop estimate."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        flops = float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort and backend-dependent
        flops = float("nan")
    return compiled, flops


# ----------------------------------------------------------------------------------------
# Section "layer": backward of one linear layer.
# ----------------------------------------------------------------------------------------


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
    dense_ms = stats[DENSE].median_ms
    paper_speedups = paper_speedups or {}

    def record(name: Any, k: int, mode: str) -> Record:
        s = stats[name]
        extra: dict[str, Any] = {"gflop": flops[name] / 1e9}
        if k:
            extra["ideal_speedup"] = d_out / k
            if k in paper_speedups:
                extra["paper_speedup"] = paper_speedups[k]
        dtype_name = str(jnp.dtype(dtype))
        return _record("layer", batch, d_in, d_out, k, mode, dtype_name, s, dense_ms, extra)

    records = [record(DENSE, 0, DENSE)]
    records += [record((k, mode), k, mode) for k in ks for mode in modes]
    records.append(record(FORWARD, 0, FORWARD))
    return records


def layer_grid(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    if args.paper_table7:
        batch, d_in, d_out = PAPER_TABLE7_SHAPE
        return [(batch, d_in, d_out, k) for k in PAPER_TABLE7_SPEEDUP]
    if args.grid:
        return list(args.grid)
    return list(QUICK_GRID if args.quick else DEFAULT_GRID)


def run_layer_section(args: argparse.Namespace) -> list[Record]:
    """Section ``layer``: configurations of one shape share their data and dense timing."""
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for batch, d_in, d_out, k in layer_grid(args):
        ks = shapes.setdefault((batch, d_in, d_out), [])
        if k not in ks:
            ks.append(k)
    modes = args.modes or (("unified",) if args.paper_table7 else DEFAULT_MODES)
    paper = PAPER_TABLE7_SPEEDUP if args.paper_table7 else None
    records: list[Record] = []
    bench_shape = bench_layer_update_shape if args.with_update else bench_layer_shape
    for i, ((batch, d_in, d_out), ks) in enumerate(shapes.items()):
        rows = bench_shape(
            batch,
            d_in,
            d_out,
            ks,
            modes,
            repeats=args.repeats,
            warmup=args.warmup,
            dtype=args.dtype,
            seed=args.seed + i,
            paper_speedups=paper,
        )
        records.extend(rows)
        if not args.no_progress:
            print(format_table(rows, header=i == 0), flush=True)
    if args.with_update and not args.no_progress:
        print(memory_report(records), flush=True)
    return records


# ----------------------------------------------------------------------------------------
# Donated state, memory.
# ----------------------------------------------------------------------------------------

#: Learning rate of every timed Adam update (the paper's; the value does not change the cost).
ADAM_LR = 1e-3


class Carry:
    """A donated state handed from call to call: ``box.value, out = fn(box.value, *args)``.

    Several timed functions may share one box (they need the same state layout), so that a
    large state exists once rather than once per function.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def stepper(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """A no-argument callable for :func:`time_fns` that runs ``fn`` on the carried state;
        a :class:`Live` argument is read anew at every call."""

        def call() -> Any:
            self.value, out = fn(self.value, *_resolve(args))
            return out

        return call


class Live:
    """An argument read at call time, e.g. parameters that another function donates and
    replaces: ``Live(lambda: box.value[0])``."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self.get = get


def _resolve(args: Sequence[Any]) -> list[Any]:
    return [a.get() if isinstance(a, Live) else a for a in args]


def _compile_donated(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    """``jit(fn, donate_argnums=0)`` compiled ahead of time for ``args``."""
    return jax.jit(fn, donate_argnums=0).lower(*_resolve(args)).compile()


def memory_stats(compiled: Any, data: int = 0) -> dict[str, int]:
    """XLA's buffer sizes for a compiled program, in bytes (deterministic, unlike RSS).

    ``total`` = arguments + outputs - outputs aliased to donated arguments + temporaries: the
    most memory the call holds at once, its inputs included. ``peak`` is ``total`` less the
    ``data`` bytes of input batches that every compared variant reads alike (minibatches,
    ``x`` and ``g``), so that it compares what the variants themselves need: state, outputs
    and temporaries.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # best-effort and backend-dependent, like cost_analysis
        m = None
    if m is None:
        return {}
    stats = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
    stats["data"] = int(data)
    stats["peak"] = stats["total"] - stats["data"]
    return stats


def _flops(compiled: Any) -> float:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        return float(cost.get("flops", float("nan")))
    except Exception:
        return float("nan")


def _mib(n_bytes: float | None) -> str:
    return "" if n_bytes is None else f"{n_bytes / 2**20:.2f}"


def memory_report(records: Sequence[Record]) -> str:
    """Lines comparing the peak memory of the compact (sparse-update) rows with dense's and
    with the masked-dense rows of the same meProp mode, per shape and mode."""
    lines = []
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for r in records:
        key = (r.section, r.batch, r.d_in, r.d_out, tuple(r.extra.get("sizes", ())))
        groups.setdefault(key, []).append(r)
    for (section, batch, d_in, d_out, sizes), rows in groups.items():
        peak = {(r.mode, r.k): (r.extra.get("memory") or {}).get("peak") for r in rows}
        dense = peak.get((DENSE, 0))
        shape = "-".join(map(str, sizes)) if sizes else f"{d_in}x{d_out}"
        by_mode: dict[str, list[tuple[int, int, int | None]]] = {}
        for (mode, k), value in peak.items():
            if _is_compact(mode) and value:
                base = mode.rsplit("+", 1)[0]
                masked = peak.get((f"{base}+adam", k)) or peak.get((base, k))
                by_mode.setdefault(base, []).append((k, value, masked))
        if not dense:
            continue
        for base, entries in by_mode.items():
            worst = max(entries, key=lambda e: e[1])
            ks = ",".join(str(k) for k, _, _ in entries)
            verdict = "OK, not above dense" if worst[1] <= dense else "ABOVE DENSE"
            masked = [m for _, _, m in entries if m]
            vs_masked = (
                f"; the masked dense gradient ({base}) peaks at {_mib(min(masked))}"
                f"-{_mib(max(masked))} MiB"
                if masked
                else ""
            )
            lines.append(
                f"memory ({section}, {shape}, batch {batch}, {base}, k={ks}): dense peak "
                f"{_mib(dense)} MiB, compact peak {_mib(min(e[1] for e in entries))}-"
                f"{_mib(worst[1])} MiB ({worst[1] / dense:.2f}x dense at most){vs_masked}: "
                f"{verdict}"
            )
    return "\n".join(lines)


def _is_compact(mode: str) -> bool:
    return mode.endswith(("+sparse_adam", "+sparse"))


# ----------------------------------------------------------------------------------------
# Section "layer+update" (--with-update): backward and Adam update of one linear layer.
# ----------------------------------------------------------------------------------------


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


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.copy(), tree)


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
    dense_ms = stats[DENSE].median_ms
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
        return _record("layer+update", batch, d_in, d_out, k, mode, dtype_name, s, dense_ms, extra)

    records = [record(DENSE, 0, DENSE)]
    for k in ks:
        for mode in modes:
            for variant in (f"{mode}+adam", f"{mode}+sparse_adam"):
                records.append(record((k, variant), k, variant))
    records.append(record(FORWARD, 0, FORWARD))
    return records


# ----------------------------------------------------------------------------------------
# Section "steps": whole training steps of the MNIST MLP.
# ----------------------------------------------------------------------------------------

# (layer sizes, batch, k, minibatches per timed call). The first is the paper's MNIST MLP,
# the second the large acceptance case.
STEP_CONFIGS: tuple[tuple[tuple[int, ...], int, int, int], ...] = (
    ((784, 500, 500, 10), 50, 30, 200),
    ((784, 4096, 4096, 10), 256, 32, 5),
)
QUICK_STEP_CONFIGS: tuple[tuple[tuple[int, ...], int, int, int], ...] = (
    ((16, 32, 32, 10), 8, 4, 3),
)
STEP_VARIANTS: tuple[str, ...] = ("dense", "meprop", "meprop+sparse")
FWD_BWD = ":fwd+bwd"


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train_scan(model: Any, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``((params, opt_state), xs, ys) -> (state, loss sum)``: ``len(xs)`` steps of
    ``value_and_grad`` + optax update, scanned (the masked dense gradient for meProp)."""

    def loss_fn(params, x, y):
        return _cross_entropy(model.apply({"params": params}, x, True), y)

    def body(carry, xy):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *xy)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return (params, opt_state), loss

    def run(carry, xs, ys):
        carry, losses = lax.scan(body, carry, (xs, ys))
        return carry, jnp.sum(losses)

    return run


def _compact_loss(model: Any) -> Callable[..., jax.Array]:
    def loss_fn(params, taps, x, y):
        logits = model.apply({"params": params, optim.TAP_COLLECTION: taps}, x, True)
        return _cross_entropy(logits, y)

    return loss_fn


def _compact_train_scan(model: Any, opt: optim.SparseOptimizer) -> Callable[..., Any]:
    """``((params, sparse_state), xs, ys, taps) -> (state, loss sum)``: compact gradients and
    the column-sparse update, as ``--sparse-update`` trains."""
    grad_fn = optim.value_and_compact_grad(_compact_loss(model))

    def run(carry, xs, ys, taps):
        def body(carry, xy):
            params, state = carry
            loss, (grads, tap_grads) = grad_fn(params, taps, *xy)
            with jax.numpy_dtype_promotion("standard"):
                params, state = opt.update(grads, state, params, tap_grads)
            return (params, state), loss

        carry, losses = lax.scan(body, carry, (xs, ys))
        return carry, jnp.sum(losses)

    return run


def _grad_scan(grad_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``(acc, xs, ys, *params) -> (acc, loss sum)``: forward + backward of every minibatch,
    the gradients summed into the donated ``acc`` so that none is dead code (the loop's
    timing probe (b))."""

    def run(acc, xs, ys, *params):
        def body(acc, xy):
            loss, grads = grad_fn(*params, *xy)
            return jax.tree.map(jnp.add, acc, grads), loss

        acc, losses = lax.scan(body, acc, (xs, ys))
        return acc, jnp.sum(losses)

    return run


def _forward_scan(model: Any) -> Callable[..., jax.Array]:
    """``(params, xs, ys) -> loss sum``: the forward pass and loss alone, scanned."""

    def run(params, xs, ys):
        def body(total, xy):
            x, y = xy
            return total + _cross_entropy(model.apply({"params": params}, x, True), y), None

        return lax.scan(body, jnp.zeros((), jnp.float32), (xs, ys))[0]

    return run


def _zeros_like_shapes(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def bench_steps_config(
    sizes: Sequence[int],
    batch: int,
    k: int,
    steps: int,
    *,
    repeats: int,
    warmup: int,
    mode: str = "unified",
    seed: int = 0,
    breakdown: bool = True,
) -> list[Record]:
    """Times whole training steps of one MLP (see the module docstring), per step.

    Records: ``dense``, ``meprop``, ``meprop+sparse`` (each with ``fwd_bwd_ms`` and
    ``update_ms`` in ``extra`` when ``breakdown``), their ``:fwd+bwd`` rows, then ``forward``.
    """
    from experiments import loop
    from experiments.common.models import MLP

    hidden = tuple(sizes[1:-1])

    def model(k: int, sparse_update: bool = False) -> Any:
        return MLP(
            hidden=hidden, k=k, mode=mode, num_classes=sizes[-1], sparse_update=sparse_update
        )

    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((steps, batch, sizes[0]), np.float32))
    ys = jnp.asarray(rng.integers(0, sizes[-1], (steps, batch)), jnp.int32)
    init = jax.jit(lambda key, x: model(k, True).init(key, x, False))
    variables = init(jax.random.key(seed), xs[0])
    params, taps = variables["params"], variables[optim.TAP_COLLECTION]
    tx = loop.make_optimizer("adam", ADAM_LR)
    sparse_opt = loop.make_sparse_optimizer("adam", ADAM_LR)
    dense_box = Carry((params, tx.init(params)))
    sparse_params = _copy(params)
    sparse_box = Carry((sparse_params, sparse_opt.init(sparse_params, taps)))
    _block((dense_box.value, sparse_box.value))

    fns: dict[str, tuple[Callable[..., Any], Sequence[Any]]] = {}
    memory: dict[str, dict[str, int]] = {}

    data = xs.nbytes + ys.nbytes

    def add(name: str, fn: Callable[..., Any], box: Carry, *args: Any) -> None:
        compiled = _compile_donated(fn, (box.value, *args))
        fns[name] = (box.stepper(compiled, *args), ())
        memory[name] = memory_stats(compiled, data)

    add("dense", _train_scan(model(0), tx), dense_box, xs, ys)
    add("meprop", _train_scan(model(k), tx), dense_box, xs, ys)
    add("meprop+sparse", _compact_train_scan(model(k, True), sparse_opt), sparse_box, xs, ys, taps)
    if breakdown:
        dense_params = Live(lambda: dense_box.value[0])
        for name, m in (("dense", model(0)), ("meprop", model(k))):

            def grad_fn(params, x, y, m=m):
                loss = lambda p: _cross_entropy(m.apply({"params": p}, x, True), y)
                return jax.value_and_grad(loss)(params)

            acc = Carry(jax.tree.map(jnp.zeros_like, params))
            add(name + FWD_BWD, _grad_scan(grad_fn), acc, xs, ys, dense_params)
        compact_grad = optim.value_and_compact_grad(_compact_loss(model(k, True)))
        shapes = jax.eval_shape(compact_grad, params, taps, xs[0], ys[0])[1]
        acc = Carry(_zeros_like_shapes(shapes))
        sparse_params = Live(lambda: sparse_box.value[0])
        add("meprop+sparse" + FWD_BWD, _grad_scan(compact_grad), acc, xs, ys, sparse_params, taps)
    fwd = jax.jit(_forward_scan(model(0))).lower(params, xs, ys).compile()
    fns[FORWARD] = (lambda: fwd(dense_box.value[0], xs, ys), ())
    memory[FORWARD] = memory_stats(fwd, data)

    stats = time_fns(fns, repeats, warmup)
    per_step = {
        name: Stats.from_seconds([t / 1e3 / steps for t in s.times_ms]) for name, s in stats.items()
    }
    dense_ms = per_step["dense"].median_ms
    bound = dense_ms / per_step[FORWARD].median_ms

    def record(name: str) -> Record:
        s = per_step[name]
        variant = name.split(":")[0]
        speedup = dense_ms / s.median_ms
        extra: dict[str, Any] = {
            "sizes": list(sizes),
            "steps_per_call": steps,
            "memory": memory[name],
            "bound": bound,
            "update": {"dense": "adam", "meprop": "adam", "meprop+sparse": "sparse_adam"}.get(
                variant
            ),
        }
        if name in STEP_VARIANTS:
            extra["fraction_of_bound"] = speedup / bound
            if name + FWD_BWD in per_step:
                fwd_bwd = per_step[name + FWD_BWD].median_ms
                extra["fwd_bwd_ms"] = fwd_bwd
                extra["update_ms"] = max(s.median_ms - fwd_bwd, 0.0)
        if name == FORWARD:
            extra["fraction_of_bound"] = 1.0
        row_k = 0 if variant in ("dense", FORWARD) else k
        return _record(
            "steps", batch, sizes[0], sizes[1], row_k, name, "float32", s, dense_ms, extra
        )

    names = [*STEP_VARIANTS, *(v + FWD_BWD for v in STEP_VARIANTS if v + FWD_BWD in fns)]
    return [record(n) for n in (*names, FORWARD)]


def steps_configs(args: argparse.Namespace) -> list[tuple[tuple[int, ...], int, int, int]]:
    if args.mlp:
        return list(args.mlp)
    return list(QUICK_STEP_CONFIGS if args.quick else STEP_CONFIGS)


def run_steps_section(args: argparse.Namespace) -> list[Record]:
    """Section ``steps``: whole training steps per MLP configuration."""
    mode = (args.modes or ["unified"])[0]
    records: list[Record] = []
    for i, (sizes, batch, k, steps) in enumerate(steps_configs(args)):
        rows = bench_steps_config(
            sizes,
            batch,
            k,
            steps,
            repeats=args.repeats,
            warmup=args.warmup,
            mode=mode,
            seed=args.seed + i,
        )
        records.extend(rows)
        if not args.no_progress:
            print(format_steps_table(rows, args.repeats), flush=True)
    if not args.no_progress:
        print(memory_report(records), flush=True)
    return records


# Sections map the parsed arguments to a list of records.
SECTIONS: dict[str, Callable[[argparse.Namespace], list[Record]]] = {
    "layer": run_layer_section,
    "steps": run_steps_section,
}


# ----------------------------------------------------------------------------------------
# Output: table, JSON, plot.
# ----------------------------------------------------------------------------------------


# Minimum column widths, so that tables printed shape by shape line up.
_MIN_WIDTH = {"batch": 5, "in": 5, "out": 5, "k": 4, "mode": 11, "dtype": 8, "median ms": 10}
_MIN_WIDTH |= {"min ms": 10, "GFLOP": 7, "speedup": 8, "ideal": 7, "paper": 6}
_MIN_WIDTH |= {"peak MiB": 9, "temp MiB": 9}


def format_table(records: Sequence[Record], header: bool = True) -> str:
    """An aligned text table of the records, one line per record."""
    show_paper = any("paper_speedup" in r.extra for r in records)
    show_memory = any(r.extra.get("memory") for r in records)
    cols = ["batch", "in", "out", "k", "mode", "dtype", "median ms", "min ms", "GFLOP"]
    cols += ["speedup", "ideal"] + (["paper"] if show_paper else [])
    cols += ["peak MiB", "temp MiB"] if show_memory else []
    rows = []
    for r in records:
        ideal = r.extra.get("ideal_speedup")
        row = [
            str(r.batch),
            str(r.d_in),
            str(r.d_out),
            str(r.k) if r.k else "-",
            r.mode,
            r.dtype,
            f"{r.median_ms:.3f}",
            f"{r.min_ms:.3f}",
            f"{r.extra.get('gflop', float('nan')):.3g}",
            f"{r.ratio_vs_dense:.2f}x",
            f"{ideal:.1f}x" if r.k and ideal else "",
        ]
        if show_paper:
            paper = r.extra.get("paper_speedup")
            row.append(f"{paper:.1f}x" if paper else "")
        if show_memory:
            memory = r.extra.get("memory") or {}
            row += [_mib(memory.get("peak")), _mib(memory.get("temp"))]
        rows.append(row)
    widths = [
        max(len(c), _MIN_WIDTH.get(c, 0), *(len(row[i]) for row in rows))
        for i, c in enumerate(cols)
    ]
    left = {"mode", "dtype"}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if name in left else c.rjust(w)
            for c, w, name in zip(cells, widths, cols, strict=True)
        ).rstrip()

    lines = [fmt(cols), fmt(["-" * w for w in widths])] if header else []
    return "\n".join(lines + [fmt(row) for row in rows])


def format_steps_table(records: Sequence[Record], rounds: int | None = None) -> str:
    """The ``steps`` records of one MLP as a table: a line per training variant with its
    per-step time, forward+backward and update estimates, speedup over dense, fraction of the
    bound and memory; then the forward pass (whose speedup is the bound)."""
    by_mode = {r.mode: r for r in records}
    first = records[0]
    sizes = "-".join(map(str, first.extra.get("sizes", (first.d_in, first.d_out))))
    k = max(r.k for r in records)
    head = (
        f"MLP {sizes}, batch {first.batch}, k {k}: per training step, median of "
        f"{rounds or len(first.times_ms)} interleaved calls of "
        f"{first.extra.get('steps_per_call')} scanned steps"
    )
    cols = ["variant", "update", "step ms", "min ms", "fwd+bwd ms", "update ms"]
    cols += ["speedup", "of bound", "peak MiB", "temp MiB"]
    rows = []
    for name in (*STEP_VARIANTS, FORWARD):
        r = by_mode.get(name)
        if r is None:
            continue
        e = r.extra
        memory = e.get("memory") or {}
        fwd_bwd, update = e.get("fwd_bwd_ms"), e.get("update_ms")
        rows.append(
            [
                "forward (bound)" if name == FORWARD else name,
                e.get("update") or "-",
                f"{r.median_ms:.3f}",
                f"{r.min_ms:.3f}",
                "" if fwd_bwd is None else f"{fwd_bwd:.3f}",
                "" if update is None else f"{update:.3f}",
                f"{r.ratio_vs_dense:.2f}x",
                f"{100 * e['fraction_of_bound']:.0f}%" if "fraction_of_bound" in e else "",
                _mib(memory.get("peak")),
                _mib(memory.get("temp")),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [head, fmt(cols), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(row) for row in rows])


def environment() -> dict[str, Any]:
    """Where and when the benchmark ran."""
    device = jax.devices()[0]
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # The allocator decides whether each call's fresh output buffers page-fault (see the
        # module docstring), and XLA_FLAGS may change the compiled code: both are recorded.
        "env": {
            name: os.environ[name]
            for name in sorted(os.environ)
            if name.startswith(("GLIBC_TUNABLES", "MALLOC_", "XLA_FLAGS", "LD_PRELOAD"))
        },
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def write_json(
    path: Path, args: argparse.Namespace, records: Sequence[Record], argv: Sequence[str]
) -> None:
    args_dict = {
        k: str(v) if isinstance(v, Path) else [list(e) for e in v] if k == "grid" and v else v
        for k, v in vars(args).items()
    }
    payload: dict[str, Any] = {
        **environment(),
        "argv": list(argv),
        "args": args_dict,
        "records": [dataclasses.asdict(r) for r in records],
    }
    if args.paper_table7:
        payload["paper_table7"] = {
            "shape": list(PAPER_TABLE7_SHAPE),
            "dense_ms": PAPER_TABLE7_DENSE_MS,
            "speedup": {str(k): v for k, v in PAPER_TABLE7_SPEEDUP.items()},
        }
    report = memory_report(records)
    if report:
        payload["memory_report"] = report.splitlines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_speedup(path: Path, records: Sequence[Record], paper: bool = False) -> None:
    """Speedup over dense vs ``k`` for the shape with the most ``k`` values.

    Draws one line per mode, the ideal ``out / k`` and, with ``paper``, the paper's GPU
    speedups (Table 7).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sparse = [r for r in records if r.mode not in (DENSE, FORWARD)]
    if not sparse:
        raise ValueError("no meProp rows to plot")
    shapes: dict[tuple[int, int, int, str], set[int]] = {}
    for r in sparse:
        shapes.setdefault((r.batch, r.d_in, r.d_out, r.dtype), set()).add(r.k)
    shape = max(shapes, key=lambda s: len(shapes[s]))  # first shape among equals
    batch, d_in, d_out, dtype = shape
    rows = [r for r in sparse if (r.batch, r.d_in, r.d_out, r.dtype) == shape]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ks = sorted(shapes[shape])
    for mode in dict.fromkeys(r.mode for r in rows):
        pts = sorted((r.k, r.ratio_vs_dense) for r in rows if r.mode == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{mode} (this machine)")
    ax.plot(ks, [d_out / k for k in ks], "k--", lw=1, label="ideal out/k")
    if paper:
        pk = sorted(PAPER_TABLE7_SPEEDUP)
        ax.plot(pk, [PAPER_TABLE7_SPEEDUP[k] for k in pk], "s:", label="paper, GPU (Table 7)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("k")
    update = any(r.section == "layer+update" for r in rows)
    what = "backward + Adam update" if update else "backward"
    ax.set_ylabel(f"{what} speedup over dense")
    backend = jax.default_backend()
    ax.set_title(f"one layer {what}\nbatch {batch}, {d_in}x{d_out}, {dtype}, {backend}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(path: Path, records: Sequence[Record]) -> None:
    """Whole-step speedup over dense per MLP: a bar per training variant, the bound
    (dense / forward) as a dashed line over each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs: dict[tuple[Any, ...], dict[str, Record]] = {}
    for r in records:
        if r.section == "steps":
            key = (tuple(r.extra.get("sizes", ())), r.batch)
            configs.setdefault(key, {})[r.mode] = r
    if not configs:
        raise ValueError("no steps records to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    width = 0.8 / len(STEP_VARIANTS)
    for i, variant in enumerate(STEP_VARIANTS):
        xs = [j + (i - (len(STEP_VARIANTS) - 1) / 2) * width for j in range(len(configs))]
        ys = [rows[variant].ratio_vs_dense if variant in rows else 0 for rows in configs.values()]
        bars = ax.bar(xs, ys, width, label=variant)
        ax.bar_label(bars, fmt="%.2fx", fontsize="small")
    for j, rows in enumerate(configs.values()):
        bound = rows[FORWARD].ratio_vs_dense if FORWARD in rows else None
        if bound:
            label = "bound: dense / forward" if j == 0 else None
            ax.hlines(bound, j - 0.45, j + 0.45, colors="k", linestyles="--", label=label)
    labels = []
    for (sizes, batch), rows in configs.items():
        k = max(r.k for r in rows.values())
        labels.append(f"{'-'.join(map(str, sizes))}\nbatch {batch}, k {k}")
    ax.set_xticks(range(len(configs)), labels)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("training step speedup over dense")
    ax.set_title(f"whole training step (forward + backward + Adam), {jax.default_backend()}")
    ax.set_ylim(0, 1.15 * ax.get_ylim()[1])
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------


def _grid_entry(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts[:3]) < 1 or parts[3] < 1:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxINxOUTxK with positive ints, e.g. 256x4096x4096x32; got {text!r}"
        )
    return parts  # type: ignore[return-value]


def _mlp_entry(text: str) -> tuple[tuple[int, ...], int, int, int]:
    try:
        parts = text.split(":")
        sizes = tuple(int(s) for s in parts[0].split("-"))
        rest = [int(p) for p in parts[1:]]
    except ValueError:
        parts, sizes, rest = [], (), []
    if len(sizes) < 3 or len(rest) not in (2, 3) or min(sizes + tuple(rest)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected SIZES:BATCH:K[:STEPS] with SIZES like 784-500-500-10 (at least one "
            f"hidden layer) and positive ints, e.g. 784-4096-4096-10:256:32:5; got {text!r}"
        )
    batch, k = rest[:2]
    steps = rest[2] if len(rest) == 3 else 10
    if k >= min(sizes[1:-1]):
        raise argparse.ArgumentTypeError(f"--mlp {text}: k must be below every hidden size")
    return sizes, batch, k, steps


def _mode(text: str) -> str:
    try:
        return meprop_jax.MODES[meprop_jax.MODES.index(text.replace("-", "_"))]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown mode {text!r}; choose from {', '.join(meprop_jax.MODES)}"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="Time meProp's sparsified backward pass against dense backprop: one "
        "layer's backward (default), its backward + Adam update (--with-update), or whole "
        "training steps of the MNIST MLP (--steps).",
        epilog="Examples: python -m experiments.bench --steps --out bench_out/steps.json "
        "--plot bench_out/steps.png;  python -m experiments.bench --paper-table7 --with-update "
        "--out bench_out/table7_steps.json --plot bench_out/table7_steps.png",
    )
    p.add_argument(
        "--section",
        choices=sorted(SECTIONS),
        default="layer",
        help="what to time: layer (one layer; see --with-update) or steps (see --steps); "
        "default layer",
    )
    p.add_argument(
        "--steps",
        action="store_true",
        help="same as --section steps: whole training steps (forward + backward + Adam) of "
        "the MLPs 784-500-500-10 (batch 50, k 30) and 784-4096-4096-10 (batch 256, k 32): "
        "dense, meprop (masked dense gradient + optax Adam), meprop+sparse (compact gradients "
        "+ sparse_adam, as --sparse-update trains) and forward only, whose ratio to dense is "
        "the bound; with fwd+bwd rows for the update estimates and peak memory per variant",
    )
    p.add_argument(
        "--mlp",
        type=_mlp_entry,
        action="append",
        metavar="SIZES:BATCH:K[:STEPS]",
        help="a --steps configuration instead of the defaults, e.g. 784-4096-4096-10:256:32:5 "
        "(STEPS: minibatches scanned per timed call); repeatable",
    )
    p.add_argument(
        "--with-update",
        action="store_true",
        help="layer section: time backward + Adam update of the layer (kernel and bias): "
        "dense + optax Adam, <mode>+adam (masked dense dW + optax Adam) and "
        "<mode>+sparse_adam (compact dW + column-sparse Adam), with peak memory; with "
        "--paper-table7, the paper's grid as a training step of one layer",
    )
    p.add_argument(
        "--grid",
        type=_grid_entry,
        action="append",
        metavar="BxINxOUTxK",
        help="a (batch, in, out, k) configuration, e.g. 256x4096x4096x32; repeatable",
    )
    p.add_argument(
        "--paper-table7",
        action="store_true",
        help="the paper's GPU shape: batch 1024, in=out=8192, k=8..512 (unified only)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny grid (for tests)")
    p.add_argument(
        "--modes",
        type=_mode,
        nargs="+",
        metavar="MODE",
        help="meProp modes to time besides dense (default: all; unified for --paper-table7)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls (rounds) of each function (default 11; --steps 7; 3 for --quick "
        "and --paper-table7)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls first (default 2; 1 for --steps, --quick and --paper-table7)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        help="draw speedup vs k with the ideal out/k (PNG) here; for --steps, the speedup "
        "of each training variant beside the bound",
    )
    p.add_argument("--no-progress", action="store_true", help="print the table once, at the end")
    p.add_argument(
        "--reuse-memory",
        action="store_true",
        help="re-run under GLIBC_TUNABLES that let glibc reuse large freed blocks (Linux); "
        "without it every call maps its [in, out] outputs afresh and pays a page fault per "
        "4 KiB, which on a CPU costs about as much as a k=32 backward itself",
    )
    args = p.parse_args(argv)
    if args.steps:
        args.section = "steps"
    if args.section == "steps" and (args.paper_table7 or args.grid or args.with_update):
        p.error("--steps times whole MLP steps: --paper-table7, --grid and --with-update are "
                "options of the layer section")  # fmt: skip
    if args.section != "steps" and args.mlp:
        p.error("--mlp configures --steps")
    if args.section == "steps" and args.modes and len(args.modes) > 1:
        p.error("--steps times one meProp mode: give a single --modes value")
    if args.section == "steps" and args.dtype != "float32":
        p.error("--steps times float32 models only")
    if args.repeats is None:
        steps = args.section == "steps"
        args.repeats = 3 if args.quick or args.paper_table7 else 7 if steps else 11
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.paper_table7 or args.section == "steps" else 2
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


#: One malloc arena, so that XLA's worker threads allocate from the main heap, where blocks below
#: the mmap threshold are reused instead of being mapped (and faulted in) on every call.
REUSE_MEMORY_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:"
    "glibc.malloc.trim_threshold=4294967296"
)


def main(argv: Sequence[str] | None = None) -> list[Record]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.reuse_memory and os.environ.get("GLIBC_TUNABLES") != REUSE_MEMORY_TUNABLES:
        # glibc reads its tunables at process start: start again with them set.
        os.execve(
            sys.executable,
            [sys.executable, "-m", "experiments.bench", *argv],
            {**os.environ, "GLIBC_TUNABLES": REUSE_MEMORY_TUNABLES},
        )
    env = environment()
    print(
        f"jax {env['jax_version']}, backend {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, load {env['load_average']}, "
        f"{args.repeats} repeats after {args.warmup} warm-up",
        flush=True,
    )
    records = SECTIONS[args.section](args)
    if args.no_progress:
        if args.section == "steps":
            configs: dict[tuple[Any, ...], list[Record]] = {}
            for r in records:
                configs.setdefault((tuple(r.extra["sizes"]), r.batch), []).append(r)
            print("\n\n".join(format_steps_table(rows, args.repeats) for rows in configs.values()))
        else:
            print(format_table(records))
        report = memory_report(records)
        if report:
            print(report)
    if args.out:
        write_json(args.out, args, records, argv)
        print(f"wrote {args.out}")
    if args.plot:
        if args.section == "steps":
            plot_steps(args.plot, records)
        else:
            plot_speedup(args.plot, records, paper=args.paper_table7)
        print(f"wrote {args.plot}")
    return records
