"""The backward pass of the per-row modes (``"per_example"``, ``"random"``), costing what k costs.

Every row of the output gradient ``g`` ``[N, out]`` keeps its own ``S = groups * k`` entries.
The input gradient of a row needs only the kernel rows of its ``S`` columns::

    dx[n] = sum_s g[n, idx[n, s]] * W_T[idx[n, s]]          # W_T = W.T, [out, in]

so it is computed from ``lax.top_k``'s indices as a sum of ``S`` gathered kernel rows per
example: ``N * S * in`` multiply-adds rather than dense backprop's ``N * out * in``, and no
mask, no union and no product spanning ``out``. With the kernel stored transposed
(``kernel_layout="out_in"``) those rows are contiguous; with the stock ``[in, out]`` layout the
gather walks the kernel's columns: several times the cost on a CPU (47 against 7 µs at
N = 10, S = 20, in = 784), still far below the dense product's.

The weight gradient is built from the union of the rows' columns (at most ``N * S``, a static
size): its ``[K, in]`` block ``g_cols^T x`` is small, and it stays compact for the optimizers
of :mod:`meprop_jax.optim` or is written into a dense gradient by the caller. All this holds
while ``N * S < out``; once the rows cover the layer (the parser's minibatches of 250) the
caller runs the full products of the masked gradient instead, except that for a kernel stored
``[out, in]`` the native kernels still give ``dx`` from each row's own kernel rows and sum the
dense weight gradient from each row's selected entries.

NaN and ±inf follow the rule of :mod:`meprop_jax._selection`: they rank above every finite
score, so a row keeps its own non-finite entries first (``dx`` of that row is non-finite, as
in dense backprop), and the non-finite entries past a row's ``S`` stay in ``g_sparse``, so that
the weight-gradient columns holding them are non-finite too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

#: Kernel layouts of the functional API: ``[in, out]`` (``flax.linen.Dense``'s) or ``[out, in]``.
KERNEL_LAYOUTS = ("in_out", "out_in")


def check_kernel_layout(kernel_layout: object) -> str:
    """Validates ``kernel_layout``: ``"in_out"`` (stock ``[in, out]``) or ``"out_in"``."""
    if kernel_layout not in KERNEL_LAYOUTS:
        raise ValueError(
            f"kernel_layout must be one of {', '.join(map(repr, KERNEL_LAYOUTS))}, got "
            f"{kernel_layout!r}"
        )
    return str(kernel_layout)


def row_top_k(scores: Array, k: int, groups: int = 1) -> Array:
    """Indices of each row's ``k`` largest scores per group.

    Ties go to the lower index and NaN ranks first (as ``+inf``), as in
    :func:`meprop_jax._selection.top_k_mask`: the selected set is exactly that mask's. On a CPU
    the TopK call is seeded (:func:`seeded_selection`): the same set, sooner.

    Args:
      scores: ``[..., out]`` ranking values (``|g|`` or uniform draws: seeding pays only for
        scores that are all ``>= +0.0``; others take ``lax.top_k`` after the seeded call).
      k: entries kept per row and group.
      groups: equal contiguous blocks of ``out``, each keeping ``k``.

    Returns:
      ``[..., groups * k]`` int32 column indices into ``out``, group by group.
    """
    scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
    if groups == 1:
        return _top_k(scores, k)
    shape = scores.shape
    width = shape[-1] // groups
    idx = _top_k(scores.reshape((*shape[:-1], groups, width)), k)
    idx = idx + (jnp.arange(groups, dtype=idx.dtype) * width)[:, None]
    return idx.reshape((*shape[:-1], groups * k))


#: Seeded selection (:func:`_seeded_top_k`) splits a row into blocks of about this many scores.
SEED_BLOCK = 25
#: Zeros become ``-(1 + index) * _ZERO_STEP``: normal float32 numbers, distinct up to 2**23.
_ZERO_STEP = 1e-30


def _top_k(scores: Array, k: int) -> Array:
    """``lax.top_k``'s indices along the last axis; seeded on a CPU where that pays."""
    if k < 8 or 4 * k > scores.shape[-1] or scores.dtype != jnp.float32:
        return lax.top_k(scores, k)[1]
    return lax.platform_dependent(
        scores,
        cpu=lambda s: _seeded_top_k(s, k),
        default=lambda s: lax.top_k(s, k)[1],
    )


def _seeded_top_k(scores: Array, k: int) -> Array:
    """``lax.top_k(scores, k)``'s selection, faster on XLA:CPU for non-negative ``scores``."""
    idx, exact = seeded_selection(scores, k)
    return lax.cond(exact, lambda: idx, lambda: lax.top_k(scores, k)[1])


def seeded_selection(scores: Array, k: int) -> tuple[Array, Array]:
    """``(idx, exact)``: each row's ``k`` best ``scores`` from a seeded TopK call, and whether
    they are certain to be ``lax.top_k``'s selection (else :func:`_seeded_top_k` redoes it).

    XLA:CPU's TopK is a partial sort that keeps a heap of the ``k`` best scores seen so far and
    rebuilds it for each better one: in a row in random order most of its time goes there
    (38-42 µs for 10 rows of 500 at k = 20). Here each row is cut into ``B >= k`` blocks and
    the blocks' maxima are moved to its front, so that the heap starts from good candidates:
    30-32 µs with the blocks' work and the checks below included (on a 2-core CPU;
    :data:`SEED_BLOCK`).

    Moving entries changes which of two equal scores comes first, and ``lax.top_k`` keeps the
    lower index. Zeros, the common tie (a ReLU's), are made distinct and ordered by index
    first. Any other tie split at a row's ``k``-th score, a row with fewer than ``k`` scores
    above ``-inf``, or a score below ``+0.0`` leaves ``exact`` false.
    """
    *lead, width = scores.shape
    blocks = max(k, -(-width // SEED_BLOCK))
    size = -(-width // blocks)
    low = jnp.asarray(-jnp.inf, scores.dtype)
    # Below every positive score, distinct, the lower index the larger: as lax.top_k's order.
    ramp = -_ZERO_STEP * jnp.arange(1, width + 1, dtype=scores.dtype)
    ranked = jnp.where(scores == 0, ramp, scores)
    if blocks * size > width:
        pad = [(0, 0)] * len(lead) + [(0, blocks * size - width)]
        ranked = jnp.pad(ranked, pad, constant_values=low)
    tiles = ranked.reshape(*lead, blocks, size)
    iota = lax.broadcasted_iota(jnp.int32, tiles.shape, tiles.ndim - 1)
    best = jnp.max(tiles, -1, keepdims=True)
    first = jnp.min(jnp.where(tiles == best, iota, size), -1, keepdims=True)  # [..., B, 1]
    rest = jnp.where(iota == first, low, tiles).reshape(*lead, blocks * size)
    values, pos = lax.top_k(jnp.concatenate([best[..., 0], rest], -1), k)
    # Slices of top_k's outputs folded into it would turn it into a full sort.
    values, pos = lax.optimization_barrier((values, pos))
    origin = jnp.arange(blocks, dtype=jnp.int32) * size + first[..., 0]
    moved = jnp.take_along_axis(origin, jnp.minimum(pos, blocks - 1), -1)
    idx = jnp.where(pos < blocks, moved, pos - blocks)
    kth = values[..., -1:]
    whole = jnp.sum(ranked[..., :width] == kth, -1) == jnp.sum(values == kth, -1)
    return idx, jnp.all(whole & (kth[..., 0] > low)) & ~jnp.any(jnp.signbit(scores))


def selection_mask(idx: Array, out: int) -> Array:
    """``[..., out]`` bool mask of the indices ``idx`` ``[..., S]`` (a compare, not a scatter:
    XLA:CPU runs per-row scatters slowly)."""
    iota = lax.broadcasted_iota(idx.dtype, (*idx.shape, out), idx.ndim)
    return jnp.any(idx[..., None] == iota, axis=-2)


def gathered_input_grad(
    g_kept: Array, idx: Array, kernel: Array, kernel_layout: str, precision, dtype
) -> Array:
    """``dx[n] = sum_s g_kept[n, s] * kernel column idx[n, s]``, ``[N, in]``.

    Args:
      g_kept: ``[N, S]`` the kept gradient entries of each row.
      idx: ``[N, S]`` their column indices.
      kernel: ``[out, in]`` (``"out_in"``) or ``[in, out]`` (``"in_out"``).
      kernel_layout: the kernel's layout.
      precision: of the contraction (used only past :data:`UNROLLED_SLOTS`).
      dtype: of the result.
    """
    batch, kernel = _batch_spec(idx), jnp.asarray(kernel)
    if 0 < idx.shape[-1] <= UNROLLED_SLOTS:
        return _unrolled_input_grad(g_kept, idx, kernel, kernel_layout, batch).astype(dtype)
    if kernel_layout == "out_in":
        # [N, S, in]: contiguous rows.
        rows = kernel.at[idx].get(mode="clip", out_sharding=_sharding(idx, batch, None, None))
        spec = "ns,nsi->ni"
    else:
        n, s = idx.shape
        flat = idx.reshape(-1)
        rows = kernel.at[:, flat].get(mode="clip", out_sharding=_sharding(idx, None, batch))
        rows = rows.reshape(-1, n, s)
        spec = "ns,ins->ni"
    return jnp.einsum(spec, g_kept.astype(rows.dtype), rows, precision=precision).astype(dtype)


#: Up to this many slots per row, ``dx`` is a sum of one gathered ``[N, in]`` term per slot.
#: XLA fuses those gathers, products and adds into one loop over ``[N, in]``; the einsum
#: materialises ``[N, S, in]`` first and took 3.9x as long at N = 10, S = 20, in = 784 on a
#: CPU (2x at S = 64). Past it the unrolled sum compiles too slowly for what it saves. When
#: ``dx`` itself has several consumers, XLA writes each gathered term out instead (it will not
#: copy the gathers into every consumer), which costs about what the einsum did.
UNROLLED_SLOTS = 64


def _unrolled_input_grad(g_kept: Array, idx: Array, kernel: Array, layout: str, batch):
    # Accumulate in at least float32, as the einsum's dot would.
    acc_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    g_kept = g_kept.astype(acc_dtype)
    # Without the barrier XLA folds the per-slot slices into the selection's own output and
    # can no longer match lax.top_k as its TopK call: it sorts the whole row (20x slower).
    idx = lax.optimization_barrier(idx)
    total = None
    for s in range(idx.shape[-1]):
        column = idx[:, s]
        if layout == "out_in":
            rows = kernel.at[column].get(mode="clip", out_sharding=_sharding(idx, batch, None))
        else:
            rows = kernel.at[:, column].get(mode="clip", out_sharding=_sharding(idx, None, batch)).T
        term = g_kept[:, s, None] * rows.astype(acc_dtype)
        total = term if total is None else total + term
    return total


def _batch_spec(idx: Array):
    """The mesh axis ``idx``'s rows are sharded along, or None."""
    spec = getattr(jax.typeof(idx).sharding, "spec", None)
    return spec[0] if spec else None


def _sharding(idx: Array, *spec):
    """A gather's output sharding under explicit mesh axes (which JAX will not guess for an
    index sharded along the batch), or None when ``idx`` is not sharded."""
    mesh = getattr(jax.typeof(idx).sharding, "mesh", None)
    if mesh is None or mesh.empty or all(s is None for s in spec):
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def union_columns(idx: Array, mask: Array) -> Array:
    """The columns any row selected, one slot per selected entry, ``[N * S]`` int32.

    Slot ``n * S + s`` holds ``idx[n, s]`` when no earlier row selected that column, and the
    padding ``out + n * S + s`` otherwise: the real entries are distinct, and the padding is
    distinct and out of range (gathers fill it with zeros, scatters drop it, and the optimizers
    of :mod:`meprop_jax.optim` skip it). No ``nonzero``: a running count down the rows of the
    mask finds the earlier rows, a few thousand compares where XLA:CPU's ``nonzero`` costs
    several times more.

    Args:
      idx: ``[N, S]`` each row's selected columns (distinct within a row).
      mask: ``[N, out]`` bool, the same selection as a mask.
    """
    out = mask.shape[-1]
    if _sharding(mask, _batch_spec(mask)) is not None:
        # A running count cannot run along a sharded axis: gather the (small) selection.
        idx, mask = (jax.sharding.reshard(a, jax.sharding.PartitionSpec()) for a in (idx, mask))
    counts = mask.astype(jnp.int32)
    taken = jnp.cumsum(counts, axis=0) - counts  # rows above that chose the column
    first = jnp.take_along_axis(taken, idx, axis=-1) == 0
    flat = idx.reshape(-1)
    slots = jnp.arange(flat.shape[0], dtype=flat.dtype)
    return jnp.where(first.reshape(-1), flat, out + slots)


def kept_gradient(g: Array, idx: Array) -> tuple[Array, Array]:
    """``(mask, g_sparse)`` of each row's kept columns ``idx`` ``[N, S]``: ``mask`` ``[N, out]``
    bool, and ``g_sparse``, ``g`` where the mask holds or ``g`` is not finite (the library's
    rule) and zero elsewhere."""
    mask = selection_mask(idx, g.shape[-1])
    return mask, jnp.where(mask.reshape(g.shape) | ~jnp.isfinite(g), g, jnp.zeros((), g.dtype))


def wanted_inputs(input_grads, count: int) -> tuple[bool, ...]:
    """Per input, whether its ``dx`` is wanted: ``input_grads``, or every one when None."""
    return input_grads or (True,) * count


def rowwise_selection(g: Array, scores: Array, k: int, groups: int):
    """Each row's kept indices and values, and the masked gradient.

    Args:
      g: ``[..., out]`` output gradient.
      scores: ``[..., out]`` ranking (``|g|`` or random draws; non-finite entries of ``g``
        must rank first).
      k: entries kept per row and group.
      groups: equal blocks of ``out``.

    Returns:
      ``(idx, g_kept, mask, g_sparse)``: ``idx`` and ``g_kept`` ``[N, groups * k]`` with
      ``N`` the product of the leading axes, ``mask`` ``[N, out]`` bool and ``g_sparse``,
      ``g`` where the mask holds or ``g`` is not finite and zero elsewhere.
    """
    out = g.shape[-1]
    idx = row_top_k(scores, k, groups).reshape(-1, groups * k)
    g_kept = jnp.take_along_axis(g.reshape(-1, out), idx, axis=-1)
    mask, g_sparse = kept_gradient(g, idx)
    return idx, g_kept, mask, g_sparse


def native_backward(
    xs,
    kernels,
    g: Array,
    scores: Array,
    k: int,
    groups: int,
    layout: str,
    rows,
    covers=False,
    input_grads=None,
):
    """The backward of the per-row modes through the native kernels (:mod:`.native`).

    ``(dxs, blocks, cols, g_sparse, mask)``: the results of the XLA path of
    ``meprop_jax._src.linear._rowwise_backward`` when the union is below ``out``, each block
    ``[K, in]`` with ``rows`` (compact, or an ``[out, in]`` kernel) and ``[in, K]`` otherwise.
    When the rows cover the layer (``covers``, native only for a kernel stored ``[out, in]``)
    ``dxs`` still come from each row's own kernel rows, and ``blocks`` are the dense ``[out,
    in]`` weight gradients, the full product of ``g_sparse`` summed from each row's selected
    entries (``N * S * in`` multiply-adds each, not ``N * out * in``); ``cols`` is None.
    ``input_grads``: per input, whether its ``dx`` is wanted (None: all); an unwanted one is
    not computed and comes back as None.
    """
    from meprop_jax._src import native

    out = g.shape[-1]
    g2 = g.reshape(-1, out)
    ranked = jnp.where(jnp.isnan(scores), jnp.inf, scores).astype(jnp.float32)
    idx = native.select(ranked.reshape(-1, out), k, groups)
    dxs, blocks, cols = [], [], None
    for x, w, want in zip(xs, kernels, wanted_inputs(input_grads, len(xs)), strict=True):
        x2 = x.reshape(-1, x.shape[-1])
        form = "dense" if covers else True
        dx, block, cols = native.products(g2, idx, x2, w, layout == "out_in", form, dx=want)
        dxs.append(dx.reshape(x.shape) if want else None)
        blocks.append(block if rows else block.T)
    mask, g_sparse = kept_gradient(g, idx)
    return tuple(dxs), tuple(blocks), None if covers else cols, g_sparse, mask.reshape(g.shape)
