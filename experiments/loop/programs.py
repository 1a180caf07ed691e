"""The jitted programs of a run (training chunks, evaluation, timing probes), keys, sharding.

Randomness
----------
Every random number derives from ``seed`` through ``jax.random.fold_in``: the parameters
from ``(seed, 0)``, the epoch ``e`` shuffle, step keys and chunk order from ``(seed, 2, e)``.
Nothing depends on how many epochs ran in the current process, so a run that is
interrupted and resumed gives the same results as an uninterrupted one.

Compact (column-sparse) updates: ``--sparse-update``
----------------------------------------------------
By default a step is the authors' semantics: autodiff hands the optimizer a dense ``[in, out]``
weight gradient that is zero outside the selected columns, and a stock optax optimizer
(:func:`experiments.loop.config.make_optimizer`) updates every weight. With ``sparse_update``
the step instead takes the meProp kernels' gradients compact and updates only their selected
columns through :class:`meprop_jax.TrainState` (``value_and_grad``, ``apply_gradients``), with
the column-sparse twin of ``--optimizer`` (:func:`experiments.loop.config.make_sparse_optimizer`:
lazy Adam, AdaGrad, SGD; ``--clip`` applies), so the update costs O(k) rather than O(out) per
kernel. The task must then build its meProp layers with ``meprop_jax.Dense(...,
sparse_update=True)`` and ``Task.init`` must return Flax variables ``{"params": ...,
"meprop_taps": ...}`` (what ``model.init`` gives). The zero taps are part of
:class:`~experiments.loop.task.TrainState` (``taps``) but never saved: a checkpoint holds the
same ``{"params", "opt_state"}`` as ever, and ``--resume`` rebuilds the taps from the task. A
task whose model has no tap is refused with a :class:`ConfigError` before training (no silent
dense run). The timing probes (b) and (c) then run the compact step too, so ``update_s``
shows the column-sparse update.

Error feedback
--------------
When ``Task.init`` returns Flax variables with a ``"meprop_memory"`` collection (layers built
with ``meprop_jax.Dense(..., feedback=decay)``), the memory is part of ``params`` but not of the
optimizer: each step replaces it by its gradient, which is the next memory
(:mod:`meprop_jax.feedback`). It is saved in checkpoints with the parameters.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.common import require
from experiments.loop import distributed
from experiments.loop.config import check_divisible
from experiments.loop.indexed import gathered, index_shape, minibatch
from experiments.loop.task import Array, Batch, IndexedGroup, Task, TrainState
from meprop_jax import feedback, optim, train_state

_AUTO_CHUNKS = 10  # chunks per epoch when chunk_steps is 0: enough for a progress bar
KEY_INIT, KEY_EVAL, KEY_EPOCH = 0, 1, 2  # fold_in tags of the root key
KEY_SHUFFLE, KEY_STEPS, KEY_ORDER = 0, 1, 2  # fold_in tags of an epoch key


def epoch_key(seed: int, epoch: int) -> Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), KEY_EPOCH), epoch)


def root_subkey(seed: int, tag: int) -> Array:
    return jax.random.fold_in(jax.random.key(seed), tag)


def numpy_rng(key: Array) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key (host-side shuffles without device work)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_batches(group: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """Moves a group to the devices, splitting the batch axis (axis 1) over ``data`` (on
    several processes, each sends only its own rows). An :class:`IndexedGroup` splits its
    index so and sends its table whole to every device (:func:`put_groups` sends a table once
    per run)."""
    if isinstance(group, IndexedGroup):
        return _put_indexed(group, mesh, put_replicated(group.table, mesh))
    if jax.process_count() > 1:
        return distributed.put_global_batches(group, mesh)
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "data"))), group)


def _put_indexed(group: IndexedGroup, mesh: jax.sharding.Mesh, table: Batch) -> IndexedGroup:
    """``group`` on the devices, ``table`` being its table's copy there."""
    return IndexedGroup(table, put_batches(np.asarray(group.index, np.int32), mesh))


def put_groups(groups: Sequence[Batch], mesh: jax.sharding.Mesh, tables: dict) -> list[Batch]:
    """An epoch's training groups on the devices (:func:`put_batches`), each table sent once.

    ``tables`` (``id(table) -> (table, device copy)``, kept by the caller across epochs)
    holds the tables sent before: a table the task returns again (the same object) is not
    sent again, and the tables these groups do not use are let go, so that a task that makes
    new tables every epoch does not keep the old ones on the devices.
    """
    kept: dict[int, Any] = {}
    on_devices = []
    for group in groups:
        if not isinstance(group, IndexedGroup):
            on_devices.append(put_batches(group, mesh))
            continue
        entry = kept.get(id(group.table)) or tables.get(id(group.table))
        if entry is None or entry[0] is not group.table:
            entry = (group.table, put_replicated(group.table, mesh))
        kept[id(group.table)] = entry
        on_devices.append(_put_indexed(group, mesh, entry[1]))
    tables.clear()
    tables.update(kept)
    return on_devices


def group_steps(group: Batch) -> int:
    if isinstance(group, IndexedGroup):
        return int(index_shape(group)[0])
    leaves = jax.tree.leaves(group)
    if not leaves:
        raise ValueError("a batch group has no arrays")
    shapes = {np.shape(a)[:2] for a in leaves}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"every leaf of a batch group must be [steps, batch, ...] with equal steps and "
            f"batch; got leading shapes {sorted(shapes)}"
        )
    return int(next(iter(shapes))[0])


def batch_size(group: Batch) -> int:
    """The size of a group's batch axis (axis 1)."""
    if isinstance(group, IndexedGroup):
        return int(index_shape(group)[1])
    return int(np.shape(jax.tree.leaves(group)[0])[1])


def check_group_batches(groups: Sequence[Batch], devices: int) -> None:
    for group in groups:
        check_divisible(batch_size(group), devices)


def chunk_plan(
    steps: Sequence[int], chunk_steps: int, order_key: Array
) -> list[tuple[int, int, int]]:
    """``(group, start, length)`` chunks covering every group's steps.

    With several groups the chunks are interleaved in a random order, so that a tagger does
    not see all its short sentences before its long ones.
    """
    total = sum(steps)
    size = chunk_steps or max(1, math.ceil(total / _AUTO_CHUNKS))
    plan = [
        (g, start, min(size, n - start)) for g, n in enumerate(steps) for start in range(0, n, size)
    ]
    if len(steps) > 1:
        plan = [plan[i] for i in numpy_rng(order_key).permutation(len(plan))]
    return plan


def _optimizer_update(tx: Any, grads, opt_state, params):
    # optax mixes Python floats and int32 step counts (Adam's bias correction), which strict
    # dtype promotion rejects; the update is computed in float32 either way.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def _aux_value(aux: Mapping[str, Array], name: str) -> Array:
    if name not in aux:
        raise KeyError(f"Task.loss_fn must return aux with {name!r}; got {sorted(aux)}")
    return jnp.asarray(aux[name], jnp.float32)


class Programs:
    """The jitted programs of one run, built around a task's loss and an optimizer.

    ``tx`` is an optax optimizer (the masked dense gradient) or, for ``sparse_update``, a
    :class:`meprop_jax.optim.SparseOptimizer`, whose steps differentiate compactly.
    """

    #: Programs whose first argument (the training state) is donated: the scatters of the
    #: column-sparse updates then write into the state's own buffers.
    _DONATE: Mapping[str, tuple[int, ...]] = {"train_chunk": (0,)}

    def __init__(
        self,
        loss_fn: Callable,
        tx: Any,
        state: StateHooks | None = None,
        compiler_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.compiler_options = without_xla_flags(compiler_options or {})
        self.tx = tx
        self.compact = isinstance(tx, optim.SparseOptimizer)
        self.state = state
        self._compiled: dict[Any, Any] = {}

    def _grad(self, params, taps, batch, key):
        """``((loss, aux), grads)``; compact: ``grads = (param grads, tap grads)``, with None
        for every kernel that has a tap (see ``optim.value_and_compact_grad``); with model
        state: ``grads = (grads of the trainable variables, the next model state)``."""
        if self.state is not None:
            return self._stateful_grad(params, batch, key)
        if not self.compact:
            return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, key, True)

        def loss(variables):
            # The state's "params" are the task's variables, its taps {"params": collection}.
            taps = variables[optim.TAP_COLLECTION]["params"]
            tapped = {**variables["params"], optim.TAP_COLLECTION: taps}
            return self.loss_fn(tapped, batch, key, True)

        return self._compact_state(params, taps).value_and_grad(loss, has_aux=True)

    def _compact_state(self, params, taps, opt_state=None) -> train_state.TrainState:
        """A :class:`meprop_jax.TrainState` over the loop's compact state: its ``params`` are
        the task's variables without the taps and its ``taps`` ``{"params": <the
        "meprop_taps" collection>}``, the layout of :class:`TrainState`, so that the optimizer
        state (and the checkpoints) keep theirs."""
        return train_state.TrainState(
            step=0, apply_fn=self.loss_fn, params=params, taps=taps, tx=self.tx, opt_state=opt_state
        )

    def _stateful_grad(self, variables, batch, key):
        """Differentiates the trainable variables and the task's zero taps, and folds the
        taps' cotangents into the model state (see :class:`StateHooks`)."""
        trainable, model_state = split_state(variables, self.state.collections)
        taps = self.state.taps(model_state)

        def loss(trainable, taps):
            return self.loss_fn({**trainable, **model_state, **taps}, batch, key, True)

        value, (grads, tap_grads) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            trainable, taps
        )
        return value, (grads, self.state.fold(model_state, tap_grads))

    def _step(self, state: TrainState, batch, key):
        (loss, aux), grads = self._grad(state.params, state.taps, batch, key)
        params, model_state, tap_grads = state.params, None, None
        if self.compact:
            grads, tap_grads = grads
        elif self.state is not None:
            grads, model_state = grads
            params, _ = split_state(params, self.state.collections)
        # Error feedback: the memory's gradient is the next memory, not something to descend.
        grads, memory = feedback.split_memory(grads)
        params, _ = feedback.split_memory(params)
        if self.compact:
            # Strict dtype promotion rejects optax's mixed step counts, as in _optimizer_update.
            with jax.numpy_dtype_promotion("standard"):
                compact = self._compact_state(params, state.taps, state.opt_state)
                compact = compact.apply_gradients(grads=(grads, tap_grads))
            params, opt_state = compact.params, compact.opt_state
        else:
            params, opt_state = _optimizer_update(self.tx, grads, state.opt_state, params)
        params = feedback.merge_memory(params, memory)
        if model_state is not None:
            params = {**params, **model_state}
        return TrainState(params, opt_state, state.taps), (loss, _aux_value(aux, "count"))

    def train_chunk(self, state, group, key, start, length):
        """``length`` training steps from ``start``; returns the state and loss sums.

        ``start`` and ``length`` are int32 arrays, not static: one compiled program serves
        every chunk of a group's shape (a remainder chunk costs no compilation of its own).
        """

        def body(i, carry):
            state, loss_sum, count = carry
            batch = minibatch(group, i)
            state, (loss, n) = self._step(state, batch, jax.random.fold_in(key, i))
            return state, loss_sum + loss * n, count + n

        zero = jnp.zeros((), jnp.float32)
        return lax.fori_loop(start, start + length, body, (state, zero, zero))

    def evaluate(self, params, group, key):
        """Sums over a group, in evaluation mode: ``{"loss": loss x count, "correct",
        "count"}`` and every ``correct_<name>`` of the task's aux."""

        def names_of(aux):
            return ("loss", "correct", "count", *sorted(k for k in aux if k.startswith("correct_")))

        group = gathered(group)
        first = jax.tree.map(lambda a: a[0], group)
        shapes = jax.eval_shape(lambda b: self.loss_fn(params, b, key, False), first)
        names = names_of(shapes[1])

        def body(acc, batch):
            loss, aux = self.loss_fn(params, batch, key, False)
            count = _aux_value(aux, "count")
            values = [_aux_value(aux, k) for k in names[3:]]
            return acc + jnp.stack([loss * count, _aux_value(aux, "correct"), count, *values]), None

        total, _ = lax.scan(body, jnp.zeros(len(names), jnp.float32), group)
        return {name: total[i] for i, name in enumerate(names)}

    def probe_forward(self, params, group, key, *, n: int):
        """Timing probe (a): forward + loss over the first ``n`` minibatches."""

        def body(acc, xs):
            batch, i = xs
            loss, _ = self.loss_fn(params, batch, jax.random.fold_in(key, i), True)
            return acc + loss, None

        total, _ = lax.scan(body, jnp.zeros((), jnp.float32), _first(group, n))
        return total

    def probe_backward(self, params, taps, group, key, *, n: int):
        """Timing probe (b): forward + backward, gradients summed so none is dead code
        (compact: the ``[K, in]`` blocks and their column indices are summed)."""

        def grads(batch, i):
            return self._grad(params, taps, batch, jax.random.fold_in(key, i))

        def body(acc, xs):
            (loss, _), g = grads(*xs)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], g)), None

        xs = _first(group, n)
        if self.compact or self.state is not None:
            shapes = jax.eval_shape(grads, *jax.tree.map(lambda a: a[0], xs))[1]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
        total, _ = lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
        return total

    def probe_step(self, state, group, key, *, n: int):
        """Timing probe (c): full training steps (the new state is thrown away)."""

        def body(state, xs):
            batch, i = xs
            state, (loss, _) = self._step(state, batch, jax.random.fold_in(key, i))
            return state, loss

        return lax.scan(body, state, _first(group, n))

    def compiled(self, name: str, *args: Any, **static: int) -> tuple[Any, float]:
        """The AOT-compiled program ``name`` for these argument types, and the seconds spent
        compiling it now (0 when it was compiled before)."""
        leaves, treedef = jax.tree.flatten(args)
        signature = tuple(
            (np.shape(x), getattr(x, "dtype", type(x)), _sharding_key(x)) for x in leaves
        )
        key = (name, tuple(sorted(static.items())), treedef, signature)
        if key in self._compiled:
            return self._compiled[key], 0.0
        start = time.perf_counter()
        fn = jax.jit(
            functools.partial(getattr(self, name), **static),
            donate_argnums=self._DONATE.get(name, ()),
        )
        self._compiled[key] = fn.lower(*args).compile(self.compiler_options or None)
        return self._compiled[key], time.perf_counter() - start


def without_xla_flags(options: Mapping[str, Any], flags: str | None = None) -> dict[str, Any]:
    """``options`` less those that ``XLA_FLAGS`` (or ``flags``) sets: the user's flags win."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    return {k: v for k, v in options.items() if not re.search(rf"--{re.escape(k)}(=|\s|$)", flags)}


def _sharding_key(x: Any) -> Any:
    """A hashable stand-in for ``x``'s sharding in which equivalent specs are equal: a
    program's outputs come back as ``P(None, None)`` where its inputs were ``P()``."""
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return sharding
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return (sharding.mesh, tuple(parts))


def init_state(task: Task, tx: Any, key: Array) -> TrainState:
    params = task.init(key)
    if not isinstance(tx, optim.SparseOptimizer):
        hooks = state_hooks(task)
        trainable = params if hooks is None else split_state(params, hooks.collections)[0]
        return TrainState(params, tx.init(feedback.split_memory(trainable)[0]))
    params, taps = _split_taps(params)
    return TrainState(params, tx.init(params, taps), taps)


class StateHooks(NamedTuple):
    """A task's model state: the variable collections it carries from step to step.

    Attributes:
      collections: names of the collections of ``Task.init``'s variables that are model
        state, not trained by the optimizer (``Task.state_collections``).
      taps: ``Task.state_taps``: the zero taps of the current model state (any pytree of
        float arrays, a dict of collections to merge into the variables).
      fold: ``Task.fold_state``: the next model state from the current one and the taps'
        cotangents.
    """

    collections: tuple[str, ...]
    taps: Callable[[Any], Any]
    fold: Callable[[Any, Any], Any]


def state_hooks(task: Task) -> StateHooks | None:
    """The task's :class:`StateHooks`, or None for a task without model state."""
    names = tuple(getattr(task, "state_collections", ()) or ())
    if not names:
        return None
    return StateHooks(names, task.state_taps, task.fold_state)


def split_state(variables: Any, names: Sequence[str]) -> tuple[Any, Any]:
    """``(variables without the collections ``names``, those collections)``."""
    rest = {k: v for k, v in variables.items() if k not in names}
    return rest, {k: variables[k] for k in names if k in variables}


def _split_taps(variables: Any) -> tuple[Any, Any]:
    """``(variables without the taps, {"params": taps})`` (see :class:`TrainState`)."""
    rest = {k: v for k, v in variables.items() if k != optim.TAP_COLLECTION}
    return rest, {"params": variables[optim.TAP_COLLECTION]}


def check_taps(task: Task, key: Array) -> None:
    """Refuses ``sparse_update`` for a task whose initial variables hold no tap."""
    shapes = jax.eval_shape(task.init, key)
    taps = shapes.get(optim.TAP_COLLECTION) if isinstance(shapes, Mapping) else None
    require(
        isinstance(shapes, Mapping) and "params" in shapes and bool(jax.tree.leaves(taps)),
        f"--sparse-update: the {task.name!r} model has no compact-gradient taps (no "
        "meprop_jax.Dense(sparse_update=True) layer with 0 < k < features, or init does not "
        "return Flax variables); use meProp layers or drop --sparse-update",
    )


def _first(group: Batch, n: int) -> tuple[Batch, Array]:
    if isinstance(group, IndexedGroup):
        group = IndexedGroup(group.table, group.index[:n])
    return jax.tree.map(lambda a: a[:n], gathered(group)), jnp.arange(n, dtype=jnp.int32)
