"""Batched greedy arc-standard decoding on the device.

The parser state of a batch of sentences lives in arrays (:class:`State`) and one
``lax.while_loop`` applies a transition to every sentence per iteration, featurizing and
scoring on the device: no Python runs per transition. The semantics are those of
:mod:`experiments.parsing.transitions` (tested against its one-sentence reference decoder).
Illegal transitions get score ``-inf``, so every parse is a tree with one root.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from experiments.parsing.transitions import NULL_ID, SHIFT, num_transitions

__all__ = ["State", "apply_transitions", "decode", "feature_ids", "feature_tokens", "legal_mask"]

Array = jax.Array


class State(NamedTuple):
    """Parser states of a batch; token arrays are ``[batch, N + 1]`` (token 0 = ROOT).

    Attributes:
      stack: ``stack[b, :size[b]]`` is sentence b's stack, bottom first.
      size: ``[batch]`` stack sizes.
      next: ``[batch]`` the buffer's front (``length + 1``: empty).
      length: ``[batch]`` sentence lengths (0 for padding rows).
      head, label, lc1, lc2, rc1, rc2: as in :class:`~experiments.parsing.transitions.Config`.
    """

    stack: Array
    size: Array
    next: Array
    length: Array
    head: Array
    label: Array
    lc1: Array
    lc2: Array
    rc1: Array
    rc2: Array

    @property
    def done(self) -> Array:
        """``[batch]`` bool: ROOT alone on the stack and the buffer empty."""
        return (self.size == 1) & (self.next > self.length)


def initial_state(lengths: Array, max_length: int) -> State:
    """The initial states of sentences of ``lengths [batch]``, padded to ``max_length``."""
    lengths = lengths.astype(jnp.int32)
    # Built from ``lengths`` so that every array shares its batch sharding.
    zeros = jnp.zeros_like(lengths)[:, None] + jnp.zeros((1, max_length + 1), jnp.int32)
    none = zeros - 1
    return State(
        stack=zeros,
        size=jnp.ones_like(lengths),
        next=jnp.ones_like(lengths),
        length=lengths,
        head=none,
        label=none,
        lc1=none,
        lc2=none,
        rc1=none,
        rc2=none,
    )


def _at(array: Array, token: Array) -> Array:
    """``array[b, token[b]]`` for every row, -1 where ``token`` is -1."""
    value = jnp.take_along_axis(array, jnp.maximum(token, 0)[:, None], axis=1)[:, 0]
    return jnp.where(token >= 0, value, -1)


def _gather_rows(array: Array, tokens: Array) -> Array:
    """``array[b, tokens[b, j]]`` ``[batch, J]`` (tokens in range)."""
    return jnp.take_along_axis(array, tokens, axis=1)


def feature_tokens(state: State) -> Array:
    """``[batch, 18]`` feature tokens, in the order of ``transitions.feature_tokens``."""
    s = [
        jnp.where(state.size >= i, _at(state.stack, jnp.maximum(state.size - i, 0)), -1)
        for i in (1, 2, 3)
    ]
    b = [jnp.where(state.next + i <= state.length, state.next + i, -1) for i in range(3)]
    children = []
    for top in s[:2]:
        children += [_at(a, top) for a in (state.lc1, state.rc1, state.lc2, state.rc2)]
    grandchildren = []
    for top in s[:2]:
        grandchildren += [
            _at(state.lc1, _at(state.lc1, top)),
            _at(state.rc1, _at(state.rc1, top)),
        ]
    return jnp.stack(s + b + children + grandchildren, axis=1)


def feature_ids(state: State, words: Array, tags: Array, labelled: bool) -> Array:
    """``[batch, 48]`` (``[batch, 36]`` unlabelled) feature ids; ``words``/``tags`` are the
    ids of tokens ``0..N``, ``[batch, N + 1]``."""
    tokens = feature_tokens(state)
    safe = jnp.maximum(tokens, 0)
    present = tokens >= 0

    def ids(array: Array, where: Array, rows: Array, offset: int = 0) -> Array:
        value = _gather_rows(array, rows) + offset
        return jnp.where(where, value, NULL_ID)

    parts = [ids(words, present, safe), ids(tags, present, safe)]
    if labelled:
        parts.append(ids(state.label, present[:, 6:], safe[:, 6:], 1))
    return jnp.concatenate(parts, axis=1).astype(jnp.int32)


def legal_mask(state: State, num_labels: int) -> Array:
    """``[batch, T]`` bool: the legal transitions of every state."""
    buffer_empty = state.next > state.length
    shift = ~buffer_empty
    left = state.size >= 3
    right = left | ((state.size == 2) & buffer_empty)
    return jnp.concatenate(
        [
            shift[:, None],
            jnp.broadcast_to(left[:, None], (left.shape[0], num_labels)),
            jnp.broadcast_to(right[:, None], (left.shape[0], num_labels)),
        ],
        axis=1,
    )


def _set(array: Array, index: Array, value: Array, where: Array) -> Array:
    """``array[b, index[b]] = value[b]`` for the rows in ``where``."""
    # Rows outside ``where`` write out of range, and the write is dropped. A vmapped scatter
    # keeps the batch axis's sharding on an explicit mesh (a row-index array would not).
    column = jnp.where(where & (index >= 0), index, array.shape[1])
    return jax.vmap(lambda row, i, v: row.at[i].set(v, mode="drop"))(array, column, value)


def apply_transitions(state: State, transition: Array, num_labels: int) -> State:
    """Applies ``transition [batch]`` to every unfinished state (finished ones stay put)."""
    active = ~state.done
    shift = active & (transition == SHIFT)
    left = active & (transition >= 1) & (transition <= num_labels)
    right = active & (transition > num_labels)
    arc = left | right
    s1 = _at(state.stack, state.size - 1)
    s2 = _at(state.stack, jnp.maximum(state.size - 2, 0))
    head = jnp.where(left, s1, s2)
    dep = jnp.where(left, s2, s1)
    label = (transition - 1) % num_labels
    # SHIFT pushes next; LEFT-ARC moves s1 down into s2's slot; RIGHT-ARC just pops.
    slot = jnp.where(shift, state.size, state.size - 2)
    stack = _set(state.stack, slot, jnp.where(shift, state.next, s1), shift | left)
    size = state.size + shift.astype(jnp.int32) - arc.astype(jnp.int32)
    lc1_old = _at(state.lc1, head)
    rc1_old = _at(state.rc1, head)
    return State(
        stack=stack,
        size=size,
        next=state.next + shift.astype(jnp.int32),
        length=state.length,
        head=_set(state.head, dep, head, arc),
        label=_set(state.label, dep, label, arc),
        lc1=_set(state.lc1, head, dep, left),
        lc2=_set(state.lc2, head, lc1_old, left),
        rc1=_set(state.rc1, head, dep, right),
        rc2=_set(state.rc2, head, rc1_old, right),
    )


def decode(
    score: Callable[[Array], Array],
    words: Array,
    tags: Array,
    lengths: Array,
    num_labels: int,
    labelled: bool,
) -> State:
    """Greedy parses of a batch: the legal transition of highest score, until all are done.

    Args:
      score: feature ids ``[batch, F]`` -> scores ``[batch, T]``.
      words, tags: ``[batch, N + 1]`` ids of tokens ``0..N`` (column 0: ROOT's ids).
      lengths: ``[batch]`` sentence lengths (0: a padding row, done from the start).
      num_labels: ``L`` (1 for an unlabelled parser).
      labelled: use the 12 label features.

    Returns:
      The final states: ``head[:, 1:]`` are the heads (0 = root), ``label[:, 1:]`` the label
      indices.
    """
    state = initial_state(lengths, words.shape[1] - 1)
    n_trans = num_transitions(num_labels)

    def body(state: State) -> State:
        scores = score(feature_ids(state, words, tags, labelled))
        scores = jnp.where(legal_mask(state, num_labels), scores, -jnp.inf)
        best = jnp.argmax(scores[:, :n_trans], axis=1).astype(jnp.int32)
        return apply_transitions(state, best, num_labels)

    return lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
