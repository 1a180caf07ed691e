"""Layers more than one task uses."""

import jax
import jax.numpy as jnp

__all__ = ["inverted_dropout"]


def inverted_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zeroes each entry with probability ``rate`` and scales the rest by ``1 / (1 - rate)``.

    Written out rather than ``nn.Dropout`` so that the mask is drawn with ``x``'s sharding:
    under explicit mesh axes a replicated mask cannot be combined with a batch-sharded ``x``.
    """
    keep = 1.0 - rate
    sharding = getattr(jax.typeof(x), "sharding", None)
    mask = jax.random.bernoulli(key, keep, x.shape, out_sharding=sharding)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
