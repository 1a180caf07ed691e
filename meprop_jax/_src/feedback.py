"""Error feedback for unified meProp: the op; documented in :mod:`meprop_jax.feedback`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from meprop_jax._src import adaptive as _adaptive
from meprop_jax._src import selection as _selection
from meprop_jax._src.collections import MEMORY_COLLECTION

Array = jax.Array

__all__ = [
    "MEMORY_COLLECTION",
    "check_decay",
    "feed_back",
    "init_memory",
    "merge_memory",
    "split_memory",
]


def check_decay(decay: object) -> float:
    """Validates a memory decay: a static Python number in ``[0, 1]``; returns a ``float``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a Python float in [0, 1], got {decay!r}")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be in [0, 1] (0 = plain meProp), got {decay}")
    return float(decay)


def check_steps(steps: object) -> int:
    """Validates the number of calls that share a memory: a static Python int >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"feedback_steps must be an int >= 1, got {steps!r}")
    return steps


def init_memory(out_features: int) -> Array:
    """The empty memory of a layer with ``out_features`` outputs: float32 zeros ``[out]``."""
    return jnp.zeros((out_features,), jnp.float32)


def check_memory(memory: Array, out_features: int) -> Array:
    """Raises a ValueError unless ``memory`` is float32 ``[out_features]``."""
    if jnp.shape(memory) != (out_features,) or jnp.result_type(memory) != jnp.float32:
        raise ValueError(
            f"memory must be float32[{out_features}] (one entry per output column); got "
            f"{jnp.result_type(memory)}{list(jnp.shape(memory))}. Build it with init_memory()."
        )
    return memory


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def feed_back(
    decay: float,
    k: int,
    groups: int,
    steps: int,
    adaptive: _adaptive.AdaptiveK | None,
    y: Array,
    memory: Array,
) -> Array:
    """Identity on ``y`` ``[..., out]``; its backward pass feeds ``memory`` back (see module).

    Place it on the output of a unified meProp product with the same ``k``, ``groups`` and
    ``adaptive``: the cotangent of ``y`` becomes ``g' = g + memory / (N * steps)`` and the
    cotangent of ``memory`` is the next memory, ``decay`` times the column sums of ``g'``
    outside the columns the product propagates. ``steps`` is the number of calls (time steps
    of a scan) that share the memory, 1 otherwise.
    """
    del decay, k, groups, steps, adaptive, memory
    return y


def _feed_back_fwd(decay, k, groups, steps, adaptive, y, memory):
    return y, memory


def _feed_back_bwd(decay, k, groups, steps, adaptive, memory, g):
    out = g.shape[-1]
    rows = max(g.size // out, 1) * steps
    g_fed = g + (memory / rows).astype(g.dtype)
    if adaptive is None:
        cols = _selection.unified_columns(g_fed, k, groups)
    else:
        cols, keep = _selection.adaptive_columns(g_fed, k, adaptive, groups)
        cols = jnp.where(keep, cols, out)  # out of range: dropped by the scatter below
    sums = jnp.sum(g_fed.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
    left_out = sums.at[cols].set(0.0, mode="drop", unique_indices=adaptive is None)
    return g_fed, jnp.asarray(decay, jnp.float32) * left_out


feed_back.defvjp(_feed_back_fwd, _feed_back_bwd)


def split_memory(variables: Any) -> tuple[Any, Any]:
    """``(variables without the memory collection, the memory collection or None)``.

    Works on Flax variables and on their gradients (where the memory's "gradient" is the next
    memory); any other pytree, or variables without a memory, comes back whole with None.
    """
    if not isinstance(variables, Mapping) or MEMORY_COLLECTION not in variables:
        return variables, None
    rest = {name: v for name, v in variables.items() if name != MEMORY_COLLECTION}
    return rest, variables[MEMORY_COLLECTION]


def merge_memory(variables: Any, memory: Any) -> Any:
    """``variables`` with the memory collection set to ``memory`` (unchanged when None)."""
    if memory is None:
        return variables
    rest, _ = split_memory(variables)
    return {**rest, MEMORY_COLLECTION: memory}
