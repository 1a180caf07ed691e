"""The names of every variable collection and RNG stream the library uses, in one place.

Linen layers keep their extra state in these collections; NNX layers keep the same state as
attributes and draw from the same RNG stream name.
"""

from __future__ import annotations

#: The RNG stream (Linen and NNX) that ``mode="random"`` draws its keys from.
RNG_COLLECTION = "meprop"

#: Parameter (and tap) name of a kernel stored ``[out, in]`` (``kernel_layout="out_in"``): Linen
#: ``Dense``'s parameter, NNX ``Linear``'s attribute.
TRANSPOSED_KERNEL = "kernel_t"

#: Variable collection holding the compact-gradient taps of ``Dense(sparse_update=True)``.
TAP_COLLECTION = "meprop_taps"

#: Variable collection of meSimp's per-unit state: ``hits``, ``examples`` and ``mask``.
MESIMP_COLLECTION = "mesimp"

#: Variable collection holding the zero record taps of ``record=True`` layers.
RECORD_TAP_COLLECTION = "mesimp_taps"

#: Variable collection holding the zero chosen-k taps ``"k"`` of adaptive-k layers.
ADAPTIVE_TAP_COLLECTION = "meprop_adaptive"

#: Variable collection holding the error-feedback memories (see :mod:`meprop_jax.feedback`).
MEMORY_COLLECTION = "meprop_memory"
