"""Flax Linen layers with meProp backward passes.

``Dense`` is a drop-in for ``flax.linen.Dense``: the same fields and defaults, the same
parameter names and shapes (``kernel [in, out]``, ``bias [out]``), so stock checkpoints load,
plus the meProp fields ``k``, ``mode``, ``sparse_bias``, ``rng_collection`` and
``sparse_update``, the meSimp field ``record`` (see :mod:`meprop_jax.mesimp`), error feedback
(``feedback``, :mod:`meprop_jax.feedback`) and adaptive k (``adaptive``,
:class:`meprop_jax.AdaptiveK`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from meprop_jax._src import adaptive as _adaptive
from meprop_jax._src import feedback, rowwise
from meprop_jax._src import layout as _layout
from meprop_jax._src import linear as _linear
from meprop_jax._src import recurrent as _recurrent
from meprop_jax._src import selection as _selection
from meprop_jax._src import taps as _taps
from meprop_jax._src.adaptive import AdaptiveK
from meprop_jax._src.collections import (
    ADAPTIVE_TAP_COLLECTION,
    MESIMP_COLLECTION,
    RECORD_TAP_COLLECTION,
    RNG_COLLECTION,
    TAP_COLLECTION,
    TRANSPOSED_KERNEL,
)

Array = jax.Array


def claim_tap(module: nn.Module) -> None:
    """Refuses a second call of one tapped layer in one ``init`` or ``apply``, at trace time.

    Both calls would write their compact gradients into the same tap, where autodiff adds
    them up: the sum of two column sets' indices names no column.
    """
    if getattr(module, "_meprop_tap_claimed", False):
        name = "/".join(module.scope.path) if module.scope is not None else module.name
        raise ValueError(
            f"layer {name!r} (sparse_update=True) was applied twice in one step: a compact "
            "gradient needs exactly one call per step (no weight sharing or scan over one "
            "layer); build it with sparse_update=False"
        )
    object.__setattr__(module, "_meprop_tap_claimed", True)  # this bound copy: one apply


def _mesimp_state(module: nn.Module, units: int) -> tuple[Array, _taps.RecordTap | None]:
    """Declares a layer's meSimp variables; returns its ``[units]`` mask and its record tap.

    The tap exists only when ``apply`` is given the ``"mesimp_taps"`` collection (training);
    the ``"mesimp"`` collection, with the mask, is needed by every ``apply``.
    """
    mask = module.variable(MESIMP_COLLECTION, "mask", jnp.ones, (units,), jnp.float32).value
    module.variable(MESIMP_COLLECTION, "hits", jnp.zeros, (units,), jnp.int32)
    module.variable(MESIMP_COLLECTION, "examples", jnp.zeros, (), jnp.int32)
    tap = None
    if module.is_initializing() or module.has_variable(RECORD_TAP_COLLECTION, "record"):
        tap = module.variable(RECORD_TAP_COLLECTION, "record", _taps.record_tap, units).value
    return mask, tap


def compact_tap_state(
    module: nn.Module, inputs: Array, kernel: Array, k: int, mode: str, transposed=False, **form
) -> _taps.CompactGrad | _taps.FactoredGrad | None:
    """A sparse Dense layer's zero compact-gradient tap, or None when ``apply`` has none.

    The tap is made when ``"meprop_taps"`` is mutable (``init``, or ``apply`` with
    ``mutable=["meprop_taps"]``), with the shape of this call's ``inputs [..., in]`` and
    ``kernel [in, out]`` (``[out, in]`` when ``transposed``, and the tap is then named
    ``kernel_t`` like the parameter, which the compact optimizers match it to); otherwise it is
    read if ``apply`` was given it (training) and the layer is plain meProp if not
    (evaluation). A second call with the tap raises (see :func:`claim_tap`). ``form``:
    ``factored=True`` for a :class:`~meprop_jax.FactoredGrad` tap (per-row modes).
    :func:`meprop_jax.sparsify` shares it.
    """
    name = TRANSPOSED_KERNEL if transposed else "kernel"
    if not (
        module.has_variable(TAP_COLLECTION, name) or module.is_mutable_collection(TAP_COLLECTION)
    ):
        return None
    d_in, d_out = kernel.shape[::-1] if transposed else kernel.shape
    shape = dict(batch_shape=inputs.shape[:-1], dtype=kernel.dtype)
    make_tap = lambda: _taps.compact_tap(d_in, d_out, k=k, mode=mode, **shape, **form)
    tap = module.variable(TAP_COLLECTION, name, make_tap).value
    claim_tap(module)
    return tap


def _memory_state(module: nn.Module, columns: int) -> Array | None:
    """The layer's error-feedback memory, or None when ``apply`` was given none (evaluation)."""
    collection = feedback.MEMORY_COLLECTION
    if module.is_initializing() or module.has_variable(collection, "memory"):
        return module.variable(collection, "memory", feedback.init_memory, columns).value
    return None


def _adaptive_state(module: nn.Module) -> _adaptive.AdaptiveTap | None:
    """The layer's zero chosen-k tap, or None when ``apply`` was given none (evaluation)."""
    collection = ADAPTIVE_TAP_COLLECTION
    if module.is_initializing() or module.has_variable(collection, "k"):
        return module.variable(collection, "k", _adaptive.adaptive_tap).value
    return None


def _layout_kernel(module: nn.Module, layout: str, init, shape: tuple[int, int], dtype) -> Array:
    """Declares a kernel of logical shape ``shape = (in, out)`` in ``layout``; returns it.

    ``"in_out"`` is the stock parameter ``kernel [in, out]``; ``"out_in"`` stores its transpose
    as ``kernel_t [out, in]``, drawn by the stock initializer at ``[in, out]`` and transposed,
    so that the same key gives the same values in both layouts.
    """
    if layout == "in_out":
        return module.param("kernel", init, shape, dtype)
    transposed_init = lambda key, shape, dtype: init(key, shape[::-1], dtype).T
    return module.param(TRANSPOSED_KERNEL, transposed_init, shape[::-1], dtype)


class Dense(nn.Dense):
    """A linear layer, ``y = x @ kernel + bias``, whose backward pass keeps only top-k entries.

    Attributes:
      features: number of output features (as in ``flax.linen.Dense``).
      k: output-gradient entries to keep; ``0`` (the default) is ordinary backprop, and so is
        any ``k >= features``.
      mode: ``"unified"`` (one column set for the batch), ``"per_example"`` or ``"random"``;
        see :func:`meprop_jax.linear`.
      sparse_bias: restrict the bias gradient to the kept entries too (default: dense bias
        gradient, as in the authors' code).
      rng_collection: the RNG stream ``mode="random"`` draws from (default ``"meprop"``);
        pass it to ``apply``, e.g. ``rngs={"meprop": key}``.
      sparse_update: keep the kernel's gradient compact (see :mod:`meprop_jax.optim`):
        ``init`` also creates a zero tap ``"kernel"`` in the ``"meprop_taps"`` collection;
        differentiating with respect to it gives the selected columns' ``[K, in]`` gradient
        block and their indices, while the kernel's own gradient is zero. Has no effect when
        the layer is dense (``k = 0`` or ``k >= features``: no tap) or when ``apply`` is given
        no ``"meprop_taps"`` (e.g. at evaluation). For ``"per_example"`` and ``"random"`` the
        tap's width ``min(batch * k, features)`` depends on the batch shape: ``init`` with the
        training batch shape. Apply the layer once per step: a second call with the taps
        raises (no weight sharing, no ``scan`` over a shared tap). Differentiating with
        respect to the kernel instead of the tap gives the masked dense gradient, as without
        ``sparse_update``.
      factored_grad: with ``sparse_update`` and a per-row mode, the tap is a
        :class:`~meprop_jax.FactoredGrad` of width ``batch * k``: the gradient stays as each
        row's kept entries, their columns and the input rows, and the backward pass runs
        selection and ``dx`` only. :func:`meprop_jax.optim.sparse_adam` sums the rows as it
        updates them (natively for ``kernel_layout="out_in"``); other compact optimizers get
        the block. Default False.
      record: keep meSimp's activity record (see :mod:`meprop_jax.mesimp`). ``init`` also
        creates ``hits`` (int32 ``[features]``), ``examples`` (int32 scalar) and ``mask``
        (float32 ``[features]``, ones) in the ``"mesimp"`` collection and a zero
        :class:`~meprop_jax.RecordTap` ``"record"`` in ``"mesimp_taps"``. The output
        is multiplied by ``mask``, so a unit with mask 0 (pruned, or padding after a shrink)
        outputs exactly 0 and its weights get zero gradient; every ``apply`` needs the
        ``"mesimp"`` collection. Differentiating with respect to ``"mesimp_taps"`` gives the
        step's selection counts (:func:`meprop_jax.mesimp.accumulate` adds them up). Default
        False: no extra variables, and the layer is exactly the plain one.
      feedback: error-feedback decay in ``[0, 1]`` (see :mod:`meprop_jax.feedback`;
        ``mode="unified"`` only). When positive and the layer is sparse, ``init`` also creates
        a float32 ``[features]`` zero ``"memory"`` in the ``"meprop_memory"`` collection; the
        gradient of the loss with respect to it is the next step's memory. An ``apply``
        without that collection (evaluation) runs plain meProp. Default 0: no memory.
      adaptive: adaptive k (:class:`~meprop_jax.AdaptiveK`, TinyProp-style;
        ``mode="unified"`` only): ``k`` is the upper bound ``k_max`` and every step keeps the
        fewest top columns, at least ``k_min``, that hold ``mass`` of the gradient's column
        mass. When the layer is sparse, ``init`` also creates a zero
        :class:`~meprop_jax.AdaptiveTap` ``"k"`` in the ``"meprop_adaptive"``
        collection; the gradient with respect to it is ``(chosen k, 1)``. Default None.
      kernel_layout: ``"in_out"`` (the default: the stock parameter ``kernel [in, out]``) or
        ``"out_in"``: the kernel is stored transposed as ``kernel_t [out, in]``, so that the
        columns a per-row backward pass selects are contiguous rows (about twice as fast on a
        CPU; see :func:`meprop_jax.linear`). The values and the math are the same, and the
        same key initializes the same weights; :func:`to_kernel_layout` converts parameter
        trees (stock checkpoints) between the layouts. The tap of ``sparse_update`` is then
        named ``kernel_t`` too.

    All other fields (``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
    ``kernel_init``, ``bias_init``, ``promote_dtype``) behave as in ``flax.linen.Dense``.
    ``dot_general`` and ``dot_general_cls`` are not supported with ``k > 0``: meProp supplies
    its own products.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dense(features=4, k=2)
      >>> params = layer.init(jax.random.key(0), jnp.ones((3, 5)))
      >>> jax.tree.map(jnp.shape, params)["params"]
      {'bias': (4,), 'kernel': (5, 4)}
    """

    k: int = 0
    mode: str = "unified"
    sparse_bias: bool = False
    rng_collection: str = RNG_COLLECTION
    sparse_update: bool = False
    factored_grad: bool = False
    record: bool = False
    feedback: float = 0.0
    adaptive: AdaptiveK | None = None
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the layer to ``inputs`` of shape ``[..., in]``; returns ``[..., features]``."""
        k = _selection.check_k(self.k)
        mode = _selection.check_mode(self.mode)
        if self.dot_general is not None or self.dot_general_cls is not None:
            if self.kernel_layout != "in_out":
                raise ValueError(
                    "meprop_jax.Dense with kernel_layout='out_in' takes no dot_general"
                )
            if not _selection.is_dense(k, self.features):
                raise ValueError("meprop_jax.Dense with k > 0 does not take dot_general hooks")
            if self.record:
                raise ValueError("meprop_jax.Dense(record=True) takes no dot_general hooks")
            return super().__call__(inputs)
        layout = rowwise.check_kernel_layout(self.kernel_layout)
        shape = (jnp.shape(inputs)[-1], self.features)
        kernel = _layout_kernel(self, layout, self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        sparse = not _selection.is_dense(k, self.features)
        key = self.make_rng(self.rng_collection) if sparse and mode == "random" else None
        tap = (
            compact_tap_state(
                self, inputs, kernel, k, mode, layout == "out_in", factored=self.factored_grad
            )
            if self.sparse_update and sparse
            else None
        )
        mask, record = _mesimp_state(self, self.features) if self.record else (None, None)
        decay = feedback.check_decay(self.feedback)
        memory = _memory_state(self, self.features) if sparse and decay else None
        a_tap = _adaptive_state(self) if sparse and self.adaptive is not None else None
        y = _linear.linear(
            inputs,
            kernel,
            bias,
            k=k,
            mode=mode,
            key=key,
            sparse_bias=self.sparse_bias,
            precision=self.precision,
            tap=tap,
            record=record,
            memory=memory,
            decay=decay if memory is not None else 0.0,
            adaptive=self.adaptive,
            adaptive_tap=a_tap,
            kernel_layout=layout,
        )
        # The mask zeroes pruned and padding units: their output and their gradient.
        return y if mask is None else y * mask.astype(y.dtype)


# Submodule names of flax.linen.LSTMCell, in gate order i, f, g, o.
_LINEN_INPUT_GATES = ("ii", "if", "ig", "io")
_LINEN_RECURRENT_GATES = ("hi", "hf", "hg", "ho")


class _GateParams(nn.Module):
    """Declares ``kernel [in, features]`` (and ``bias [features]``) exactly as ``nn.Dense`` does.

    Named like the stock cell's ``nn.Dense`` submodules, it yields the same parameter tree and,
    for the same key, the same initial values, without running a product of its own. With
    ``kernel_layout="out_in"`` the kernel is ``kernel_t [features, in]``, as in ``Dense``.
    """

    features: int
    use_bias: bool
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    param_dtype: jnp.dtype = jnp.float32
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array | None]:
        shape = (in_features, self.features)
        kernel = _layout_kernel(self, self.kernel_layout, self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return kernel, bias


class LSTMCell(nn.LSTMCell):
    r"""An LSTM cell whose gate pre-activation gradient is top-k sparsified per gate.

    The forward pass is that of ``flax.linen.LSTMCell``:

    .. math::
        z = x W_i + h W_h + b, \quad [z_i, z_f, z_g, z_o] = z, \quad
        c' = \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad h' = \sigma(z_o) \tanh(c').

    In the backward pass the gradient ``dL/dz``, ``[batch, 4 * features]``, keeps only ``k``
    entries in each of the four gate blocks (``4k`` of ``4 * features``) at every time step,
    and ``dx``, ``dh``, ``dW_i`` and ``dW_h`` are computed from those alone, so both the input
    and the recurrent products shrink. The bias gradient stays dense unless ``sparse_bias``.

    This is our reading of meProp for LSTMs, as the authors never released their LSTM code: we
    sparsify the gate pre-activation gradient, ``k`` entries per gate (``4k`` of
    ``4 * features``), at every time step.

    The parameter tree is the stock one (``ii``, ``if``, ``ig``, ``io`` with ``kernel [in, h]``
    and no bias; ``hi``, ``hf``, ``hg``, ``ho`` with ``kernel [h, h]`` and ``bias [h]``), with
    the same initial values for the same key, so stock checkpoints load. With ``k = 0`` or
    ``k >= features`` (and the stock ``kernel_layout``) the cell *is* the stock cell.

    **Random mode inside** ``nn.RNN``: ``nn.RNN`` scans the cell and, by default, hands it only
    the ``"params"`` stream. Give every step its own key with::

        split = {"params": False, "meprop": True}
        rnn = nn.RNN(cell, split_rngs=split)  # variable_broadcast="params" is the default
        bi = nn.Bidirectional(
            nn.RNN(fwd_cell, split_rngs=split), nn.RNN(bwd_cell, split_rngs=split)
        )

    and pass ``rngs={"meprop": key}`` to ``init`` and ``apply`` (use ``rng_collection`` instead
    of ``"meprop"`` if you changed it). The other modes need no RNG.

    Attributes:
      features: hidden size ``h``.
      k: gradient entries kept per gate and per row (``"per_example"``, ``"random"``) or
        columns kept per gate (``"unified"``); ``0`` (the default) is ordinary backprop.
      mode: ``"unified"``, ``"per_example"`` or ``"random"``; see :func:`meprop_jax.linear`.
      sparse_bias: restrict the bias gradient to the kept entries too.
      rng_collection: the RNG stream ``mode="random"`` draws one key per step from.
      record: keep meSimp's activity record per hidden unit, as ``Dense(record=True)`` does
        (``hits``, ``examples`` and ``mask``, ``[features]``, in ``"mesimp"``; a record tap in
        ``"mesimp_taps"``). A hidden unit ties its four gate columns: an example selects the
        unit when it selects any of them. ``mask`` multiplies the new cell and hidden states,
        so a masked unit's ``c`` and ``h`` stay exactly 0 (from a zero carry) and its gate
        weights get zero gradient. Every time step of every sequence is one example; all-zero
        gradient rows (padding) are not counted. Inside ``nn.RNN`` broadcast both
        collections: ``nn.RNN(cell, variable_broadcast=["params", "mesimp", "mesimp_taps"])``.
      feedback: error-feedback decay of the gate pre-activations (as ``Dense(feedback=...)``,
        a float32 ``[4 * features]`` ``"memory"`` in ``"meprop_memory"``; unified only).
      feedback_steps: the time steps that share the memory (the scan's length): each step
        re-enters ``memory / (batch * feedback_steps)`` (see :mod:`meprop_jax.feedback`).
      adaptive: adaptive k per gate (as ``Dense(adaptive=...)``; ``k`` is ``k_max`` per
        gate); the chosen-k tap ``"k"`` in ``"meprop_adaptive"`` sums over the time steps.
        Inside ``nn.RNN`` broadcast ``"meprop_memory"`` and ``"meprop_adaptive"`` with
        ``"params"`` (``variable_broadcast``).
      fused_gates: with ``k > 0``, compute ``z`` with one product per input over the four
        gates' joined kernels, exactly as ``flax.linen.OptimizedLSTMCell`` does (the default:
        fewer, larger products, faster on CPU); ``False`` runs one product per gate and
        input, exactly as ``flax.linen.LSTMCell`` does. The two differ by float rounding.
      kernel_layout: ``"in_out"`` (the default: the stock tree above) or ``"out_in"``: every
        gate's kernel is stored transposed as ``kernel_t`` (``[h, in]`` and ``[h, h]``), so
        that the per-row modes' backward pass gathers the kept columns as contiguous rows (as
        ``Dense(kernel_layout="out_in")`` does). The same key initializes the same
        (transposed) weights; :func:`to_kernel_layout` converts parameter trees between the
        layouts. The forward pass contracts the transposed kernels, so it matches the stock
        cell to float rounding rather than bit for bit, also with ``k = 0``. The NNX cell
        (:class:`meprop_jax.nnx.LSTMCell`) takes the same option.

    ``gate_fn``, ``activation_fn``, ``kernel_init``, ``recurrent_kernel_init``, ``bias_init``,
    ``dtype``, ``param_dtype`` and ``carry_init`` behave as in ``flax.linen.LSTMCell``, and so
    do ``initialize_carry`` and ``num_feature_axes``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = LSTMCell(features=8, k=2)
      >>> x = jnp.ones((3, 5))  # [batch, in]
      >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
      >>> params = cell.init(jax.random.key(1), carry, x)
      >>> (c, h), y = cell.apply(params, carry, x)
      >>> y.shape
      (3, 8)
    """

    k: int = 0
    mode: str = "unified"
    sparse_bias: bool = False
    rng_collection: str = RNG_COLLECTION
    record: bool = False
    feedback: float = 0.0
    feedback_steps: int = 1
    adaptive: AdaptiveK | None = None
    fused_gates: bool = True
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(
        self, carry: tuple[Array, Array], inputs: Array
    ) -> tuple[tuple[Array, Array], Array]:
        """One step.

        Args:
          carry: ``(c, h)``, each ``[batch, features]``, e.g. from ``initialize_carry``.
          inputs: ``[batch, in]``; all axes but the last are batch axes.

        Returns:
          ``((c', h'), h')``.
        """
        k = _selection.check_k(self.k)
        mode = _selection.check_mode(self.mode)
        layout = rowwise.check_kernel_layout(self.kernel_layout)
        hidden = carry[1].shape[-1]
        if _selection.is_dense(k, 4 * hidden, groups=4) and not self.record and layout == "in_out":
            # Nothing is dropped: run the stock cell itself, so results match it bit for bit.
            return super().__call__(carry, inputs)

        input_gates = [
            _GateParams(
                hidden,
                False,
                self.kernel_init,
                param_dtype=self.param_dtype,
                kernel_layout=layout,
                name=n,
            )(jnp.shape(inputs)[-1])[0]
            for n in _LINEN_INPUT_GATES
        ]
        recurrent_gates = [
            _GateParams(
                hidden,
                True,
                self.recurrent_kernel_init,
                self.bias_init,
                self.param_dtype,
                layout,
                name=n,
            )(hidden)
            for n in _LINEN_RECURRENT_GATES
        ]
        sparse = not _selection.is_dense(k, 4 * hidden, groups=4)
        key = self.make_rng(self.rng_collection) if sparse and mode == "random" else None
        mask, record = _mesimp_state(self, hidden) if self.record else (None, None)
        decay = feedback.check_decay(self.feedback)
        memory = _memory_state(self, 4 * hidden) if sparse and decay else None
        return _recurrent.lstm_step(
            carry,
            inputs,
            input_gates,
            [w for w, _ in recurrent_gates],
            [b for _, b in recurrent_gates],
            promote=lambda arrays: promote_dtype(*arrays, dtype=self.dtype),
            gate_fn=self.gate_fn,
            activation_fn=self.activation_fn,
            fused=self.fused_gates,
            mask=mask,
            kernel_layout=layout,
            k=k,
            mode=mode,
            key=key,
            sparse_bias=self.sparse_bias,
            record=record,
            memory=memory,
            decay=decay if memory is not None else 0.0,
            adaptive=self.adaptive,
            adaptive_tap=_adaptive_state(self) if sparse and self.adaptive is not None else None,
            feedback_steps=self.feedback_steps,
        )


def to_kernel_layout(params, kernel_layout: str, *, where=None):
    """A parameter tree with its ``Dense`` and ``LSTMCell`` kernels in ``kernel_layout``.

    ``"out_in"`` turns every 2-D ``kernel [in, out]`` into ``kernel_t [out, in]`` (its
    transpose), for ``Dense(kernel_layout="out_in")`` and ``LSTMCell(kernel_layout="out_in")``
    (whose gate kernels are such leaves); ``"in_out"`` turns every ``kernel_t`` back into the
    stock ``kernel``, so a stock ``flax.linen.Dense`` or ``flax.linen.LSTMCell`` checkpoint
    loads into the transposed layer and back. Other leaves are kept as they are.

    Args:
      params: a nested mapping of parameters (e.g. ``variables["params"]``).
      kernel_layout: ``"out_in"`` or ``"in_out"``.
      where: optional ``where(path) -> bool`` on the module path (a tuple of names) of each
        kernel, to convert some layers only (those whose ``Dense`` has the layout).

    Returns:
      A new tree (plain dicts); the arrays are transposed copies.

    A pure dict of an NNX state (``nnx.to_pure_dict``) converts here too;
    :func:`meprop_jax.nnx.to_kernel_layout` converts an ``nnx.State`` into an ``nnx.State``.
    """
    return _layout.convert_kernels(params, kernel_layout, lambda a: jnp.asarray(a).T, where)
