"""Compact, column-sparse meProp steps for Flax NNX: :class:`meprop_jax.nnx.Optimizer`.

The NNX counterpart of :class:`meprop_jax.TrainState`. A ``meprop_jax.nnx.Linear(...,
sparse_update=True)`` layer keeps its kernel gradient compact, the selected columns' ``[K, in]``
block and their indices (a :class:`meprop_jax.CompactGrad`), whenever it runs inside
:meth:`Optimizer.value_and_grad`; anywhere else (evaluation, a plain ``nnx.grad``) it is an
ordinary meProp layer. The optimizer builds the zero taps that receive the compact gradients,
differentiates the loss with respect to them and to every other parameter (never the tapped
kernels), and :meth:`Optimizer.update` updates the selected kernel columns only, with an optax
optimizer lifted by :func:`meprop_jax.optim.compact`.

The taps are arguments of the differentiated function, not model state, so the layers need no
batch shape up front: each traced step first runs one abstract call of the loss (no
computation) that finds every tapped layer's input batch shape and kernel dtype, which fix the
taps' widths (see :func:`meprop_jax.optim.compact_width`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import filterlib

from meprop_jax import optim
from meprop_jax._src import selection as _selection
from meprop_jax._src import taps as _taps
from meprop_jax.nnx.layout import kernel_name

Array = jax.Array
PyTree = Any
Path = tuple[Any, ...]

__all__ = ["CompactGrads", "Optimizer"]


# ------------------------------------------------------------------------------ layer side


@dataclasses.dataclass
class _Step:
    """The tapped layers of one differentiated call, by ``id`` of the module object.

    ``taps`` is None during the abstract call that records ``inputs`` (batch shape and kernel
    dtype per layer); afterwards it holds each layer's zero tap.
    """

    paths: dict[int, Path]
    taps: dict[int, _taps.CompactGrad] | None = None
    inputs: dict[int, tuple[tuple[int, ...], jnp.dtype]] = dataclasses.field(default_factory=dict)
    used: set[int] = dataclasses.field(default_factory=set)


_ACTIVE: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("meprop_nnx_step")


def _name(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<model>"


def layer_tap(layer: nnx.Module, inputs: Array, kernel: Array) -> _taps.CompactGrad | None:
    """The tap a ``sparse_update`` layer passes to :func:`meprop_jax.linear`, or None.

    None outside :meth:`Optimizer.value_and_grad` (the layer is then plain meProp) and during
    its abstract call, which records the layer's ``inputs`` batch shape and ``kernel`` dtype.
    """
    step = _ACTIVE.get(None)
    if step is None or id(layer) not in step.paths:
        return None
    key = id(layer)
    if key in step.used:
        raise ValueError(
            f"layer {_name(step.paths[key])!r} (sparse_update=True) was applied twice in one "
            "step: a compact gradient needs exactly one call per step (no weight sharing or "
            "scan over one layer); build it with sparse_update=False"
        )
    step.used.add(key)
    if step.taps is None:
        step.inputs[key] = (tuple(inputs.shape[:-1]), kernel.dtype)
        return None
    return step.taps[key]


@contextlib.contextmanager
def _activate(step: _Step) -> Iterator[_Step]:
    token = _ACTIVE.set(step)
    try:
        yield step
    finally:
        _ACTIVE.reset(token)


def _is_tapped(node: Any) -> bool:
    """A ``meprop_jax.nnx.Linear(sparse_update=True)`` whose backward pass drops columns."""
    return bool(getattr(node, "sparse_update", False)) and not _selection.is_dense(
        node.k, node.out_features
    )


def tapped_layers(model: nnx.Module) -> dict[Path, nnx.Module]:
    """Every ``sparse_update`` layer of ``model`` that keeps compact gradients, by path."""
    return {
        tuple(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and _is_tapped(node)
    }


# ------------------------------------------------------------------------------ optimizer


class CompactGrads(NamedTuple):
    """The gradients of :meth:`Optimizer.value_and_grad`, for :meth:`Optimizer.update`.

    Attributes:
      params: an ``nnx.State`` of the ``wrt`` variables' gradients, without the tapped kernels
        (they are never differentiated, so no ``[in, out]`` kernel gradient exists).
      taps: ``{path: CompactGrad}``, the compact gradient of every tapped kernel, keyed by the
        layer's ``"/"``-joined path in the model (e.g. ``"hidden"``, ``"blocks/0/mlp"``).
    """

    params: nnx.State
    taps: dict[str, _taps.CompactGrad]


def _nested(flat: dict[Path, Any]) -> dict:
    """``{("a", 0): x}`` as the nested dict ``{"a": {0: x}}``, the layout of ``to_pure_dict``."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def _kernel_path(path: Path, layer: nnx.Module) -> Path:
    """The state path of a layer's kernel: ``(*path, "kernel")``, or ``"kernel_t"`` for one
    stored ``[out, in]`` (which the compact optimizers then update row by row)."""
    return (*path, kernel_name(layer))


def _kernel_taps(taps: dict[Path, Any], layers: dict[Path, nnx.Module]) -> dict:
    """Taps (or their gradients) at their kernels' paths, mirroring the parameter dict."""
    return _nested({_kernel_path(path, layers[path]): tap for path, tap in taps.items()})


class Optimizer(nnx.Pytree):
    """A column-sparse optimizer for an NNX model with ``sparse_update`` layers.

    In the style of ``flax.nnx.Optimizer``: it holds the optimizer state of the ``wrt``
    variables and updates the model in place. :meth:`value_and_grad` differentiates a loss
    with compact gradients for every ``meprop_jax.nnx.Linear(..., sparse_update=True)`` layer,
    and :meth:`update` applies ``tx`` (any optax transformation that
    :func:`meprop_jax.optim.compact` lifts, e.g. ``optax.adam(1e-3)`` or
    ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))``), which changes only
    the selected columns of those kernels and of their optimizer state; every other variable
    is updated densely. The step equals the Linen
    :class:`meprop_jax.TrainState`'s on the same model and data.

    A layer with ``kernel_layout="out_in"`` is updated in its ``kernel_t [out, in]``, whose
    selected columns (and those of its optimizer state) are contiguous rows.

    Each ``sparse_update`` layer must be applied once per step (no weight sharing, no scan
    over one layer) by the loss. Run the step under ``nnx.jit`` so that the column updates
    are done in place.

    Attributes:
      step: ``OptState`` uint32, the number of updates made.
      tx: the lifted optimizer (:class:`meprop_jax.optim.SparseOptimizer`).
      opt_state: its state (:class:`meprop_jax.optim.SparseState`), as ``OptState`` variables.
      wrt: the filter of the variables it updates.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from meprop_jax import nnx as mnnx, optim
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.hidden = mnnx.Linear(8, 32, k=4, sparse_update=True, rngs=rngs)
      ...         self.out = nnx.Linear(32, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(nnx.relu(self.hidden(x)))
      >>> model = MLP(nnx.Rngs(0))
      >>> optimizer = mnnx.Optimizer(model, optax.adam(1e-2))
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...     def loss_fn(model):
      ...         logits = model(x)
      ...         return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      ...     loss, grads = optimizer.value_and_grad(model, loss_fn)
      ...     optimizer.update(model, grads)
      ...     return loss
      >>> x, y = jnp.ones((16, 8)), jnp.arange(16) % 3
      >>> kernel = model.hidden.kernel[...]
      >>> loss = train_step(model, optimizer, x, y)
      >>> moved = jnp.any(model.hidden.kernel[...] != kernel, axis=0)  # [32] columns
      >>> int(moved.sum()), int(optimizer.step[...])  # lazy Adam: the k selected columns only
      (4, 1)
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optim.SparseOptimizer | optax.GradientTransformation | optax.MultiSteps,
        *,
        wrt: filterlib.Filter = nnx.Param,
    ):
        """Builds the optimizer state of ``model``'s ``wrt`` variables.

        Args:
          model: the NNX model, with ``meprop_jax.nnx.Linear(..., sparse_update=True)`` layers
            (a model without any is updated densely).
          tx: an optax transformation (or ``optax.MultiSteps``), lifted with
            :func:`meprop_jax.optim.compact`, or an already lifted one.
          wrt: the variables to update (``nnx.Param`` by default); it must include the
            kernels of the ``sparse_update`` layers.

        Raises:
          TypeError: if ``tx`` is not an optimizer.
          ValueError: if ``wrt`` leaves out a ``sparse_update`` layer's kernel, or ``tx``
            cannot be lifted.
        """
        tx = optim.compact(tx)
        self.tx = tx
        self.wrt = wrt
        layers = tapped_layers(model)
        self.tapped = tuple(layers)
        params = nnx.to_pure_dict(nnx.state(model, wrt))
        taps = _kernel_taps(
            {path: _taps.CompactGrad(*(jnp.zeros(()),) * 3) for path in self.tapped}, layers
        )
        try:
            state = tx.init(params, taps)
        except ValueError as error:
            if "match no parameter" not in str(error):
                raise
            raise ValueError(  # a tap with no parameter: wrt leaves out its kernel
                f"meprop_jax.nnx.Optimizer: wrt={wrt!r} must include the kernels of the "
                f"sparse_update layers {[_name(p) for p in self.tapped]}"
            ) from error
        self.step = nnx.training.optimizer.OptState(jnp.zeros([], jnp.uint32))
        self.opt_state = nnx.data(jax.tree.map(nnx.training.optimizer.OptArray, state))

    def _check_model(self, model: nnx.Module) -> dict[Path, nnx.Module]:
        layers = tapped_layers(model)
        if tuple(layers) != self.tapped:
            raise ValueError(
                "meprop_jax.nnx.Optimizer: the model's sparse_update layers "
                f"{[_name(p) for p in layers]} are not those it was built with "
                f"{[_name(p) for p in self.tapped]}"
            )
        return layers

    def value_and_grad(
        self,
        model: nnx.Module,
        loss_fn: Callable[..., Any],
        *args: Any,
        has_aux: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, CompactGrads]:
        """The loss and its compact gradients, ready for :meth:`update`.

        Like ``nnx.value_and_grad(loss_fn)(model, *args, **kwargs)`` over the ``wrt``
        variables, except that every ``sparse_update`` layer's kernel gradient is compact.
        Updates the model makes to other variables (RNG streams, statistics) are kept, as
        ``nnx.value_and_grad`` keeps them.

        Args:
          model: the model the optimizer was built for.
          loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
            ``has_aux``); it must apply every ``sparse_update`` layer exactly once.
          *args: passed to ``loss_fn``.
          has_aux: as in ``nnx.value_and_grad``.
          **kwargs: passed to ``loss_fn``.

        Returns:
          ``(value, grads)``, ``grads`` a :class:`CompactGrads`.

        Raises:
          ValueError: if a ``sparse_update`` layer is applied twice or not at all.
        """
        layers = self._check_model(model)
        shapes = self._probe(model, loss_fn, args, kwargs)
        taps = {
            _name(path): _taps.compact_tap(
                layer.in_features,
                layer.out_features,
                k=layer.k,
                mode=layer.mode,
                batch_shape=shapes[path][0],
                dtype=shapes[path][1],
                factored=getattr(layer, "factored_grad", False),
            )
            for path, layer in layers.items()
        }
        kernels = {_kernel_path(path, layer) for path, layer in layers.items()}
        free = nnx.All(self.wrt, nnx.Not(lambda path, _: tuple(path) in kernels))

        def tapped_loss(model, taps):
            inner = tapped_layers(model)  # the transform's copy of the model
            paths = {id(node): path for path, node in inner.items()}
            step = _Step(paths, {id(node): taps[_name(p)] for p, node in inner.items()})
            with _activate(step):
                return loss_fn(model, *args, **kwargs)

        grad_fn = nnx.value_and_grad(
            tapped_loss, argnums=(nnx.DiffState(0, free), 1), has_aux=has_aux
        )
        value, (param_grads, tap_grads) = grad_fn(model, taps)
        return value, CompactGrads(param_grads, tap_grads)

    def _probe(self, model, loss_fn, args, kwargs) -> dict[Path, tuple[tuple[int, ...], Any]]:
        """Each tapped layer's input batch shape and kernel dtype, from an abstract call."""
        if not self.tapped:
            return {}
        graphdef, state = nnx.split(model)
        found: dict[Path, tuple[tuple[int, ...], Any]] = {}

        def call(state):
            copy = nnx.merge(graphdef, state)  # a copy: the model's RNG streams do not move
            paths = {id(node): path for path, node in tapped_layers(copy).items()}
            with _activate(_Step(paths)) as step:
                loss_fn(copy, *args, **kwargs)
            found.update({paths[key]: shape for key, shape in step.inputs.items()})

        jax.eval_shape(call, state)
        missing = [_name(p) for p in self.tapped if p not in found]
        if missing:
            raise ValueError(
                f"the loss does not apply the sparse_update layers {missing}: each one must "
                "run exactly once per step (their compact gradients would be meaningless)"
            )
        return found

    def update(self, model: nnx.Module, grads: CompactGrads) -> None:
        """Applies one optimizer step to ``model``'s ``wrt`` variables, in place.

        Args:
          model: the model the optimizer was built for.
          grads: the :class:`CompactGrads` of :meth:`value_and_grad`.

        Raises:
          TypeError: if ``grads`` did not come from :meth:`value_and_grad`.
        """
        if not isinstance(grads, CompactGrads):
            raise TypeError(
                "meprop_jax.nnx.Optimizer.update takes the gradients of its value_and_grad "
                f"(CompactGrads), got {type(grads).__name__}: a plain nnx.grad has no compact "
                "kernel gradients"
            )
        layers = self._check_model(model)
        names = {_name(p): p for p in self.tapped}
        if set(grads.taps) != set(names):
            raise ValueError(
                f"compact gradients for {sorted(grads.taps)}, expected {sorted(names)}: pass "
                "the gradients of this optimizer's value_and_grad for this model"
            )
        state = nnx.state(model, self.wrt)
        params = nnx.to_pure_dict(state)
        opt_state = jax.tree.map(lambda v: v[...], self.opt_state, is_leaf=_is_variable)
        new_params, new_opt_state = self.tx.update(
            nnx.to_pure_dict(nnx.state(grads.params, self.wrt)),
            opt_state,
            params,
            _kernel_taps({names[n]: tap for n, tap in grads.taps.items()}, layers)
            if names
            else None,
        )
        nnx.replace_by_pure_dict(state, new_params)
        nnx.update(model, state)
        jax.tree.map(
            lambda v, new: v.set_value(new), self.opt_state, new_opt_state, is_leaf=_is_variable
        )
        self.step[...] += 1


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)
