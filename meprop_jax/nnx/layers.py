"""Flax NNX layers with meProp backward passes.

``Linear`` and ``LSTMCell`` are drop-ins for ``flax.nnx.Linear`` and ``flax.nnx.LSTMCell``:
the same constructor arguments and defaults, the same parameter structure and, for the same
``rngs``, the same initial values, plus the meProp arguments ``k``, ``mode``, ``sparse_bias``,
``rng_collection`` and ``kernel_layout`` (``"out_in"`` stores each kernel transposed, as
``kernel_t``, for the per-row modes' backward on a CPU; see :mod:`meprop_jax.nnx.layout`).
``k``, ``mode`` and ``kernel_layout`` are validated when the module is built.

RNG convention for ``mode="random"`` (the other modes need no RNG): at construction, after the
parameters are drawn, the module forks the stream ``rngs[rng_collection]`` (default
``"meprop"``; an ``nnx.Rngs`` without that stream falls back to its ``default`` stream, as in
``nnx.Dropout``) and keeps the fork as ``module.meprop_rngs``; every call draws one key from
it. A ``rngs=`` call argument (``nnx.Rngs``, ``nnx.RngStream`` or a key) takes precedence.
Inside ``nnx.RNN`` the stream is carried through the scan, so every step gets a new key.

Compact updates: ``Linear(..., sparse_update=True)`` layers and :class:`Optimizer`, the NNX
counterpart of :class:`meprop_jax.TrainState`, take column-sparse steps with the optimizers of
:mod:`meprop_jax.optim`; the user writes the loss only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.recurrent import modified_orthogonal
from flax.typing import Dtype, Initializer, PrecisionLike, PromoteDtypeFn
from jax import lax

from meprop_jax._src import feedback as _feedback
from meprop_jax._src import linear as _linear
from meprop_jax._src import recurrent as _recurrent
from meprop_jax._src import rowwise
from meprop_jax._src import selection as _selection
from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax.nnx._settings import RngArg, set_meprop, step_key
from meprop_jax.nnx.layout import store_kernel, stored_kernel
from meprop_jax.nnx.optimizer import layer_tap

Array = jax.Array

# The defaults of flax.nnx.Linear and flax.nnx.LSTMCell.
_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


class FeedbackMemory(nnx.Variable):
    """A layer's error-feedback memory, float32 ``[out]`` (see :mod:`meprop_jax.feedback`).

    Differentiate with respect to it (``nnx.DiffState(0, nnx.Any(nnx.Param, FeedbackMemory))``)
    and write its gradient back, ``nnx.update(model, nnx.filter_state(grads, FeedbackMemory))``:
    that gradient is the next memory. Give the optimizer the ``nnx.Param`` part only.
    """


class Linear(nnx.Linear):
    """A linear layer, ``y = x @ kernel + bias``, whose backward pass keeps only top-k entries.

    A drop-in for ``flax.nnx.Linear`` (``kernel [in, out]``, ``bias [out]``). In the backward
    pass only ``k`` entries of ``g = dL/dy`` are kept and ``dx`` and ``dkernel`` are computed
    from them alone; see :func:`meprop_jax.linear`.

    Args:
      in_features: number of input features.
      out_features: number of output features.
      k: output-gradient entries to keep; ``0`` (the default) and ``k >= out_features`` are
        ordinary backprop, and the layer then runs exactly as ``flax.nnx.Linear``.
      mode: ``"unified"`` (one column set for the batch), ``"per_example"`` or ``"random"``.
      sparse_bias: restrict the bias gradient to the kept entries too (default: dense).
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, dot_general,
        promote_dtype, preferred_element_type, kernel_metadata, bias_metadata: as in
        ``flax.nnx.Linear``; a custom ``dot_general`` is refused when ``k`` drops entries,
        since meProp supplies its own products.
      rngs: initializes the parameters; with ``mode="random"`` a fork of
        ``rngs[rng_collection]`` is also kept as ``self.meprop_rngs``.
      rng_collection: the stream random mode forks (default ``"meprop"``).
      feedback: error-feedback decay in ``[0, 1]`` (``mode="unified"`` only; see
        :mod:`meprop_jax.feedback`). When positive and the layer is sparse, it keeps a
        :class:`FeedbackMemory` ``meprop_memory``, float32 ``[out_features]`` zeros at first;
        otherwise ``meprop_memory`` is None.
      sparse_update: keep the kernel's gradient compact inside
        :meth:`Optimizer.value_and_grad`: the selected columns' ``[K, in]`` block and their
        indices instead of an ``[in, out]`` array, which :meth:`Optimizer.update` applies
        column by column (see :mod:`meprop_jax.optim`). Anywhere else (evaluation, a plain
        ``nnx.grad``) the layer is plain meProp. No effect on a dense layer.
      factored_grad: with ``sparse_update`` and a per-row mode, keep that gradient as a
        :class:`meprop_jax.FactoredGrad` (see :class:`meprop_jax.Dense`).
      kernel_layout: ``"in_out"`` (the default: the stock ``kernel [in, out]``) or
        ``"out_in"``: the kernel is stored transposed as the attribute ``kernel_t [out, in]``
        (state key ``kernel_t``, as in :class:`meprop_jax.Dense`), so that the columns a
        per-row backward pass selects are contiguous rows (faster on a CPU; see
        :func:`meprop_jax.linear`). The same ``rngs`` give the same (transposed) values and
        the outputs and gradients are those of the stock layout;
        :func:`meprop_jax.nnx.to_kernel_layout` converts states between the layouts. Takes
        no ``dot_general`` hook.

    Raises:
      TypeError, ValueError: for an invalid ``k``, ``mode`` or ``kernel_layout``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = Linear(5, 4, k=2, rngs=nnx.Rngs(0))
      >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
      {'bias': (4,), 'kernel': (5, 4)}
      >>> layer(jnp.ones((3, 5))).shape  # [batch, out]
      (3, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        k: int = 0,
        mode: str = "unified",
        sparse_bias: bool = False,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = _default_kernel_init,
        bias_init: Initializer = _default_bias_init,
        dot_general: Callable[..., Array] = lax.dot_general,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        preferred_element_type: Dtype | None = None,
        rngs: nnx.Rngs,
        rng_collection: str = RNG_COLLECTION,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        feedback: float = 0.0,
        sparse_update: bool = False,
        kernel_layout: str = "in_out",
        factored_grad: bool = False,
    ):
        k = _selection.check_k(k)
        mode = _selection.check_mode(mode)
        layout = rowwise.check_kernel_layout(kernel_layout)
        if dot_general is not lax.dot_general and layout == "out_in":
            raise ValueError(
                "meprop_jax.nnx.Linear with kernel_layout='out_in' does not take a dot_general hook"
            )
        if dot_general is not lax.dot_general and not _selection.is_dense(k, out_features):
            raise ValueError("meprop_jax.nnx.Linear with k > 0 does not take a dot_general hook")
        decay = _feedback.check_decay(feedback)
        if decay and mode != "unified":
            raise ValueError(f"feedback (error feedback) needs mode='unified', got {mode!r}")
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dot_general=dot_general,
            promote_dtype=promote_dtype,
            preferred_element_type=preferred_element_type,
            rngs=rngs,
            kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata,
        )
        store_kernel(self, layout)
        set_meprop(self, k, mode, sparse_bias, rngs, rng_collection)
        sparse_memory = decay and not _selection.is_dense(k, out_features)
        self.feedback = decay
        self.sparse_update = bool(sparse_update)
        self.factored_grad = bool(factored_grad)
        self.meprop_memory = (
            FeedbackMemory(_feedback.init_memory(out_features)) if sparse_memory else None
        )

    def __call__(self, inputs: Array, out_sharding=None, *, rngs: RngArg = None) -> Array:
        """Applies the layer.

        Args:
          inputs: ``[..., in_features]``.
          out_sharding: as in ``flax.nnx.Linear``; with sparsified backprop the result is
            resharded to it after the product.
          rngs: overrides ``self.meprop_rngs`` for ``mode="random"``.

        Returns:
          ``[..., out_features]``.
        """
        dense = _selection.is_dense(self.k, self.out_features)
        if dense and self.kernel_layout == "in_out":
            return super().__call__(inputs, out_sharding)
        kernel = stored_kernel(self)
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        key = None if dense else step_key(self, rngs)
        tap = layer_tap(self, inputs, kernel) if self.sparse_update and not dense else None
        y = _linear.linear(
            inputs,
            kernel,
            bias,
            k=self.k,
            mode=self.mode,
            key=key,
            sparse_bias=self.sparse_bias,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            tap=tap,
            memory=None if self.meprop_memory is None else self.meprop_memory[...],
            decay=0.0 if self.meprop_memory is None else self.feedback,
            kernel_layout=self.kernel_layout,
        )
        if out_sharding is not None:
            y = jax.sharding.reshard(y, out_sharding)
        return y


class LSTMCell(nnx.LSTMCell):
    r"""An LSTM cell whose gate pre-activation gradient is top-k sparsified per gate.

    A drop-in for ``flax.nnx.LSTMCell``: the same submodules (``ii``, ``if_``, ``ig``, ``io``,
    ``nnx.Linear`` without bias, and ``hi``, ``hf``, ``hg``, ``ho`` with bias), the same
    ``initialize_carry``, usable in ``nnx.RNN`` and ``nnx.Bidirectional``. The gate
    pre-activations ``z = x W_i + h W_h + b``, ``[batch, 4 * hidden]`` in gate order i, f, g,
    o, are computed as ``fused_gates`` says; in the backward pass ``dL/dz`` keeps ``k``
    entries in each gate block (``4k`` of ``4 * hidden``) at every time step and ``dx``,
    ``dh``, ``dW_i`` and ``dW_h`` are computed from those alone. The bias gradient stays
    dense unless ``sparse_bias``.

    This is our reading of meProp for LSTMs: the authors never released their LSTM code; we
    sparsify the gate pre-activation gradient, ``k`` entries per gate, at every step. With
    ``k = 0`` or ``k >= hidden_features`` (and the stock layout) the cell runs exactly as
    ``flax.nnx.LSTMCell``.

    Args:
      in_features: input size.
      hidden_features: hidden size ``h``.
      k: gradient entries kept per gate (per row, or per batch for ``"unified"``).
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      sparse_bias: restrict the bias gradient to the kept entries too.
      rngs: initializes the parameters; with ``mode="random"`` a fork of
        ``rngs[rng_collection]`` is kept as ``self.meprop_rngs`` (one key per step).
      rng_collection: the stream random mode forks (default ``"meprop"``).
      fused_gates: with ``k > 0``, compute ``z`` with one product per input over the four
        gates' joined kernels (the default: fewer, larger products, faster on CPU); ``False``
        runs one product per gate and input, exactly as ``flax.nnx.LSTMCell`` does, so the
        forward pass is the stock one bit for bit (:func:`meprop_jax.nnx.sparsify`'s cells).
        The two differ by float rounding.
      kernel_layout: ``"in_out"`` (the default: the stock kernels ``[in, h]`` and ``[h, h]``)
        or ``"out_in"``: every gate's input and recurrent kernel is stored transposed, as
        ``kernel_t`` (``[h, in]``, ``[h, h]``), and the gates are then dense
        :class:`Linear` layers with that layout, so that the per-row backward pass gathers
        contiguous kernel rows. The same ``rngs`` give the same (transposed) values;
        :func:`meprop_jax.nnx.to_kernel_layout` converts states (a stock cell's included).
        The forward pass contracts the transposed kernels, so it matches the stock cell to
        float rounding rather than bit for bit, also with ``k = 0``.
      gate_fn, activation_fn, kernel_init, recurrent_kernel_init, bias_init, dtype,
        param_dtype, carry_init, promote_dtype, keep_rngs, kernel_metadata,
        recurrent_kernel_metadata, bias_metadata: as in ``flax.nnx.LSTMCell``.

    Raises:
      TypeError, ValueError: for an invalid ``k``, ``mode`` or ``kernel_layout``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> cell = LSTMCell(5, 8, k=2, mode="random", rngs=nnx.Rngs(0, meprop=1))
      >>> rnn = nnx.RNN(cell)
      >>> rnn(jnp.ones((3, 4, 5))).shape  # [batch, time, in] -> [batch, time, hidden]
      (3, 4, 8)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        k: int = 0,
        mode: str = "unified",
        sparse_bias: bool = False,
        gate_fn: Callable[..., Any] = nnx.sigmoid,
        activation_fn: Callable[..., Any] = nnx.tanh,
        kernel_init: Initializer = _default_kernel_init,
        recurrent_kernel_init: Initializer = modified_orthogonal,
        bias_init: Initializer = _default_bias_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        keep_rngs: bool = False,
        rngs: nnx.Rngs,
        rng_collection: str = RNG_COLLECTION,
        fused_gates: bool = True,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        recurrent_kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        kernel_layout: str = "in_out",
    ):
        k = _selection.check_k(k)
        mode = _selection.check_mode(mode)
        layout = rowwise.check_kernel_layout(kernel_layout)
        super().__init__(
            in_features,
            hidden_features,
            gate_fn=gate_fn,
            activation_fn=activation_fn,
            kernel_init=kernel_init,
            recurrent_kernel_init=recurrent_kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
            carry_init=carry_init,
            promote_dtype=promote_dtype,
            keep_rngs=keep_rngs,
            rngs=rngs,
            kernel_metadata=kernel_metadata,
            recurrent_kernel_metadata=recurrent_kernel_metadata,
            bias_metadata=bias_metadata,
        )
        set_meprop(self, k, mode, sparse_bias, rngs, rng_collection)
        self.fused_gates = bool(fused_gates)
        self.kernel_layout = layout
        if layout == "out_in":
            for gate in _gates(self):
                _as_dense_linear(gate, layout)

    def __call__(
        self, carry: tuple[Array, Array], inputs: Array, *, rngs: RngArg = None
    ) -> tuple[tuple[Array, Array], Array]:
        """One step.

        Args:
          carry: ``(c, h)``, each ``[batch, hidden]``, e.g. from ``initialize_carry``.
          inputs: ``[batch, in]``; all axes but the last are batch axes.
          rngs: overrides ``self.meprop_rngs`` for ``mode="random"``.

        Returns:
          ``((c', h'), h')``.
        """
        dense = _selection.is_dense(self.k, 4 * self.hidden_features, groups=4)
        if dense and self.kernel_layout == "in_out":
            # Nothing is dropped: the stock cell, bit for bit.
            return super().__call__(carry, inputs)
        gates = _gates(self)
        key = None if dense else step_key(self, rngs)
        return _recurrent.lstm_step(
            carry,
            inputs,
            [stored_kernel(m) for m in gates[:4]],
            [stored_kernel(m) for m in gates[4:]],
            [m.bias[...] for m in gates[4:]],
            promote=lambda arrays: self.promote_dtype(arrays, dtype=self.dtype),
            gate_fn=self.gate_fn,
            activation_fn=self.activation_fn,
            fused=self.fused_gates,
            kernel_layout=self.kernel_layout,
            k=self.k,
            mode=self.mode,
            key=key,
            sparse_bias=self.sparse_bias,
        )


def _gates(cell: nnx.LSTMCell) -> tuple[nnx.Linear, ...]:
    """The cell's gate layers: the input ones (no bias), then the recurrent ones, i, f, g, o."""
    return (cell.ii, cell.if_, cell.ig, cell.io, cell.hi, cell.hf, cell.hg, cell.ho)


def _as_dense_linear(gate: nnx.Linear, kernel_layout: str) -> None:
    """Turns a freshly built stock gate into a dense :class:`Linear` in ``kernel_layout``.

    In place, keeping its values: the stock gate would read a ``kernel`` that the transposed
    layout no longer has, while ours reads ``kernel_t``.
    """
    gate.__class__ = Linear  # a new module, in no graphdef yet
    set_meprop(gate, 0, "unified", False, None, RNG_COLLECTION)
    gate.feedback, gate.sparse_update, gate.meprop_memory = 0.0, False, None
    store_kernel(gate, kernel_layout)
