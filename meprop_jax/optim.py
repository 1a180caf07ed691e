"""Optax optimizers lifted to compact meProp kernel gradients: :func:`compact`.

Two update rules are available, and they differ for optimizers with momentum:

* **The authors' rule (the default everywhere in this package).** A meProp layer hands autodiff
  a dense ``[in, out]`` weight gradient that is zero outside the selected columns, and a stock
  optax optimizer updates every weight densely. With Adam, weights whose gradient is zero this
  step still move through their momentum, exactly as in the authors' code (Sun et al. 2017
  feed the masked gradient to an unmodified dense Adam). Nothing here is needed for it:
  ``meprop_jax.Dense(k=...)`` plus any optax optimizer.

* **The compact rule (this module, opt-in).** ``meprop_jax.Dense(..., sparse_update=True)``
  keeps its kernel gradient compact, the selected columns' ``[K, in]`` block and their indices
  (a :class:`CompactGrad` tap gradient), and :func:`compact` runs an optax transformation on
  those columns only: it gathers the selected columns of the kernel and of every
  parameter-shaped leaf of the optimizer state, calls ``tx.update`` on the ``[K, in]`` blocks
  (every other parameter as it is), and scatters the results back. Nothing of size
  ``[in, out]`` is built or swept in the step. The update is **lazy**: unselected columns of
  a compact kernel and of its state do not move, bit for bit. For SGD without momentum and
  AdaGrad a zero gradient moves nothing anyway, so the two rules agree; Adam's, AdamW's,
  RMSProp's and momentum's moments of unselected columns do not decay, and AdamW's weight
  decay shrinks the selected columns only. Step counts are scalars shared by all columns, so
  bias corrections and learning-rate schedules see the global step (as TensorFlow's
  ``LazyAdam`` and PyTorch's ``SparseAdam`` do); with every column selected at every step the
  compact rule is the stock optimizer exactly.

What lifts: a transformation whose state leaves are either scalars (counts) or sit in
subtrees shaped like the parameters (``mu``, ``nu``, ``trace``, ``sum_of_squares``, ...), and
whose update of a column depends on that column and on scalars only: ``optax.adam``, ``adamw``,
``adagrad``, ``sgd`` (with or without momentum), ``rmsprop``, ``clip``, schedules, and chains
of them. ``optax.clip_by_global_norm`` lifts as well: the global norm of the compact blocks is
that of the masked dense gradient, whose other entries are zero. :func:`compact` refuses a
state it cannot split into columns (factored or otherwise reshaped state, such as
``optax.adafactor``'s). Transformations that look at whole parameters or whole updates
(``optax.lamb``, ``lars``, ``scale_by_trust_ratio``, a global-norm clip *after* the optimizer)
have parameter-shaped state or none and cannot be told apart: do not lift them.
``optax.MultiSteps`` is lifted by its own rule (see :func:`compact`).

``update`` returns new parameters, not updates: optax's ``apply_updates`` is a dense add over
every weight, and avoiding exactly that is the point; the kernels' selected columns are
scattered into the parameters instead. Run the step under ``jax.jit`` with the parameters and
the state donated (or inside ``lax.scan``) so that the scatters update the buffers in place.
The state of a kernel given to ``init`` with its tap is stored transposed, ``[out, in]``
(:class:`Transposed`), so that a kernel column is a contiguous row of the state; on a CPU that
makes the state's gathers and scatters several times cheaper.

Compact gradients cannot be added: a tap gradient that is a sum or a mean of several (a layer
applied twice, microbatch gradients added up, ``lax.pmean`` over devices) is correct only
where every summand selected the same columns. ``update`` checks this at run time from the
tap's ``selected`` channel; otherwise that kernel's first ``K`` columns become NaN, or, with
``compact(tx, bad_taps="raise")``, the program stops with an error naming the kernel and the
cause (a host callback that makes every step wait on the host). Accumulate with
``compact(optax.MultiSteps(...))`` instead, and for data parallelism shard the batch under
``jit`` (one global selection) rather than averaging per-device compact gradients from
``shard_map`` or ``pmap`` (each device selects its own columns).

A whole training step::

    from meprop_jax import optim

    model = MLP(...)  # meprop_jax.Dense(features, k=k, sparse_update=True) hidden layers
    variables = model.init(key, x_batch)  # the training batch shape, for per-example taps
    params, taps = variables["params"], variables[optim.TAP_COLLECTION]
    opt = optim.compact(optax.adam(1e-3))
    state = opt.init(params, taps)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state, taps, x, y):
        def loss_fn(params, taps):
            logits = model.apply({"params": params, optim.TAP_COLLECTION: taps}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, (grads, tap_grads) = optim.value_and_compact_grad(loss_fn)(params, taps)
        params, state = opt.update(grads, state, params, tap_grads)
        return params, state, loss
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from meprop_jax._src import accumulate as _accumulate
from meprop_jax._src import compact as _compact
from meprop_jax._src import fused as _fused
from meprop_jax._src.collections import TAP_COLLECTION
from meprop_jax._src.compact import SparseState, Transposed, param_layout
from meprop_jax._src.taps import CompactGrad, FactoredGrad, compact_tap, compact_width

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | Array | Callable[[Array], Array]

__all__ = [
    "TAP_COLLECTION",
    "CompactGrad",
    "FactoredGrad",
    "SparseOptimizer",
    "SparseState",
    "Transposed",
    "compact",
    "compact_tap",
    "compact_width",
    "param_layout",
    "sparse_adagrad",
    "sparse_adam",
    "sparse_sgd",
    "value_and_compact_grad",
]


class SparseOptimizer(NamedTuple):
    """An optax transformation lifted to compact kernel gradients (see :func:`compact`).

    Attributes:
      init: ``init(params, taps=None) -> SparseState``. ``taps`` (the ``"meprop_taps"``
        collection from ``model.init``, or any tree with a :class:`CompactGrad` at each
        kernel's path) marks the kernels that will receive compact gradients, whose state is
        then stored ``[out, in]``; without it every state array has its parameter's layout
        (still correct, with slower column gathers).
      update: ``update(grads, state, params, taps=None) -> (new_params, new_state)``.
        ``grads`` has the structure of ``params``; its entries for kernels that have a tap
        gradient in ``taps`` are ignored (``None`` from :func:`value_and_compact_grad`).
        ``taps`` holds the taps' gradients, :class:`CompactGrad` leaves at the kernels' paths;
        a kernel without one needs a dense gradient in ``grads``.
      tx: the optax transformation (or ``optax.MultiSteps``) it lifts.
    """

    init: Callable[..., SparseState]
    update: Callable[..., tuple[PyTree, SparseState]]
    tx: Any = None


def compact(
    tx: optax.GradientTransformation | optax.MultiSteps,
    *,
    bad_taps: str = "nan",
    lazy: bool = True,
) -> SparseOptimizer:
    """Lifts an optax transformation to compact meProp kernel gradients.

    ``update`` gathers the selected columns of each compact kernel and of every
    parameter-shaped state leaf as ``[K, in]`` rows, runs ``tx.update`` on them (dense
    parameters as they are), and scatters the rows back; scalar state (counts) is ``tx``'s
    own, so schedules and bias corrections see the global step. See the module docstring for
    the lazy semantics and for which transformations lift.

    ``optax.MultiSteps(inner, every_k_schedule=n)`` is lifted as gradient accumulation: each
    mini-step adds its compact block into a ``[out, in]`` accumulator (and marks its columns);
    every ``n``-th step the union of the marked columns (at most ``min(n * K, out)``) is
    gathered, averaged (or summed, ``use_grad_mean=False``) and given to the lifted
    ``inner``, and those accumulator rows are reset. Parameters change on those steps only,
    as with ``optax.MultiSteps`` on dense gradients; with SGD the result is the same. ``n``
    must be an int; ``should_skip_update_fn`` is not supported. Pass the ``MultiSteps`` object
    itself: its ``gradient_transformation()``, alone or in a chain, is refused, since its
    accumulator and whole-tree reset cannot be split into columns.

    ``lazy=False`` keeps the gradients compact but applies the authors' rule: each compact
    gradient is scattered into a masked dense gradient and ``tx`` updates the whole kernel,
    exactly as ``tx`` on the masked gradients of ``Dense(sparse_update=False)``. It saves the
    backward pass's dense ``dW`` only, so use it for optimizers with momentum (for SGD and
    AdaGrad the lazy rule is already the same); :func:`sparse_adam` fuses it into one native
    pass.

    A tap gradient that is a sum or mean of compact gradients with different columns (see the
    module docstring) never updates silently: with ``bad_taps="nan"`` (the default) its
    kernel's first ``K`` columns become NaN, at no cost to a healthy step; with ``"raise"`` the
    program stops with an error naming the kernel and the cause, at the cost of a host
    callback in a conditional, which makes every step wait on the host (use it to find the
    cause of such NaNs).

    Args:
      tx: an ``optax.GradientTransformation``, an ``optax.MultiSteps``, or an already lifted
        :class:`SparseOptimizer` (returned as it is).
      bad_taps: ``"nan"`` or ``"raise"``, see above.
      lazy: ``True`` for the compact rule (only the selected columns move), ``False`` for the
        authors' rule (every weight moves, as with the masked dense gradient).

    Returns:
      a :class:`SparseOptimizer`.

    Raises:
      TypeError: if ``tx`` is none of these.
      ValueError: from ``init``, if ``tx``'s state cannot be split into columns.
    """
    bad_taps = _compact.check_bad_taps(bad_taps)
    if isinstance(tx, SparseOptimizer):
        return tx
    if isinstance(tx, optax.MultiSteps):
        init, update = _accumulate.lift_multi_steps(tx, bad_taps, lazy)
        return SparseOptimizer(init, update, tx)
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            "compact(tx) takes an optax GradientTransformation or optax.MultiSteps, got "
            f"{type(tx).__name__}"
        )
    init, update = _compact.lift(tx, bad_taps, lazy=lazy)
    return SparseOptimizer(init, update, tx)


def sparse_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: float | None = None,
    lazy: bool = True,
) -> SparseOptimizer:
    """Adam on compact gradients: ``compact(optax.adam(...), lazy=lazy)``, after
    ``optax.clip(clip)`` if ``clip`` is set.

    The same optimizer and state as that, and the same updates to float tolerance; but a
    float32 kernel stored ``[out, in]`` (``kernel_layout="out_in"``) on a CPU with the native
    kernels built (see :mod:`meprop_jax._src.native`) is updated by one fused native pass, in
    place: over its selected rows and those of the two moments (lazy Adam), instead of
    gathering them for ``optax.adam`` and scattering them back, which moves about as many
    bytes as dense Adam; or, with ``lazy=False`` (the authors' rule), over every row, with the
    compact gradient read where it is selected and zero elsewhere, so that no dense gradient
    is written or read. ``MEPROP_JAX_NATIVE=0`` turns the fused pass off.
    """
    tx = _clipped(optax.adam(learning_rate, b1, b2, eps), clip)
    rule = _fused.AdamRule(learning_rate, b1, b2, eps, clip)
    return SparseOptimizer(*_compact.lift(tx, "nan", rule, lazy), tx)


def sparse_adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    clip: float | None = None,
) -> SparseOptimizer:
    """``compact(optax.adagrad(...))``, after ``optax.clip(clip)`` when ``clip`` is given.

    A zero gradient changes neither an AdaGrad accumulator nor its weight, so this equals
    ``optax.adagrad`` on the masked dense gradient, without sweeping the unselected columns.
    """
    return compact(_clipped(optax.adagrad(learning_rate, initial_accumulator_value, eps), clip))


def sparse_sgd(learning_rate: ScalarOrSchedule, clip: float | None = None) -> SparseOptimizer:
    """``compact(optax.sgd(learning_rate))``, after ``optax.clip(clip)`` when ``clip`` is given.

    Equal to ``optax.sgd`` on the masked dense gradient.
    """
    return compact(_clipped(optax.sgd(learning_rate), clip))


def _clipped(tx: optax.GradientTransformation, clip: float | None):
    return tx if clip is None else optax.chain(optax.clip(clip), tx)


def value_and_compact_grad(
    loss_fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[Any, tuple[PyTree, PyTree]]]:
    """Like ``jax.value_and_grad`` for ``loss_fn(params, taps, *args, **kwargs)``.

    The returned function gives ``(value, (grads, tap_grads))``: ``grads`` has the structure
    of ``params`` with ``None`` at every kernel that has a tap (those kernels are not
    differentiated at all, so no ``[in, out]`` gradient exists even outside ``jit``), and
    ``tap_grads`` has the structure of ``taps`` with the compact gradients. Both go straight to
    :meth:`SparseOptimizer.update`.

    Args:
      loss_fn: ``loss_fn(params, taps, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``); it applies the model to ``{"params": params, "meprop_taps": taps}``.
      has_aux: as in ``jax.value_and_grad``.
    """

    def wrapped(params, taps, *args, **kwargs):
        compact_keys = _compact.tap_leaves(taps)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        tapped = [_compact._key(path) in compact_keys for path, _ in flat]
        free = [p for (_, p), t in zip(flat, tapped, strict=True) if not t]
        fixed = [p for (_, p), t in zip(flat, tapped, strict=True) if t]

        def merged(free, taps):
            free_it, fixed_it = iter(free), iter(fixed)
            leaves = [next(fixed_it) if t else next(free_it) for t in tapped]
            return loss_fn(treedef.unflatten(leaves), taps, *args, **kwargs)

        value, (g_free, g_taps) = jax.value_and_grad(merged, argnums=(0, 1), has_aux=has_aux)(
            free, taps
        )
        g_it = iter(g_free)
        grads = treedef.unflatten([None if t else next(g_it) for t in tapped])
        return value, (grads, g_taps)

    return wrapped
