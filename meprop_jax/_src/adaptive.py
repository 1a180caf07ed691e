"""Adaptive k (TinyProp-style): per layer and per step, as few columns as hold a share of the mass.

TinyProp (Rückert et al., arXiv 2308.09201) lets every layer choose at every step how much of
its output gradient ``g = dL/dy`` to propagate. Here that choice sits on top of the unified
selection (see :mod:`meprop_jax._src.selection`): the columns are ranked by their score
``sum |g|`` over the leading axes, and a layer whose ``k`` is ``k_max`` keeps, in each group,

    the smallest ``k`` in ``[k_min, k_max]`` whose top-``k`` columns hold at least ``mass`` of
    the group's total score (``k_max`` when even the top ``k_max`` hold less).

A gradient concentrated in a few columns keeps few; a flat one keeps up to ``k_max``.

What it saves and what it does not
----------------------------------
Shapes stay static under ``jit``: the products of the backward pass still run at the width
``k_max``, with the gradient columns past the chosen ``k`` zeroed. So the FLOPs are those of
plain meProp with ``k = k_max``, plus a cumulative sum over the ``k_max`` ranked scores. What
shrinks is the *result*: the weight gradient has ``k`` non-zero columns instead of ``k_max``
(an optimizer that skips zero columns, or a plain SGD step, touches fewer weights), and the
gradient passed down is built from ``k`` columns. With error feedback the ``k_max - k``
dropped columns are memorized like every other unselected column.

The chosen ``k`` of a call comes out as the cotangent of a zero-valued :class:`AdaptiveTap`
input (like the other taps, see :mod:`meprop_jax._src.taps`): ``kept`` is the columns kept per
group, averaged over the groups, and ``calls`` is 1. A tap shared by several calls (an LSTM
cell scanned over time) sums both, so ``kept / calls`` is always the mean chosen ``k``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveK:
    """The adaptive-k rule of a layer whose ``k`` (per group) is the upper bound ``k_max``.

    Attributes:
      mass: fraction in ``(0, 1]`` of a group's total column score that the kept columns must
        hold (TinyProp's share of the gradient's mass).
      k_min: the fewest columns kept per group, ``1 <= k_min <= k_max``.

    Example:
      >>> AdaptiveK(mass=0.9, k_min=4)
      AdaptiveK(mass=0.9, k_min=4)
    """

    mass: float = 0.9
    k_min: int = 1

    def __post_init__(self) -> None:
        mass, k_min = self.mass, self.k_min
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
            raise ValueError(f"AdaptiveK.mass must be a number in (0, 1], got {mass!r}")
        if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
            raise ValueError(f"AdaptiveK.k_min must be an int >= 1, got {k_min!r}")
        object.__setattr__(self, "mass", float(mass))

    def check(self, k_max: int) -> AdaptiveK:
        """Raises a ValueError unless ``k_min <= k_max``; returns ``self``."""
        if self.k_min > k_max:
            raise ValueError(
                f"adaptive k needs k_min <= k_max: got k_min={self.k_min} and the layer's "
                f"k={k_max} (the upper bound)"
            )
        return self


class AdaptiveTap(NamedTuple):
    """The chosen ``k`` of one backward pass, carried out as a tap's cotangent.

    As an input of :func:`meprop_jax.linear` both arrays are zeros and their values are
    ignored; their cotangents, taken by ``jax.grad``, are the record of that backward pass.

    Attributes:
      kept: ``[]`` float32: columns kept per group (averaged over the groups).
      calls: ``[]`` float32: 1 per backward pass (a tap shared by a scan sums them).
    """

    kept: Array
    calls: Array


def adaptive_tap() -> AdaptiveTap:
    """The zero-valued :class:`AdaptiveTap` to pass to :func:`meprop_jax.linear`."""
    return AdaptiveTap(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def check_tap(tap: object) -> AdaptiveTap:
    """Raises a ValueError unless ``tap`` is two float32 scalars; returns an AdaptiveTap."""
    try:
        kept, calls = tap  # type: ignore[misc]
        ok = all(jnp.shape(a) == () and jnp.result_type(a) == jnp.float32 for a in (kept, calls))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"adaptive_tap must be AdaptiveTap(kept float32[], calls float32[]); got {tap!r}. "
            "Build it with adaptive_tap()."
        )
    return AdaptiveTap(kept, calls)


def kept_ranks(ranked: Array, total: Array, rule: AdaptiveK) -> Array:
    """Which of the ranked columns the rule keeps.

    Args:
      ranked: ``[groups, k_max]`` column scores in descending order (non-finite columns,
        scored ``+inf``, first).
      total: ``[groups, 1]`` total score of each group (all its columns, not only the top).
      rule: the adaptive-k rule.

    Returns:
      ``[groups, k_max]`` bool, a prefix of each row: rank ``r`` is kept when ``r < k_min``,
      when the columns ranked above it hold less than ``mass * total``, or when its column
      holds a NaN or ±inf (never dropped silently).

    Example:
      >>> import jax.numpy as jnp
      >>> ranked = jnp.array([[6.0, 2.0, 1.0, 1.0]])  # total 10
      >>> kept_ranks(ranked, jnp.array([[10.0]]), AdaptiveK(mass=0.75)).tolist()
      [[True, True, False, False]]
    """
    # Exclusive prefix sums: the mass of the columns ranked above each one.
    before = jnp.cumsum(ranked, axis=-1) - ranked
    rank = lax.broadcasted_iota(jnp.int32, ranked.shape, ranked.ndim - 1)
    return (before < rule.mass * total) | (rank < rule.k_min) | (ranked == jnp.inf)


def mean_kept(keep: Array) -> Array:
    """``[]`` float32: kept columns per group, from the ``[groups, k_max]`` mask."""
    return jnp.sum(keep, dtype=jnp.float32) / keep.shape[0]


def check_options(rule: object, tap: object, mode: str, k: int) -> AdaptiveTap | None:
    """Validates the ``adaptive`` and ``adaptive_tap`` arguments of a meProp call of ``k``.

    Raises:
      TypeError: ``rule`` is neither None nor an :class:`AdaptiveK`.
      ValueError: adaptive k outside ``mode="unified"`` or with ``k_min > k > 0``, or a
        tap without a rule.
    """
    if rule is not None:
        if not isinstance(rule, AdaptiveK):
            raise TypeError(f"adaptive must be an AdaptiveK or None, got {rule!r}")
        if mode != "unified":
            raise ValueError(f"adaptive k needs mode='unified' (a column ranking), got {mode!r}")
        if k > 0:  # k = 0 is a dense layer, which ignores the rule
            rule.check(k)
    if tap is None:
        return None
    if rule is None:
        raise ValueError("adaptive_tap records the chosen k: it needs adaptive=AdaptiveK(...)")
    return check_tap(tap)
