"""The meProp settings every NNX layer keeps (``k``, ``mode``, ``sparse_bias``, the stream of
``mode="random"``) and the key a call draws; the convention is described in
:mod:`meprop_jax.nnx.layers`. Shared by the layers, :mod:`meprop_jax.nnx.general`,
:mod:`meprop_jax.nnx.conv` and :func:`meprop_jax.nnx.sparsify`."""

from __future__ import annotations

import jax
from flax import nnx

Array = jax.Array
RngArg = nnx.Rngs | nnx.RngStream | jax.Array | None


def fork_stream(mode: str, rngs: nnx.Rngs, rng_collection: str) -> nnx.RngStream | None:
    """The stream random mode draws from; forked after the parameters, so they match stock."""
    if mode != "random":
        return nnx.data(None)
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    return rngs[rng_collection].fork()


def set_meprop(
    module: nnx.Module,
    k: int,
    mode: str,
    sparse_bias: bool,
    rngs: nnx.Rngs,
    rng_collection: str,
) -> None:
    """Stores the meProp settings on ``module``, after its stock parameters are built."""
    module.k = k
    module.mode = mode
    module.sparse_bias = bool(sparse_bias)
    module.rng_collection = rng_collection
    # Not ``module.rngs``: the stock LSTM cell keeps its (deprecated) carry stream there.
    module.meprop_rngs = fork_stream(mode, rngs, rng_collection)


def step_key(layer: nnx.Module, rngs: RngArg) -> Array | None:
    """A meProp layer's key for this call: drawn in ``mode="random"`` only."""
    if layer.mode != "random":
        return None
    return draw_key(rngs, layer.meprop_rngs, layer.rng_collection)


def draw_key(rngs: RngArg, stored: nnx.RngStream | None, rng_collection: str) -> Array:
    """One key from the call argument if given, else from the stream kept at construction."""
    source = rngs if rngs is not None else stored
    if source is None:
        raise ValueError(
            "mode='random' needs an RNG: build the module with rngs=nnx.Rngs(...) or pass "
            "rngs= to the call"
        )
    if isinstance(source, nnx.Rngs):
        return source[rng_collection]()
    if isinstance(source, nnx.RngStream):
        return source()
    if isinstance(source, jax.Array):
        return source
    raise TypeError(f"rngs must be an nnx.Rngs, nnx.RngStream or a key, got {type(source)}")
