"""The LSTM cell update shared by the Linen and NNX cells, once the pre-activation is known."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def lstm_update(
    z: Array, c: Array, gate_fn: Callable[..., Any], activation_fn: Callable[..., Any]
) -> tuple[Array, Array]:
    """The new ``(c, h)`` from the gates' pre-activation ``z`` and the old cell state ``c``.

    ``z`` is ``[..., 4 * hidden]`` with gates i, f, g, o along the last axis (block j is gate j).
    """
    z_i, z_f, z_g, z_o = jnp.split(z, 4, axis=-1)
    i = gate_fn(z_i)
    f = gate_fn(z_f)
    g = activation_fn(z_g)
    o = gate_fn(z_o)
    new_c = f * c + i * g
    new_h = o * activation_fn(new_c)
    return new_c, new_h
