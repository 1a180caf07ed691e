"""A Linen train state that takes compact, column-sparse meProp steps without handling taps.

:class:`TrainState` is in the style of ``flax.training.train_state.TrainState``. It owns the
``"meprop_taps"`` collection of the model's ``sparse_update=True`` layers (see
:mod:`meprop_jax.optim`) and a column-sparse optimizer (``optim.sparse_adam``, ...):
:meth:`TrainState.value_and_grad` differentiates a loss with respect to the parameters and the
taps, and :meth:`TrainState.apply_gradients` updates the selected kernel columns only. The step
is exactly ``optim.value_and_compact_grad`` followed by the optimizer's ``update``.

Example::

    import functools, jax, optax
    from meprop_jax import optim, train_state

    model = MLP(...)  # meprop_jax.Dense(features, k=k, sparse_update=True) hidden layers
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(key, x_batch), tx=optim.sparse_adam(1e-3)
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        def loss_fn(variables):
            logits = state.apply_fn(variables, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = state.value_and_grad(loss_fn)
        return state.apply_gradients(grads=grads), loss
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from meprop_jax import optim

PyTree = Any

__all__ = ["TrainState"]


class TrainState(struct.PyTreeNode):
    """Parameters, taps and optimizer state of a model with compact meProp gradients.

    Attributes:
      step: number of updates applied.
      apply_fn: the model's ``apply``; not a pytree leaf.
      params: the ``"params"`` collection.
      taps: the ``"meprop_taps"`` collection (zero :class:`meprop_jax.CompactGrad` taps; their
        values never change), or ``{}`` for a model without ``sparse_update`` layers.
      tx: a :class:`meprop_jax.optim.SparseOptimizer`; not a pytree leaf.
      opt_state: its state.
    """

    step: jax.Array | int
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    params: PyTree
    taps: PyTree
    tx: optim.SparseOptimizer = struct.field(pytree_node=False)
    opt_state: optim.SparseState

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: PyTree,
        tx: optim.SparseOptimizer,
        taps: PyTree = None,
    ) -> TrainState:
        """A fresh state.

        Args:
          apply_fn: the model's ``apply``.
          params: the ``"params"`` collection, or the whole result of ``model.init`` (a
            mapping with ``"params"`` and, for ``sparse_update`` layers, ``"meprop_taps"``).
          tx: a column-sparse optimizer from :mod:`meprop_jax.optim`.
          taps: the ``"meprop_taps"`` collection, when ``params`` is the parameters only.

        Raises:
          TypeError: if ``tx`` is not a :class:`~meprop_jax.optim.SparseOptimizer`, or taps
            are given twice.
        """
        if not isinstance(tx, optim.SparseOptimizer):
            raise TypeError(
                "TrainState needs a column-sparse optimizer from meprop_jax.optim (sparse_adam, "
                f"sparse_adagrad, sparse_sgd), got {type(tx).__name__}"
            )
        if isinstance(params, Mapping) and "params" in params:
            if taps is not None and optim.TAP_COLLECTION in params:
                raise TypeError("taps given twice: in params (from model.init) and as taps=")
            if taps is None:
                taps = params.get(optim.TAP_COLLECTION, {})
            params = params["params"]
        taps = {} if taps is None else taps
        return cls(
            step=jnp.zeros([], jnp.int32),
            apply_fn=apply_fn,
            params=params,
            taps=taps,
            tx=tx,
            opt_state=tx.init(params, taps),
        )

    def variables(self, params: PyTree = None, taps: PyTree = None) -> dict[str, PyTree]:
        """``{"params": ..., "meprop_taps": ...}`` for ``apply_fn`` (the state's own by default)."""
        params = self.params if params is None else params
        taps = self.taps if taps is None else taps
        return {"params": params, optim.TAP_COLLECTION: taps} if taps else {"params": params}

    def value_and_grad(
        self, loss_fn: Callable[..., Any], *args: Any, has_aux: bool = False, **kwargs: Any
    ) -> tuple[Any, tuple[PyTree, PyTree]]:
        """The loss and its compact gradients, ready for :meth:`apply_gradients`.

        Args:
          loss_fn: ``loss_fn(variables, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
            ``has_aux``); it applies the model as ``apply_fn(variables, ...)``, where
            ``variables`` holds the parameters and the taps.
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
        every other leaf is updated densely. ``kwargs`` replace other fields, as in Flax.
        """
        param_grads, tap_grads = grads
        params, opt_state = self.tx.update(
            param_grads, self.opt_state, self.params, tap_grads if self.taps else None
        )
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)
