"""The meProp linear transform: an unchanged forward pass and a top-k sparsified backward pass.

``multi_linear`` computes ``y = sum_j xs[j] @ kernels[j] + bias`` (a plain linear layer has one
input; an LSTM cell has two, the input and the recurrent state). Its backward pass selects
columns of ``g = dL/dy`` once (see ``_selection``) and computes every ``dx_j`` and ``dW_j`` from
the selected columns only: the products it runs are ``[N, k] x [k, in]`` and ``[in, N] x [N, k]``
rather than ``[N, out] x [out, in]`` and ``[in, N] x [N, out]``.

By default the weight gradient is handed to autodiff as a dense ``[in, out]`` array, zero outside
the selected columns (the authors' semantics: any stock optimizer consumes it). With ``taps`` it
stays compact instead: the backward writes the selected columns' ``[K, in]`` block and their
indices into the cotangent of a zero-valued :class:`CompactGrad` input, so a jitted step that
differentiates the taps and not the kernels never builds an ``[in, out]`` array (see
:mod:`meprop_jax.optim` for the optimizers that consume it).

With ``record`` the backward also counts, per output unit, how many examples updated it (the
activity record of meSimp, see :mod:`meprop_jax.mesimp`): the counts are the cotangent of a
zero-valued :class:`RecordTap` input, so a jitted step gets them from ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal

from meprop_jax._src import adaptive as _adaptive
from meprop_jax._src import factored, feedback, native, products, rowwise
from meprop_jax._src import selection as _selection
from meprop_jax._src.adaptive import AdaptiveK, AdaptiveTap
from meprop_jax._src.taps import (
    CompactGrad,
    FactoredGrad,
    RecordTap,
    _check_record,
    _check_taps,
    _record_counts,
    _record_dense,
    compact_grads,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    k: int
    mode: str
    groups: int
    sparse_bias: bool
    precision: lax.PrecisionLike
    preferred_element_type: jnp.dtype | None
    compact: bool = False
    record: bool = False
    adaptive: AdaptiveK | None = None
    adaptive_tap: bool = False
    feedback_steps: int = 1
    kernel_layout: str = "in_out"
    # Which inputs autodiff differentiates (None: all). A network's first input is its data:
    # the native kernels then skip that dx, as autodiff skips it in a dense layer.
    input_grads: tuple[bool, ...] | None = None
    # Compact weight gradients kept as factors (FactoredGrad taps; per-row modes).
    factored: bool = False


def _wants_dx(cfg: _Config, i: int) -> bool:
    return cfg.input_grads is None or cfg.input_grads[i]


def _drop_unwanted(cfg: _Config, dxs) -> tuple:
    return tuple(d if _wants_dx(cfg, i) else None for i, d in enumerate(dxs))


_apply_kernel = products.apply_kernel
_weight_grad = products.weight_grad


def _forward(cfg: _Config, xs, kernels, bias) -> Array:
    y = functools.reduce(
        jnp.add, [_apply_kernel(x, w, cfg) for x, w in zip(xs, kernels, strict=True)]
    )
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _unified_backward(cfg: _Config, xs, kernels, g: Array, non_finite: Array):
    """Gathers the ``k`` shared columns; every product is small and dense.

    With adaptive k, ``keep`` (``[groups * k]`` bool) marks the columns kept and the others'
    gradient columns are zero; otherwise ``keep`` is None.
    """
    keep = None
    if cfg.adaptive is None:
        cols = _selection.unified_columns(g, cfg.k, cfg.groups, non_finite=non_finite)
    else:
        cols, keep = _selection.adaptive_columns(
            g, cfg.k, cfg.adaptive, cfg.groups, non_finite=non_finite
        )
    g_cols = jnp.take(g, cols, axis=-1)
    # Non-finite columns past the k kept must not leave dx looking healthy.
    g_cols = _selection.flag_dropped_non_finite(non_finite, g_cols, cfg.k, cfg.groups)
    if keep is not None:
        # The products keep their static width k; the columns past the adaptive k are zero.
        g_cols = jnp.where(keep, g_cols, jnp.zeros((), g_cols.dtype))
    dxs, blocks = products.column_products(cfg, xs, kernels, g_cols, cols)
    return dxs, blocks, cols, g_cols, keep


def _rowwise_backward(cfg: _Config, xs, kernels, g: Array, key: Array | None):
    """Per-row selections (see :mod:`meprop_jax._src.rowwise`): ``dx`` from each row's own
    kernel columns, the weight gradient from the rows' union of columns.

    With ``N`` rows each keeping ``k`` columns (per group) the union has at most ``N * k``
    columns. When that is below ``out`` the weight gradient is the union's block, padded to
    ``N * k`` columns (a static size); otherwise ``dx`` and the weight gradient are the full
    products of the masked gradient, and the returned ``cols`` is None (the blocks are dense).
    """
    if cfg.mode == "random":
        # The draws of _selection.random_mask, so both give the same selection.
        noise = jax.random.uniform(key, g.shape)
        scores = jnp.where(jnp.isfinite(g), noise, jnp.inf)
    else:
        scores = jnp.abs(g.astype(_selection._ranking_dtype(g.dtype)))
    if cfg.factored:
        return factored.rowwise_backward(cfg, xs, kernels, g, scores)
    covers = g.size // g.shape[-1] * cfg.k * cfg.groups >= g.shape[-1]
    # Rows that cover the layer take the kernels only where the kernel rows are contiguous
    # ([out, in]): dx from each row's rows, the dense dW summed from the selected entries. For
    # [in, out] their column walks took 2x dense's time at 250 x 2400 -> 500, k = 20.
    if native.applies(g, xs, kernels) and (not covers or cfg.kernel_layout == "out_in"):
        return _native_rowwise(cfg, xs, kernels, g, scores)
    return _xla_rowwise(cfg, xs, kernels, g, scores)


def _xla_rowwise(cfg: _Config, xs, kernels, g: Array, scores: Array):
    """The pure-XLA path of ``_rowwise_backward`` (see :mod:`meprop_jax._src.rowwise`)."""
    union_size = g.size // g.shape[-1] * cfg.k * cfg.groups
    idx, g_kept, mask, g_sparse = rowwise.rowwise_selection(g, scores, cfg.k, cfg.groups)
    if union_size >= g.shape[-1]:
        # The rows cover the layer: the masked full products (a gather of N * k kernel
        # columns would move more memory than the product they replace).
        pairs = tuple(zip(xs, kernels, strict=True))
        dxs = tuple(products.input_grad(g_sparse, w, x, cfg) for x, w in pairs)
        dws = tuple(_weight_grad(x, g_sparse, w, cfg) for x, w in pairs)
        return _drop_unwanted(cfg, dxs), dws, None, g_sparse, mask.reshape(g.shape)
    dxs = tuple(
        rowwise.gathered_input_grad(
            g_kept, idx, w, cfg.kernel_layout, cfg.precision, x.dtype
        ).reshape(x.shape)
        for x, w in zip(xs, kernels, strict=True)
    )
    cols = rowwise.union_columns(idx, mask)
    g_cols = jnp.take(g_sparse, cols, axis=-1, mode="fill", fill_value=0)
    blocks = tuple(_weight_grad(x, g_cols, w, cfg) for x, w in zip(xs, kernels, strict=True))
    return _drop_unwanted(cfg, dxs), blocks, cols, g_sparse, mask.reshape(g.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _native_rowwise(cfg: _Config, xs, kernels, g: Array, scores: Array):
    """``_xla_rowwise``'s results from the native kernels (:mod:`meprop_jax._src.native`).

    Differentiating the backward pass (higher-order derivatives) differentiates the XLA path,
    which computes the same function.
    """
    rows = cfg.compact or cfg.kernel_layout == "out_in"
    covers = g.size // g.shape[-1] * cfg.k * cfg.groups >= g.shape[-1]
    args = (cfg.k, cfg.groups, cfg.kernel_layout, rows, covers)
    # Covering rows (an [out, in] kernel): the dense weight gradient, summed natively.
    return rowwise.native_backward(xs, kernels, g, scores, *args, input_grads=cfg.input_grads)


@_native_rowwise.defjvp
def _native_rowwise_jvp(cfg: _Config, primals, tangents):
    return jax.jvp(functools.partial(_xla_rowwise, cfg), primals, tangents)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _meprop(cfg: _Config, xs, kernels, bias, key, taps, record, adaptive_tap):
    return _forward(cfg, xs, kernels, bias)


def _meprop_fwd(cfg: _Config, *args):
    # symbolic_zeros: each leaf comes as (value, perturbed). Which inputs are perturbed travels
    # to the backward in the residuals' structure (None or ()), as it must stay static.
    wanted = tuple(() if x.perturbed else None for x in args[0])
    xs, kernels, bias, key, _, _, _ = jax.tree.map(
        lambda leaf: leaf.value, args, is_leaf=lambda leaf: isinstance(leaf, CustomVJPPrimal)
    )
    return _forward(cfg, xs, kernels, bias), (xs, kernels, bias, key, wanted)


def _meprop_bwd(cfg: _Config, residuals, g: Array):
    xs, kernels, bias, key, wanted = residuals
    if None in wanted:
        cfg = dataclasses.replace(cfg, input_grads=tuple(w is not None for w in wanted))
    lead = tuple(range(g.ndim - 1))
    non_finite = _selection.non_finite_columns(g)
    chosen = None
    if cfg.mode == "unified":
        dxs, blocks, cols, g_cols, keep = _unified_backward(cfg, xs, kernels, g, non_finite)
        selected = cols  # one selection shared by every row
        if keep is not None:
            selected = jnp.zeros(g.shape[-1:], bool).at[cols].set(keep, unique_indices=True)
            kept = _adaptive.mean_kept(keep.reshape(cfg.groups, cfg.k))
            chosen = AdaptiveTap(kept, jnp.ones((), jnp.float32)) if cfg.adaptive_tap else None
        if bias is not None and cfg.sparse_bias:
            db = jnp.where(non_finite, jnp.nan, jnp.zeros_like(bias))
            db = db.at[cols].set(jnp.sum(g_cols, axis=lead).astype(bias.dtype))
    else:
        dxs, blocks, cols, g_sparse, selected, *factors = _rowwise_backward(
            cfg, xs, kernels, g, key
        )
        if bias is not None and cfg.sparse_bias:
            db = jnp.sum(g_sparse, axis=lead).astype(bias.dtype)
    if bias is not None and not cfg.sparse_bias:
        db = jnp.sum(g, axis=lead).astype(bias.dtype)
    if bias is None:
        db = None
    dxs = _drop_unwanted(cfg, dxs)
    counts = _record_counts(g, selected, cfg.groups) if cfg.record else None
    # Compact blocks are [K, in] rows; so is every block of an [out, in] kernel.
    flip = cfg.compact and not products.transposed(cfg)
    dense = tuple(b.T if flip else b for b in blocks)
    dws = tuple(
        d if cols is None else products.scatter_columns(w, d, cols, non_finite, cfg)
        for w, d in zip(kernels, dense, strict=True)
    )
    if not cfg.compact:
        return dxs, dws, db, None, None, counts, chosen
    if cfg.factored:
        return dxs, dws, db, None, factored.tap_grads(xs, kernels, *factors[0]), counts, chosen
    # Compact: the blocks go to the taps; the kernels' dws, unless read, are compiled away.
    return dxs, dws, db, None, compact_grads(blocks, cols, g.shape[-1]), counts, chosen


_meprop.defvjp(_meprop_fwd, _meprop_bwd, symbolic_zeros=True)


def multi_linear(
    xs: Sequence[Array],
    kernels: Sequence[Array],
    bias: Array | None = None,
    *,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    groups: int = 1,
    sparse_bias: bool = False,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    taps: Sequence[CompactGrad] | None = None,
    record: RecordTap | None = None,
    memory: Array | None = None,
    decay: float = 0.0,
    adaptive: AdaptiveK | None = None,
    adaptive_tap: AdaptiveTap | None = None,
    feedback_steps: int = 1,
    kernel_layout: str = "in_out",
) -> Array:
    """``sum_j xs[j] @ kernels[j] + bias`` with one shared meProp selection in the backward.

    All inputs share the leading axes; the column selection is made once on ``g = dL/dy`` and
    applied to every input's product (an LSTM gate pre-activation ``x W_i + h W_h + b`` is the
    two-input case).

    Args:
      xs: inputs, each ``[..., in_j]``.
      kernels: weights, each ``[in_j, out]`` (``[out, in_j]`` with ``kernel_layout="out_in"``).
      bias: optional ``[out]``.
      k: see :func:`linear`.
      mode: see :func:`linear`.
      key: see :func:`linear`.
      groups: split the ``out`` columns into this many equal blocks and keep ``k`` columns in
        each (``groups * k`` in all).
      sparse_bias: see :func:`linear`.
      precision: passed to the forward and backward products.
      preferred_element_type: accumulation type of the forward products.
      taps: one :class:`CompactGrad` tap per kernel (see :func:`linear`); every tap receives
        the same ``cols``.
      record: optional zero :class:`RecordTap` for ``out // groups`` units (see
        :func:`linear`); a unit's ``groups`` columns count as one.
      memory: see :func:`linear` (``[out]``, shared by the ``groups``).
      decay: see :func:`linear`.
      adaptive: see :func:`linear`; ``k`` is then ``k_max`` per group.
      adaptive_tap: see :func:`linear`; ``kept`` is the mean over the groups.
      feedback_steps: calls that share ``memory`` (the time steps of a scanned cell): each
        re-enters ``memory / (N * feedback_steps)`` per row (see :mod:`meprop_jax.feedback`).
      kernel_layout: see :func:`linear`.

    Returns:
      ``[..., out]``.
    """
    xs, kernels = tuple(xs), tuple(kernels)
    if not xs or len(xs) != len(kernels):
        raise ValueError(
            f"xs and kernels must be non-empty and of equal length, got {len(xs)} and "
            f"{len(kernels)}"
        )
    k = _selection.check_k(k)
    mode = _selection.check_mode(mode)
    kernel_layout = rowwise.check_kernel_layout(kernel_layout)
    # The kernels' [in, out] shapes, whatever their layout.
    logical = tuple(
        w if kernel_layout == "in_out" else jax.ShapeDtypeStruct(w.shape[::-1], w.dtype)
        for w in kernels
    )
    named = "[in, out]" if kernel_layout == "in_out" else "[out, in]"
    for i, (x, w) in enumerate(zip(xs, logical, strict=True)):
        if len(w.shape) != 2 or x.shape[-1:] != w.shape[:1]:
            raise ValueError(
                f"kernels[{i}] must be {named} (kernel_layout={kernel_layout!r}) with in = "
                f"xs[{i}].shape[-1]; got x {x.shape} and kernel {kernels[i].shape}"
            )
        if w.shape[1] != logical[0].shape[1] or x.shape[:-1] != xs[0].shape[:-1]:
            raise ValueError(
                "all kernels need the same out size and all inputs the same leading axes; "
                f"got {[w.shape for w in kernels]} and {[x.shape for x in xs]}"
            )
    out = logical[0].shape[1]
    groups = _selection.check_groups(groups, out)
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},), got {bias.shape}")
    compact = taps is not None
    if compact:
        taps = _check_taps(taps, xs, logical, k=k, mode=mode, groups=groups)
    if record is not None:
        record = _check_record(record, out // groups)
    decay = feedback.check_decay(decay)
    adaptive_tap = _adaptive.check_options(adaptive, adaptive_tap, mode, k)
    if memory is not None:
        memory = feedback.check_memory(memory, out)
        if mode != "unified":
            raise ValueError(f"memory (error feedback) needs mode='unified', got mode={mode!r}")
    elif decay:
        raise ValueError(f"decay={decay} needs a memory: pass memory=init_memory({out})")
    cfg = _Config(
        k,
        mode,
        groups,
        bool(sparse_bias),
        precision,
        preferred_element_type,
        compact,
        record is not None,
        adaptive,
        adaptive_tap is not None,
        feedback.check_steps(feedback_steps),
        kernel_layout,
        factored=compact and isinstance(taps[0], FactoredGrad),
    )
    if _selection.is_dense(k, out, groups):
        # Plain JAX ops: autodiff gives exactly the stock gradient, and forward mode works.
        y = _forward(cfg, xs, kernels, bias)
        return y if record is None else _record_dense(groups, y, record)
    if mode == "random" and key is None:
        raise ValueError("mode='random' needs a PRNG key: pass key=jax.random.key(...)")
    if memory is not None and decay:
        return _with_feedback(cfg, xs, kernels, bias, taps, record, adaptive_tap, memory, decay)
    key = key if mode == "random" else None
    return _meprop(cfg, xs, kernels, bias, key, taps, record, adaptive_tap)


def _with_feedback(cfg: _Config, xs, kernels, bias, taps, record, a_tap, memory, decay):
    """meProp on the fed-back gradient (see :mod:`meprop_jax.feedback`).

    A dense bias gradient must stay ``sum g``: the bias is added after the feedback, outside
    the product, so that only the product's backward pass sees the memory.
    """
    inner_bias = bias if cfg.sparse_bias else None
    y = _meprop(cfg, xs, kernels, inner_bias, None, taps, record, a_tap)
    y = feedback.feed_back(decay, cfg.k, cfg.groups, cfg.feedback_steps, cfg.adaptive, y, memory)
    if bias is None or inner_bias is not None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def linear(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    sparse_bias: bool = False,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    tap: CompactGrad | None = None,
    record: RecordTap | None = None,
    memory: Array | None = None,
    decay: float = 0.0,
    adaptive: AdaptiveK | None = None,
    adaptive_tap: AdaptiveTap | None = None,
    kernel_layout: str = "in_out",
) -> Array:
    """``x @ kernel + bias`` whose backward pass keeps only the top-k output gradients.

    The forward pass is exactly the dense one. In the backward pass the cotangent
    ``g = dL/dy``, ``[..., out]``, is sparsified and ``dx`` and ``dkernel`` are computed from
    the kept entries alone (meProp, Sun et al. 2017):

    * ``mode="unified"``: the ``k`` columns with the largest ``sum |g|`` over all leading axes
      are kept for every row; ``dx`` and ``dkernel`` come from two small dense products
      ``[N, k] x [k, in]`` and ``[in, N] x [N, k]``. No product ever spans all ``out`` columns.
    * ``mode="per_example"``: every row keeps its own ``k`` largest ``|g|``. When the union
      of selected columns (at most ``N * k``) is smaller than ``out``, ``dx`` of a row comes
      from that row's ``k`` kernel columns (``N * k * in`` multiply-adds) and the weight
      gradient from the union's columns (on a CPU through native kernels when a C++
      compiler is available, see :mod:`meprop_jax._src.native`); otherwise both are the
      full products of the masked gradient.
    * ``mode="random"``: every row keeps ``k`` distinct uniformly random columns, without
      rescaling (needs ``key``).

    The bias gradient is the dense ``sum g`` (as in the authors' code) unless ``sparse_bias``.
    ``k = 0`` or ``k >= out`` is ordinary dense backprop. A NaN or ±inf in ``g`` is never
    dropped silently, in any mode: it ranks above every finite entry, and for finite ``x`` and
    ``kernel`` the columns of ``dkernel`` (and of ``db`` with ``sparse_bias``) that it makes
    non-finite are those dense backprop makes non-finite (NaN where it lay past the ``k``
    kept), and so are the rows of ``dx``, except that in unified mode ``dx`` is NaN throughout
    once more than ``k`` columns (per group) hold one. A compact gradient (``tap``) keeps
    ``K`` columns only: those that hold a NaN or ±inf in ``g`` are non-finite, and there is at
    least one whenever ``g`` holds any (the rule in full is in :mod:`meprop_jax._src.selection`).
    Forward-mode differentiation (``jax.jvp``) of a sparsified call is not defined and raises
    JAX's ``custom_vjp`` error; reverse mode, ``jit``, ``vmap``, ``scan``, ``checkpoint`` and
    higher-order reverse derivatives work.

    With ``tap`` (a zero :class:`CompactGrad` from :func:`compact_tap`) the weight gradient stays
    compact: the tap's gradient holds the selected columns' ``[K, in]`` block, their indices and
    an ``[out]`` indicator. Under ``jit``, differentiating the tap and not the kernel builds no
    ``[in, out]`` gradient; :mod:`meprop_jax.optim` updates the kernel from it (the kernel's own
    gradient stays the masked dense one). Gradients of a tap used by several calls add up:
    exact where all selected the same columns, refused by :mod:`meprop_jax.optim` otherwise.

    With ``record`` (a zero :class:`RecordTap` from :func:`record_tap`) the record's gradient
    counts, per output unit, the examples whose selection contained it, and the examples
    counted (see :class:`RecordTap` for each mode); the other gradients are unchanged.

    Args:
      x: ``[..., in]`` inputs.
      kernel: ``[in, out]`` weights.
      bias: optional ``[out]``.
      k: columns to keep, a static non-negative Python int; ``0`` means dense.
      mode: ``"unified"``, ``"per_example"`` (or ``"per-example"``) or ``"random"``.
      key: PRNG key, required for ``mode="random"`` and ignored otherwise.
      sparse_bias: also restrict the bias gradient to the kept entries.
      precision: passed to the products.
      preferred_element_type: accumulation type of the forward product.
      tap: optional zero :class:`CompactGrad` that receives the compact weight gradient.
      record: optional zero ``[out]`` :class:`RecordTap` that receives the selection counts.
      memory: optional float32 ``[out]`` error-feedback memory (``mode="unified"`` only; see
        :mod:`meprop_jax.feedback`): it is added to the output gradient before the selection,
        and its gradient is the next memory. A dense layer ignores it (its gradient is zero).
      decay: the memory's decay in ``[0, 1]``, a static Python float; ``0`` (the default) is
        plain meProp, bit for bit, whatever ``memory`` holds.
      adaptive: optional ``AdaptiveK`` (unified only; see :mod:`meprop_jax._src.adaptive`): ``k``
        is the upper bound ``k_max``; each step keeps the fewest top columns (at least
        ``k_min``) that hold ``mass`` of the total ``sum |g|``, the products still at width
        ``k``. The dense bias gradient stays ``sum g``; a dense layer ignores it.
      adaptive_tap: optional zero ``AdaptiveTap`` whose gradient is the chosen ``k`` and 1.
      kernel_layout: ``"in_out"`` (the default: ``kernel`` is ``[in, out]``, as in
        ``flax.linen.Dense``) or ``"out_in"`` (``kernel`` is ``W.T``, ``[out, in]``). The math is
        the same; in ``"out_in"`` a selected column is a contiguous kernel row, which makes the
        per-row modes' backward about twice as fast on a CPU, and the dense weight gradient is
        ``[out, in]`` too. A compact gradient (``tap``) is the same in both layouts.

    Returns:
      ``[..., out]``, equal to ``x @ kernel + bias``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((4, 3)); w = jnp.arange(6.0).reshape(3, 2)
      >>> loss = lambda w: linear(x, w, k=1).sum(axis=0) @ jnp.array([1.0, 10.0])
      >>> jax.grad(loss)(w).tolist()  # only the column with the larger gradient survives
      [[0.0, 40.0], [0.0, 40.0], [0.0, 40.0]]
    """
    return multi_linear(
        (x,),
        (kernel,),
        bias,
        k=k,
        mode=mode,
        key=key,
        sparse_bias=sparse_bias,
        precision=precision,
        preferred_element_type=preferred_element_type,
        taps=None if tap is None else (tap,),
        record=record,
        memory=memory,
        decay=decay,
        adaptive=adaptive,
        adaptive_tap=adaptive_tap,
        kernel_layout=kernel_layout,
    )
