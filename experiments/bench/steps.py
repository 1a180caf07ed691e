"""Section ``steps``: whole training steps of the MNIST MLP.

Times whole training steps of :class:`experiments.common.models.MLP` (the model the MNIST
experiment trains) with the training loop's optimizers: ``dense`` (k = 0,
optax Adam), ``meprop`` (masked dense gradient, optax Adam), ``meprop+sparse``
(``--sparse-update``: compact gradients, lazy ``sparse_adam``, a ``meprop_jax.TrainState``),
``meprop+feedback`` (``--error-feedback``: the hidden layers' memories fed back, optax Adam)
and ``forward`` (loss only).
Each call runs ``steps`` minibatches in one ``lax.scan`` on a donated state, like a chunk of the
loop; times are per step. The dense step time over the forward time is the bound on any
backward-side saving (``bound``); ``of bound`` is a variant's speedup divided by it.
``<variant>:fwd+bwd`` rows time forward + backward with the gradients summed (the loop's
probe (b)), so ``update = step - fwd+bwd``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from experiments import loop
from experiments.bench.harness import (
    ADAM_LR,
    FORWARD,
    Carry,
    Live,
    Record,
    Stats,
    _block,
    _compile_donated,
    _copy,
    _record,
    memory_stats,
    paired_ratio,
    time_fns,
)
from experiments.common.models import MLP
from meprop_jax import feedback, optim, train_state

# (layer sizes, batch, k, minibatches per timed call). The first is the paper's MNIST MLP,
# the second the large acceptance case.
STEP_CONFIGS: tuple[tuple[tuple[int, ...], int, int, int], ...] = (
    ((784, 500, 500, 10), 50, 30, 200),
    ((784, 4096, 4096, 10), 256, 32, 5),
)
QUICK_STEP_CONFIGS: tuple[tuple[tuple[int, ...], int, int, int], ...] = (
    ((16, 32, 32, 10), 8, 4, 3),
)
STEP_VARIANTS: tuple[str, ...] = ("dense", "meprop", "meprop+sparse", "meprop+feedback")
FEEDBACK_DECAY = 1.0  # pure error feedback: the costliest memory, never a no-op
_UPDATES = {
    "dense": "adam",
    "meprop": "adam",
    "meprop+sparse": "sparse_adam",
    "meprop+feedback": "adam",
}
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


def _feedback_train_scan(model: Any, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``((params, opt_state, memory), xs, ys) -> (state, loss sum)``: the steps of
    :func:`_train_scan` with error feedback; the memory's gradient is the next memory, as in
    the loop's ``--error-feedback`` step."""

    def loss_fn(params, memory, x, y):
        variables = {"params": params, feedback.MEMORY_COLLECTION: memory}
        return _cross_entropy(model.apply(variables, x, True), y)

    def body(carry, xy):
        params, opt_state, memory = carry
        loss, (grads, memory) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, memory, *xy)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return (params, opt_state, memory), loss

    def run(carry, xs, ys):
        carry, losses = lax.scan(body, carry, (xs, ys))
        return carry, jnp.sum(losses)

    return run


def _compact_loss(model: Any) -> Callable[..., jax.Array]:
    def loss_fn(params, taps, x, y):
        logits = model.apply({"params": params, optim.TAP_COLLECTION: taps}, x, True)
        return _cross_entropy(logits, y)

    return loss_fn


def _compact_train_scan() -> Callable[..., Any]:
    """``(state, xs, ys) -> (state, loss sum)`` for a :class:`meprop_jax.TrainState`: compact
    gradients and the column-sparse update, as ``--sparse-update`` trains."""

    def run(state, xs, ys):
        def body(state, xy):
            x, y = xy
            loss, grads = state.value_and_grad(
                lambda variables: _cross_entropy(state.apply_fn(variables, x, True), y)
            )
            with jax.numpy_dtype_promotion("standard"):
                return state.apply_gradients(grads=grads), loss

        state, losses = lax.scan(body, state, (xs, ys))
        return state, jnp.sum(losses)

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
    sparse_box = Carry(
        train_state.TrainState.create(
            apply_fn=model(k, True).apply, params=_copy(params), taps=_copy(taps), tx=sparse_opt
        )
    )
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
    add("meprop+sparse", _compact_train_scan(), sparse_box, xs, ys)
    if mode == "unified":  # error feedback keeps a memory per column: unified only
        fb_model = MLP(hidden=hidden, k=k, num_classes=sizes[-1], feedback=FEEDBACK_DECAY)
        fb_vars = jax.jit(fb_model.init, static_argnums=2)(jax.random.key(seed), xs[0], False)
        fb_box = Carry((_copy(params), tx.init(params), fb_vars[feedback.MEMORY_COLLECTION]))
        add("meprop+feedback", _feedback_train_scan(fb_model, tx), fb_box, xs, ys)
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
        sparse_params = Live(lambda: sparse_box.value.params)
        add("meprop+sparse" + FWD_BWD, _grad_scan(compact_grad), acc, xs, ys, sparse_params, taps)
        if "meprop+feedback" in fns:

            def feedback_grad(params, memory, x, y):
                def loss(p, m):
                    variables = {"params": p, feedback.MEMORY_COLLECTION: m}
                    return _cross_entropy(fb_model.apply(variables, x, True), y)

                return jax.value_and_grad(loss, argnums=(0, 1))(params, memory)

            acc = Carry(jax.tree.map(jnp.zeros_like, (params, fb_box.value[2])))
            fb_params, fb_memory = Live(lambda: fb_box.value[0]), Live(lambda: fb_box.value[2])
            add(
                "meprop+feedback" + FWD_BWD,
                _grad_scan(feedback_grad),
                acc,
                xs,
                ys,
                fb_params,
                fb_memory,
            )
    fwd = jax.jit(_forward_scan(model(0))).lower(params, xs, ys).compile()
    fns[FORWARD] = (lambda: fwd(dense_box.value[0], xs, ys), ())
    memory[FORWARD] = memory_stats(fwd, data)

    stats = time_fns(fns, repeats, warmup)
    per_step = {
        name: Stats.from_seconds([t / 1e3 / steps for t in s.times_ms]) for name, s in stats.items()
    }
    dense = per_step["dense"]
    bound = paired_ratio(dense, per_step[FORWARD])

    def record(name: str) -> Record:
        s = per_step[name]
        variant = name.split(":")[0]
        speedup = paired_ratio(dense, s)
        extra: dict[str, Any] = {
            "sizes": list(sizes),
            "steps_per_call": steps,
            "memory": memory[name],
            "bound": bound,
            "update": _UPDATES.get(variant),
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
        return _record("steps", batch, sizes[0], sizes[1], row_k, name, "float32", s, dense, extra)

    names = [v for v in STEP_VARIANTS if v in fns]
    names += [v + FWD_BWD for v in STEP_VARIANTS if v + FWD_BWD in fns]
    return [record(n) for n in (*names, FORWARD)]
