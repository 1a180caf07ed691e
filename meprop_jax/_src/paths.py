"""Which layers meProp sparsifies, and with which ``k``: layer selection by path.

Shared by :func:`meprop_jax.sparsify` (Linen) and :func:`meprop_jax.nnx.sparsify`. Both find a
model's candidate layers (one :class:`_Seen` each, in call order) and hand them to
:func:`_plan` with the checked options of :func:`_check_options`: ``layers=`` selects paths
(``"/"``-joined, glob patterns where ``*`` also crosses ``/``, or a predicate; by default every
layer but the output layer, the last one applied), and ``k=`` gives every selected layer its
``k``, an int or the first matching pattern of a mapping.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from meprop_jax._src import selection as _selection


class SparsifiedLayer(NamedTuple):
    """One candidate layer of a sparsified model, in order of first use.

    Attributes:
      path: module path, ``"/"``-joined.
      kind: the Flax class name (Linen ``"Dense"``, ``"DenseGeneral"``, ``"Conv"``,
        ``"LSTMCell"``, ``"OptimizedLSTMCell"``; NNX ``"Linear"``, ``"LinearGeneral"``,
        ``"Conv"``, ``"LSTMCell"``).
      features: output width the selection ranks (per gate for LSTM cells, per group for a
        grouped convolution; a general projection's flattened features, or one head's with
        ``per_head``).
      k: the ``k`` its backward pass uses; ``0`` means ordinary dense backprop.
      reason: why: ``"sparsified"``, ``"output layer"``, ``"not selected"``,
        ``"features <= k"`` or the unsupported configuration.
    """

    path: str
    kind: str
    features: int
    k: int
    reason: str


# Layers whose kernel is [*in, *features]: no compact (sparse_update) gradient for them.
_GENERAL_KINDS = ("DenseGeneral", "LinearGeneral")


@dataclasses.dataclass(frozen=True)
class _Options:
    k: int | tuple[tuple[str, int], ...]
    mode: str
    layers: Callable[[str], bool] | tuple[str, ...] | None
    sparse_bias: bool
    rng_collection: str
    sparse_update: bool = False
    per_head: bool = False


class _Seen(NamedTuple):
    path: str
    kind: str
    features: int
    groups: int
    issue: str | None


def _plan(opts: _Options, seen: Sequence[_Seen]) -> list[SparsifiedLayer]:
    """Decides every candidate layer's ``k``; raises for a pattern that matches no layer."""
    first: dict[str, _Seen] = {}
    for s in seen:
        first.setdefault(s.path, s)
    paths = list(first)
    output_path = seen[-1].path if seen else None

    def unmatched(kind_of_pattern: str, pattern: str):
        return ValueError(
            f"sparsify: {kind_of_pattern} pattern {pattern!r} matches no layer; the model's "
            f"sparsifiable layers are {paths or 'none'}"
        )

    if opts.layers is None:
        chosen = {p for p in paths if p != output_path}
    elif callable(opts.layers):
        chosen = {p for p in paths if opts.layers(p)}
    else:
        chosen = set()
        for pattern in opts.layers:
            hits = {p for p in paths if fnmatch.fnmatchcase(p, pattern)}
            if not hits:
                raise unmatched("layers", pattern)
            chosen |= hits
    k_of: dict[str, int] = {}
    if isinstance(opts.k, int):
        k_of = dict.fromkeys(paths, opts.k)
    else:
        for pattern, k in opts.k:
            hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
            if not hits:
                raise unmatched("k", pattern)
            for p in hits:
                k_of.setdefault(p, k)
    report = []
    for path, s in first.items():
        k = k_of.get(path, 0)
        if s.issue:
            reason = s.issue
        elif path not in chosen:
            is_output = opts.layers is None and path == output_path
            reason = "output layer" if is_output else "not selected"
        elif path not in k_of:
            reason = "no k pattern matches"
        elif _selection.is_dense(k, s.features * s.groups, s.groups):
            reason = "features <= k" if k else "k = 0"
        else:
            reason = "sparsified"
        if reason == "sparsified" and opts.sparse_update and s.kind in _GENERAL_KINDS:
            raise ValueError(
                f"sparsify: sparse_update=True keeps compact gradients of [in, out] kernels "
                f"only, and layer {path!r} is a {s.kind} (multi-axis kernel): leave it dense "
                "(layers= or k= patterns that skip it) or pass sparse_update=False"
            )
        report.append(
            SparsifiedLayer(path, s.kind, s.features, k if reason == "sparsified" else 0, reason)
        )
    return report


def _check_options(
    k, mode, layers, sparse_bias, rng_collection, sparse_update=False, per_head=False
) -> _Options:
    mode = _selection.check_mode(mode)
    if isinstance(k, Mapping):
        if not k:
            raise ValueError("sparsify: k={} names no layer; give an int or patterns to k")
        items = []
        for pattern, value in k.items():
            if not isinstance(pattern, str):
                raise TypeError(f"sparsify: k's keys must be path patterns, got {pattern!r}")
            items.append((pattern, _selection.check_k(value)))
        k = tuple(items)
    else:
        k = _selection.check_k(k)
    if isinstance(layers, str):
        layers = (layers,)
    elif layers is not None and not callable(layers):
        if not isinstance(layers, Sequence) or not all(isinstance(p, str) for p in layers):
            raise TypeError(
                "sparsify: layers must be None, a glob pattern, a sequence of patterns or a "
                f"predicate on the module path, got {layers!r}"
            )
        if not layers:
            raise ValueError("sparsify: layers=[] selects no layer")
        layers = tuple(layers)
    if not isinstance(rng_collection, str):
        raise TypeError(f"sparsify: rng_collection must be a str, got {rng_collection!r}")
    return _Options(
        k, mode, layers, bool(sparse_bias), rng_collection, bool(sparse_update), bool(per_head)
    )
