"""Section ``per_example``: the paper's CPU setting, per-example top-k at minibatches of 10.

Sun et al. (2017) measured their speedups on a CPU with per-example top-k and minibatches of
10 (MNIST 784-500-500-10, k = 20; LSTMs at h = 500). At these sizes one backward pass takes a
fraction of a millisecond, less than a jitted call's dispatch, so every timed call here runs
``steps`` minibatches (fresh ``x`` and ``g`` per step) in one ``lax.scan``, as the training
loop does, and times are per step. Every output is consumed (summed into the scan's carry, or
read by the optimizer), so XLA removes none of it.

Rows, each a ratio to the dense row of its group, timed interleaved in the same run:

* ``layer`` (784->500 and 500->500, batch 10, k = 20): the backward pass (``dx``, ``dW``,
  ``db``). ``dense``; ``per_example`` with the masked dense ``dW`` (the authors' form) in the
  stock ``[in, out]`` layout and with the kernel stored ``[out, in]`` (``:out_in``); and with
  the compact ``dW`` (``+compact``, the form the column-sparse optimizers consume), in both
  layouts; and with ``dW`` kept as factors (``+factored:out_in``, :class:`meprop_jax.FactoredGrad`:
  selection and ``dx`` only, the weight gradient summed by the optimizer).
* ``layer+update``: the backward pass and an Adam step of the layer: dense + ``optax.adam``;
  the compact ``dW`` + :func:`meprop_jax.optim.sparse_adam` (lazy Adam, selected columns only),
  with the kernel stored ``[in, out]`` and ``[out, in]`` (``:out_in``); and the factored ``dW``
  + ``sparse_adam``, which sums each selected row as it updates it (``+factored``).
* ``lstm`` (the gates of an LSTM cell, ``[x, h] -> 4h`` with h = 500, batch 8, k = 5 and 10
  per gate): the backward pass of :func:`meprop_jax.multi_linear` with ``groups=4``.
* ``parser`` (the parser's hidden layer, 2400 -> 500, minibatches of 250, k = 20): the
  backward pass as in ``layer``. Its rows cover the layer, so the weight gradient is dense;
  for a kernel stored ``[out, in]`` the native kernels sum it from each row's selected
  entries and take ``dx`` from each row's own kernel rows, and XLA runs the full products.
* ``mnist`` (784-500-500-10, batch 10, k = 20, Adam): whole training steps of the MNIST MLP:
  dense with ``optax.adam``; per-example with the masked dense gradient and ``optax.adam``
  (the authors' rule), in both layouts; the authors' rule from compact gradients
  (``+compact:out_in``, ``sparse_adam(lazy=False)``, ``--kernel-grad compact``) and from
  factored ones (``+factored:out_in``, what ``experiments.mnist`` runs by default in this
  setting); and per-example with
  compact gradients and lazy ``sparse_adam`` (``+sparse``, ``--sparse-update``), in both
  layouts, and from factored gradients (``+sparse+factored:out_in``). With the native kernels
  built, also ``dense+native_adam:out_in``: dense backprop whose hidden kernels, stored
  ``[out, in]``, take the native Adam pass that meProp's steps use, every row with its
  gradient. Its ratio to ``dense`` is what the layout and that pass change in a dense step;
  meProp's ratio to it is what the sparse backward gains with the update kernel held the same.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import meprop_jax
from experiments import loop
from experiments.bench.harness import (
    ADAM_LR,
    Carry,
    Record,
    Stats,
    _block,
    _compile_donated,
    _record,
    time_fns,
)
from experiments.bench.steps import _compact_train_scan, _cross_entropy, _train_scan
from experiments.common.models import MLP
from meprop_jax import optim, train_state
from meprop_jax._src import fused, native
from meprop_jax.linen import TRANSPOSED_KERNEL

# (batch, in, out, k): the paper's MNIST layers.
LAYER_SHAPES: tuple[tuple[int, int, int, int], ...] = ((10, 784, 500, 20), (10, 500, 500, 20))
# (batch, hidden, ks): the LSTM gates.
LSTM_SHAPES: tuple[tuple[int, int, tuple[int, ...]], ...] = ((8, 500, (5, 10)),)
# (sizes, batch, k)
MNIST_CONFIG: tuple[tuple[int, ...], int, int] = ((784, 500, 500, 10), 10, 20)
# (batch, in, out, k): the parser's hidden layer (48 features of 50 dims -> 500) at its
# minibatches of 250 transitions, whose rows cover the layer (250 * 20 >= 500).
PARSER_SHAPES: tuple[tuple[int, int, int, int], ...] = ((250, 2400, 500, 20),)
STEPS = 200  # minibatches per timed call
PARSER_STEPS = 20  # its steps take milliseconds
# The dense step with meProp's native update kernel (see the module docstring).
NATIVE_ADAM_DENSE = "dense+native_adam:out_in"

QUICK_LAYER_SHAPES = ((4, 24, 16, 2),)
QUICK_LSTM_SHAPES = ((2, 8, (1,)),)
QUICK_MNIST_CONFIG = ((16, 12, 12, 10), 4, 2)
QUICK_PARSER_SHAPES = ((12, 24, 16, 2),)
QUICK_STEPS = 3

MODE = "per_example"


def _paths() -> list[tuple[str, Callable[[], Any]]]:
    """``(label suffix, context)`` for each backward path to time: the native kernels (when
    built) and the pure-XLA path; the path is fixed when a function is compiled."""
    if not native.enabled():
        return [(" [xla]", contextlib.nullcontext)]
    return [(" [native]", contextlib.nullcontext), (" [xla]", native.disabled)]


def _add(acc: Any, tree: Any) -> Any:
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, tree)


def _grad_scan(grad: Callable[..., Any]) -> Callable[..., Any]:
    """``(acc, xs, gs, *args) -> (acc, 0)``: ``grad(x, g, *args)`` for every step, its outputs
    summed into the donated ``acc`` (so that none of them is dead code)."""

    def run(acc, xs, gs, *args):
        def body(acc, xg):
            return _add(acc, grad(*xg, *args)), None

        return lax.scan(body, acc, (xs, gs))[0], jnp.zeros(())

    return run


def _vjp_fn(k: int, layout: str, compact: bool, groups: int = 1) -> Callable[..., Any]:
    """``(x, g, kernels, bias, taps) -> gradients`` of ``multi_linear`` over the inputs ``x``
    (a tuple), in the kernel ``layout``; ``compact`` differentiates the taps instead of the
    kernels."""

    def grad(xs, g, kernels, bias, taps):
        def f(xs, ws_or_taps, b):
            ws, ts = (kernels, ws_or_taps) if compact else (ws_or_taps, None)
            return meprop_jax.multi_linear(
                xs, ws, b, k=k, mode=MODE, groups=groups, taps=ts, kernel_layout=layout
            )

        return jax.vjp(f, xs, taps if compact else kernels, bias)[1](g)

    return grad


def _layer_variants(k: int) -> dict[str, tuple[int, str, bool | str]]:
    """name -> (k, layout, compact): False, True (the block) or ``"factored"``."""
    return {
        "dense": (0, "in_out", False),
        MODE: (k, "in_out", False),
        f"{MODE}:out_in": (k, "out_in", False),
        f"{MODE}+compact": (k, "in_out", True),
        f"{MODE}+compact:out_in": (k, "out_in", True),
        f"{MODE}+factored:out_in": (k, "out_in", "factored"),
    }


def _data(rng, steps: int, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    return [jnp.asarray(rng.standard_normal((steps, *s)), jnp.float32) for s in shapes]


def _per_step(stats: dict[Any, Stats], steps: int) -> dict[Any, Stats]:
    return {n: Stats.from_seconds([t / 1e3 / steps for t in s.times_ms]) for n, s in stats.items()}


def _records(section, per_step, dense_name, batch, d_in, d_out, k_of, extra=None):
    dense = per_step[dense_name]
    return [
        _record(section, batch, d_in, d_out, k_of(name), name, "float32", s, dense, extra or {})
        for name, s in per_step.items()
    ]


def bench_gates(
    batch: int,
    ins: Sequence[int],
    out: int,
    ks: Sequence[int],
    groups: int,
    *,
    steps: int,
    repeats: int,
    warmup: int,
    seed: int,
    section: str,
) -> list[Record]:
    """The backward pass of one ``multi_linear`` (inputs ``ins`` -> ``out``) per variant."""
    rng = np.random.default_rng(seed)
    xs = tuple(_data(rng, steps, [(batch, n) for n in ins]))
    (gs,) = _data(rng, steps, [(batch, out)])
    kernels = tuple(
        jnp.asarray(rng.standard_normal((n, out)) / np.sqrt(n), jnp.float32) for n in ins
    )
    bias = jnp.zeros((out,), jnp.float32)
    fns, ks_of = {}, {}
    for k in ks:
        for (name, (kk, layout, compact)), (suffix, path) in itertools.product(
            _layer_variants(k).items(), _paths()
        ):
            label = "dense" if name == "dense" else f"{name} k={k}{suffix}"
            if label in fns:
                continue
            stored = kernels if layout == "in_out" else tuple(w.T.copy() for w in kernels)
            taps = None
            if compact:
                taps = tuple(
                    meprop_jax.compact_tap(
                        n,
                        out,
                        k=kk,
                        mode=MODE,
                        groups=groups,
                        batch_shape=(batch,),
                        factored=compact == "factored",
                    )
                    for n in ins
                )
            grad = _vjp_fn(kk, layout, compact, groups)
            one = jax.eval_shape(grad, tuple(x[0] for x in xs), gs[0], stored, bias, taps)
            acc = Carry(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), one))
            args = (xs, gs, stored, bias, taps)
            with path():
                compiled = _compile_donated(_grad_scan(grad), (acc.value, *args))
            fns[label] = (acc.stepper(compiled, *args), ())
            ks_of[label] = kk
    per_step = _per_step(time_fns(fns, repeats, warmup), steps)
    return _records(section, per_step, "dense", batch, sum(ins), out, ks_of.get)


def bench_layer_update(
    batch: int, d_in: int, d_out: int, k: int, *, steps: int, repeats: int, warmup: int, seed: int
) -> list[Record]:
    """One layer's backward pass and Adam step: dense + optax.adam against the compact
    gradient + sparse_adam, with the kernel stored ``[in, out]`` and ``[out, in]``."""
    rng = np.random.default_rng(seed)
    xs, gs = _data(rng, steps, [(batch, d_in), (batch, d_out)])
    w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32)
    b = jnp.zeros((d_out,), jnp.float32)
    tx = optax.adam(ADAM_LR)

    def dense_run(carry, xs, gs):
        def body(carry, xg):
            (params, state), dx_sum = carry
            f = lambda x, w, b: meprop_jax.linear(x, w, b, k=0)
            dx, dw, db = jax.vjp(f, xg[0], params["kernel"], params["bias"])[1](xg[1])
            with jax.numpy_dtype_promotion("standard"):  # as the training loop updates
                updates, state = tx.update({"kernel": dw, "bias": db}, state, params)
                params = optax.apply_updates(params, updates)
            return ((params, state), dx_sum + dx), None

        return lax.scan(body, carry, (xs, gs))[0], jnp.zeros(())

    opt = optim.sparse_adam(ADAM_LR)
    taps = {
        form: meprop_jax.compact_tap(
            d_in, d_out, k=k, mode=MODE, batch_shape=(batch,), factored=form == "factored"
        )
        for form in ("compact", "factored")
    }

    def sparse_run_of(name: str, layout: str, tap):
        def sparse_run(carry, xs, gs):
            def body(carry, xg):
                (params, state), dx_sum = carry
                w = params[name]

                def f(x, t, b):
                    return meprop_jax.linear(x, w, b, k=k, mode=MODE, tap=t, kernel_layout=layout)

                dx, tap_grad, db = jax.vjp(f, xg[0], tap, params["bias"])[1](xg[1])
                # dx feeds the layer below in a network, which orders the kernel's update
                # after the backward's reads; alone it needs this (numerically void) term.
                # It reads the running sum, dx's one consumer, as the layer below would be.
                dx_sum = dx_sum + dx
                tap_grad = tap_grad._replace(cols=tap_grad.cols + 0.0 * dx_sum[0, 0])
                with jax.numpy_dtype_promotion("standard"):
                    params, state = opt.update(
                        {name: None, "bias": db}, state, params, {name: tap_grad}
                    )
                return ((params, state), dx_sum), None

            return lax.scan(body, carry, (xs, gs))[0], jnp.zeros(())

        return sparse_run

    dense_params = {"kernel": w, "bias": b}
    zero_dx = lambda: jnp.zeros((batch, d_in), jnp.float32)
    dense_box = Carry(((dense_params, tx.init(dense_params)), zero_dx()))
    _block(dense_box.value)
    compiled = _compile_donated(dense_run, (dense_box.value, xs, gs))
    fns = {"dense+adam": (dense_box.stepper(compiled, xs, gs), ())}
    variants = (
        ("compact", "in_out", "kernel", w),
        ("compact", "out_in", TRANSPOSED_KERNEL, w.T),
        ("factored", "out_in", TRANSPOSED_KERNEL, w.T),
    )
    for form, layout, name, kernel in variants:
        tag = "" if layout == "in_out" else f":{layout}"
        for suffix, path in _paths():
            params = {name: kernel.copy(), "bias": b.copy()}  # each box donates its own
            box = Carry(((params, opt.init(params, {name: taps[form]})), zero_dx()))
            _block(box.value)
            run = sparse_run_of(name, layout, taps[form])
            with path():
                compiled = _compile_donated(run, (box.value, xs, gs))
            fns[f"{MODE}+{form}+sparse_adam{tag}{suffix}"] = (box.stepper(compiled, xs, gs), ())
    per_step = _per_step(time_fns(fns, repeats, warmup), steps)
    k_of = lambda n: 0 if n.startswith("dense") else k
    return _records("layer+update", per_step, "dense+adam", batch, d_in, d_out, k_of)


class _Compact(NamedTuple):
    """An MNIST step on compact gradients: lazy Adam or the authors' rule (``lazy=False``),
    from the block or from factors."""

    lazy: bool
    factored: bool = False


def bench_mnist_steps(
    sizes: Sequence[int], batch: int, k: int, *, steps: int, repeats: int, warmup: int, seed: int
) -> list[Record]:
    """Whole training steps of the MNIST MLP (see the module docstring)."""
    hidden = tuple(sizes[1:-1])

    def model(k: int, layout: str, compact: _Compact | None) -> MLP:
        return MLP(
            hidden=hidden,
            k=k,
            mode=MODE,
            num_classes=sizes[-1],
            sparse_update=compact is not None,
            kernel_layout=layout,
            factored_grad=compact is not None and compact.factored,
        )

    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((steps, batch, sizes[0])), jnp.float32)
    ys = jnp.asarray(rng.integers(0, sizes[-1], (steps, batch)), jnp.int32)
    tx = loop.make_optimizer("adam", ADAM_LR)
    fns = {}
    variants = [("dense", 0, "in_out", None, contextlib.nullcontext)]
    for suffix, path in _paths():
        variants += [
            (f"{MODE}{suffix}", k, "in_out", None, path),
            (f"{MODE}:out_in{suffix}", k, "out_in", None, path),
            (f"{MODE}+compact:out_in{suffix}", k, "out_in", _Compact(lazy=False), path),
            (f"{MODE}+factored:out_in{suffix}", k, "out_in", _Compact(False, True), path),
            (f"{MODE}+sparse{suffix}", k, "in_out", _Compact(lazy=True), path),
            (f"{MODE}+sparse:out_in{suffix}", k, "out_in", _Compact(lazy=True), path),
            (f"{MODE}+sparse+factored:out_in{suffix}", k, "out_in", _Compact(True, True), path),
        ]
    if native.enabled():
        variants.append((NATIVE_ADAM_DENSE, 0, "out_in", None, contextlib.nullcontext))
    for label, kk, layout, compact, path in variants:
        m = model(kk, layout, compact)
        variables = jax.jit(m.init, static_argnums=2)(jax.random.key(seed), xs[0], False)
        params = variables["params"]
        if label == NATIVE_ADAM_DENSE:
            run, init = _native_adam_train_scan(m, len(hidden))
            box = Carry(init(params))
        elif compact is not None:
            box = Carry(
                train_state.TrainState.create(
                    apply_fn=m.apply,
                    params=params,
                    taps=variables[optim.TAP_COLLECTION],
                    tx=loop.make_sparse_optimizer("adam", ADAM_LR, lazy=compact.lazy),
                )
            )
            run = _compact_train_scan()
        else:
            box, run = Carry((params, tx.init(params))), _train_scan(m, tx)
        with path():
            compiled = _compile_donated(run, (box.value, xs, ys))
        fns[label] = (box.stepper(compiled, xs, ys), ())
    per_step = _per_step(time_fns(fns, repeats, warmup), steps)
    k_of = lambda n: 0 if n in ("dense", NATIVE_ADAM_DENSE) else k
    extra = {"sizes": list(sizes), "steps_per_call": steps}
    return _records("mnist", per_step, "dense", batch, sizes[0], sizes[1], k_of, extra)


def _native_adam_train_scan(
    model: MLP, hidden: int
) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    """``((params, opt_state, count, moments), xs, ys) -> (state, loss sum)``: dense steps of
    ``model`` (kernels ``[out, in]``) in which the ``hidden`` layers' kernels take the native
    non-lazy Adam pass (:func:`meprop_jax._src.fused.update_rows`, every row given), with the
    step ``count`` and their moments ``{layer: [mu, nu]}``, and the rest ``optax.adam``; and
    ``params -> state``, the state to start from."""
    rule = fused.AdamRule(ADAM_LR, 0.9, 0.999, 1e-8, None)
    tx = optax.adam(ADAM_LR)
    names = [f"hidden_{i}" for i in range(hidden)]

    def split(tree):
        rest = {name: dict(layer) for name, layer in tree.items()}
        return {name: rest[name].pop(TRANSPOSED_KERNEL) for name in names}, rest

    def loss_fn(params, x, y):
        return _cross_entropy(model.apply({"params": params}, x, True), y)

    def body(carry, xy):
        params, opt_state, count, moments = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *xy)
        kernels, rest = split(params)
        kernel_grads, rest_grads = split(grads)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(rest_grads, opt_state, rest)
        rest = optax.apply_updates(rest, updates)
        count = count + 1
        new_moments = {}
        for name in names:
            rows = jnp.arange(kernels[name].shape[0], dtype=jnp.int32)
            grad = (kernel_grads[name], rows)
            kernel, mu, nu = fused.update_rows(
                rule, count, kernels[name], *moments[name], grad, lazy=False
            )
            rest[name][TRANSPOSED_KERNEL], new_moments[name] = kernel, [mu, nu]
        return (rest, opt_state, count, new_moments), loss

    def run(carry, xs, ys):
        carry, losses = lax.scan(body, carry, (xs, ys))
        return carry, jnp.sum(losses)

    def init(params):
        kernels, rest = split(params)
        zeros = {name: [jnp.zeros_like(k), jnp.zeros_like(k)] for name, k in kernels.items()}
        return params, tx.init(rest), jnp.zeros((), jnp.int32), zeros

    return run, init


def bench_per_example(*, quick: bool, repeats: int, warmup: int, seed: int) -> list[Record]:
    """Every group of the section (see the module docstring)."""
    steps = QUICK_STEPS if quick else STEPS
    common = dict(steps=steps, repeats=repeats, warmup=warmup)
    records: list[Record] = []
    for i, (batch, d_in, d_out, k) in enumerate(QUICK_LAYER_SHAPES if quick else LAYER_SHAPES):
        records += bench_gates(
            batch, (d_in,), d_out, (k,), 1, seed=seed + i, section="layer", **common
        )
        records += bench_layer_update(batch, d_in, d_out, k, seed=seed + i, **common)
    for batch, h, ks in QUICK_LSTM_SHAPES if quick else LSTM_SHAPES:
        records += bench_gates(batch, (h, h), 4 * h, ks, 4, seed=seed, section="lstm", **common)
    sizes, batch, k = QUICK_MNIST_CONFIG if quick else MNIST_CONFIG
    records += bench_mnist_steps(sizes, batch, k, seed=seed, **common)
    parser = dict(common, steps=QUICK_STEPS if quick else PARSER_STEPS)
    for batch, d_in, d_out, k in QUICK_PARSER_SHAPES if quick else PARSER_SHAPES:
        records += bench_gates(
            batch, (d_in,), d_out, (k,), 1, seed=seed, section="parser", **parser
        )
    return records


def format_per_example(records: Sequence[Record]) -> str:
    """One line per row: group, shape, k, variant, median and min µs per step, ratio."""
    lines = [f"{'group':<13}{'shape':<16}{'variant':<49}{'us/step':>9}{'min':>9}{'vs dense':>10}"]
    for r in records:
        shape = f"{r.batch}x{r.d_in}->{r.d_out}"
        lines.append(
            f"{r.section:<13}{shape:<16}{r.mode:<49}{1e3 * r.median_ms:>9.1f}"
            f"{1e3 * r.min_ms:>9.1f}{r.ratio_vs_dense:>9.2f}x"
        )
    return "\n".join(lines)
