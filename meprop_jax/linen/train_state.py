"""A Linen train state that takes compact, column-sparse meProp steps without handling taps.

:class:`TrainState` is in the style of ``flax.training.train_state.TrainState``. It owns the
``"meprop_taps"`` collection of the model's ``sparse_update=True`` layers (see
:mod:`meprop_jax.optim`), the model's other collections (``batch_stats``, ``mesimp``, ...) and
an optax optimizer lifted to compact gradients (``optim.compact(tx)``; a plain optax
transformation is lifted for you): :meth:`TrainState.value_and_grad` differentiates a loss with
respect to the parameters and the taps, and :meth:`TrainState.apply_gradients` updates the
selected kernel columns only. The step is exactly ``optim.value_and_compact_grad`` followed by
the lifted optimizer's ``update``.

Example (a model with BatchNorm: its statistics live in ``state.collections``)::

    import functools, jax, optax
    from meprop_jax import TrainState

    model = CNN(...)  # meprop_jax.Dense(features, k=k, sparse_update=True) layers, BatchNorm
    state = TrainState.create(
        apply_fn=model.apply, params=model.init(key, x_batch), tx=optax.adam(1e-3)
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        def loss_fn(variables):
            logits, updates = state.apply_fn(variables, x, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates

        (loss, updates), grads = state.value_and_grad(loss_fn, has_aux=True)
        state = state.apply_gradients(grads=grads, collections={**state.collections, **updates})
        return state, loss
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from meprop_jax import optim

PyTree = Any

__all__ = ["TrainState"]


class TrainState(struct.PyTreeNode):
    """Parameters, taps, other collections and optimizer state of a model with compact gradients.

    Attributes:
      step: number of updates applied.
      apply_fn: the model's ``apply``; not a pytree leaf.
      params: the ``"params"`` collection.
      taps: the ``"meprop_taps"`` collection (zero :class:`meprop_jax.CompactGrad` taps; their
        values never change), or ``{}`` for a model without ``sparse_update`` layers.
      collections: every other collection of ``model.init`` (``"batch_stats"``, ``"mesimp"``,
        ``"meprop_memory"``, ...), by name; :meth:`variables` passes them to ``apply_fn``.
        The state does not change them itself: pass their new values to
        :meth:`apply_gradients` (``collections={**state.collections, **updates}``).
      tx: a :class:`meprop_jax.optim.SparseOptimizer` (``optim.compact(...)``); not a pytree
        leaf.
      opt_state: its state.
    """

    step: jax.Array | int
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    params: PyTree
    taps: PyTree
    tx: optim.SparseOptimizer = struct.field(pytree_node=False)
    opt_state: optim.SparseState
    collections: PyTree = struct.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: PyTree,
        tx: optim.SparseOptimizer | optax.GradientTransformation | optax.MultiSteps,
        taps: PyTree = None,
        collections: Mapping[str, PyTree] | None = None,
    ) -> TrainState:
        """A fresh state.

        Args:
          apply_fn: the model's ``apply``.
          params: the ``"params"`` collection, or the whole result of ``model.init`` (a
            mapping with ``"params"``, for ``sparse_update`` layers ``"meprop_taps"``, and any
            other collections, which go to ``collections``).
          tx: an optax transformation (or ``optax.MultiSteps``), lifted with
            :func:`meprop_jax.optim.compact`, or an already lifted one.
          taps: the ``"meprop_taps"`` collection, when ``params`` is the parameters only.
          collections: the other collections, when ``params`` is the parameters only.

        Raises:
          TypeError: if ``tx`` is not an optimizer, or taps or collections are given twice.
        """
        tx = optim.compact(tx)
        if isinstance(params, Mapping) and "params" in params:
            rest = {name: c for name, c in params.items() if name != "params"}
            if taps is not None and optim.TAP_COLLECTION in rest:
                raise TypeError("taps given twice: in params (from model.init) and as taps=")
            if taps is None:
                taps = rest.get(optim.TAP_COLLECTION, {})
            rest.pop(optim.TAP_COLLECTION, None)
            if collections is not None and rest:
                raise TypeError(
                    f"collections given twice: {sorted(rest)} in params (from model.init) and "
                    "as collections="
                )
            collections = rest if collections is None else collections
            params = params["params"]
        taps = {} if taps is None else taps
        return cls(
            step=jnp.zeros([], jnp.int32),
            apply_fn=apply_fn,
            params=params,
            taps=taps,
            tx=tx,
            opt_state=tx.init(params, taps),
            collections=dict(collections or {}),
        )

    def variables(self, params: PyTree = None, taps: PyTree = None) -> dict[str, PyTree]:
        """The variables for ``apply_fn``: params, taps and the other collections.

        ``params`` and ``taps`` default to the state's own.
        """
        params = self.params if params is None else params
        taps = self.taps if taps is None else taps
        variables = {**self.collections, "params": params}
        if taps:
            variables[optim.TAP_COLLECTION] = taps
        return variables

    def value_and_grad(
        self, loss_fn: Callable[..., Any], *args: Any, has_aux: bool = False, **kwargs: Any
    ) -> tuple[Any, tuple[PyTree, PyTree]]:
        """The loss and its compact gradients, ready for :meth:`apply_gradients`.

        Args:
          loss_fn: ``loss_fn(variables, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
            ``has_aux``); it applies the model as ``apply_fn(variables, ...)``, where
            ``variables`` holds the parameters, the taps and the other collections.
          *args: passed to ``loss_fn``.
          has_aux: as in ``jax.value_and_grad``.
          **kwargs: passed to ``loss_fn``.

        Returns:
          ``(value, (grads, tap_grads))`` as :func:`meprop_jax.optim.value_and_compact_grad`
          gives them: ``grads`` is ``None`` at every tapped kernel (never differentiated).
        """

        def split_loss(params, taps, *args, **kwargs):
            return loss_fn(self.variables(params, taps), *args, **kwargs)

        return optim.value_and_compact_grad(split_loss, has_aux)(
            self.params, self.taps, *args, **kwargs
        )

    def apply_gradients(self, *, grads: tuple[PyTree, PyTree], **kwargs: Any) -> TrainState:
        """One optimizer step on ``grads = (grads, tap_grads)`` from :meth:`value_and_grad`.

        Only the selected columns of tapped kernels (and of their optimizer state) change;
        every other leaf is updated densely. ``kwargs`` replace other fields, as in Flax (e.g.
        ``collections=`` with the model's updated statistics).
        """
        param_grads, tap_grads = grads
        params, opt_state = self.tx.update(
            param_grads, self.opt_state, self.params, tap_grads if self.taps else None
        )
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)
