"""Arc-standard transitions, the static oracle and Chen & Manning's features, on the host.

A configuration holds a stack (token 0, ROOT, at the bottom), a buffer (tokens ``next..n``)
and the arcs built so far. Transitions, as integers (``L`` labels; an unlabelled parser has
``L = 1``):

* ``0``: SHIFT, move the buffer's front onto the stack;
* ``1 + l``: LEFT-ARC(l), ``s1 -> s2`` with label ``l``, pop ``s2`` (``s2`` must not be ROOT);
* ``1 + L + l``: RIGHT-ARC(l), ``s2 -> s1``, pop ``s1`` (``s2 = ROOT`` only once the buffer is
  empty, so every parse has exactly one root).

A sentence of ``n`` tokens takes exactly ``2n`` transitions, and any sequence of legal ones
ends in a projective tree. Features (Chen & Manning 2014): the 18 tokens of
:func:`feature_tokens` give 18 word and 18 tag ids; the last 12 (children) also give the ids
of their arc labels. Token -1 (no such token) is NULL.

Everything here is plain Python: the reference the on-device decoder is tested against, and
the oracle that turns training trees into examples once, before training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "NULL_ID",
    "NUM_FEATURE_TOKENS",
    "NUM_LABEL_FEATURES",
    "SHIFT",
    "Config",
    "feature_ids",
    "feature_tokens",
    "legal_mask",
    "num_transitions",
    "oracle",
    "parse_reference",
]

SHIFT = 0
#: The id of NULL (no token) in every vocabulary: words, tags and labels.
NULL_ID = 0
NUM_FEATURE_TOKENS = 18
NUM_LABEL_FEATURES = 12


def num_transitions(num_labels: int) -> int:
    """SHIFT plus a LEFT-ARC and a RIGHT-ARC per label."""
    return 1 + 2 * num_labels


@dataclass
class Config:
    """A parser configuration of a sentence of ``n`` tokens (arrays indexed by token 0..n).

    Attributes:
      n: sentence length.
      stack: token ids, bottom (ROOT) first.
      next: the buffer's front (``n + 1``: empty buffer).
      head, label: each token's head and arc label index once attached, else -1.
      lc1, lc2, rc1, rc2: each token's leftmost, second leftmost, rightmost and second
        rightmost child so far (-1: none). Left children are attached nearest first, so the
        newest left child is the leftmost; the same holds for right children.
    """

    n: int
    stack: list[int] = field(default_factory=lambda: [0])
    next: int = 1
    head: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    lc1: list[int] = field(default_factory=list)
    lc2: list[int] = field(default_factory=list)
    rc1: list[int] = field(default_factory=list)
    rc2: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("head", "label", "lc1", "lc2", "rc1", "rc2"):
            if not getattr(self, name):
                setattr(self, name, [-1] * (self.n + 1))

    @property
    def done(self) -> bool:
        """Whether the parse is complete (ROOT alone on the stack, empty buffer)."""
        return len(self.stack) == 1 and self.next > self.n

    def apply(self, transition: int, num_labels: int) -> None:
        """Applies a (legal) transition."""
        if transition == SHIFT:
            self.stack.append(self.next)
            self.next += 1
            return
        s1, s2 = self.stack[-1], self.stack[-2]
        if transition <= num_labels:  # LEFT-ARC: s1 -> s2
            head, dep = s1, s2
            self.lc2[head], self.lc1[head] = self.lc1[head], dep
            del self.stack[-2]
        else:  # RIGHT-ARC: s2 -> s1
            head, dep = s2, s1
            self.rc2[head], self.rc1[head] = self.rc1[head], dep
            self.stack.pop()
        self.head[dep] = head
        self.label[dep] = (transition - 1) % num_labels


def legal_mask(config: Config, num_labels: int) -> np.ndarray:
    """``[num_transitions]`` bool: which transitions are legal in ``config``."""
    size, buffer_empty = len(config.stack), config.next > config.n
    mask = np.zeros(num_transitions(num_labels), bool)
    mask[SHIFT] = not buffer_empty
    mask[1 : 1 + num_labels] = size >= 3  # s2 exists and is not ROOT
    mask[1 + num_labels :] = size >= 3 or (size == 2 and buffer_empty)
    return mask


def feature_tokens(config: Config) -> list[int]:
    """The 18 feature tokens (-1 = NULL): s1, s2, s3, b1, b2, b3; lc1, rc1, lc2, rc2 of s1,
    then of s2; lc1(lc1(s1)), rc1(rc1(s1)), lc1(lc1(s2)), rc1(rc1(s2))."""
    stack = config.stack
    s = [stack[-i] if len(stack) >= i else -1 for i in (1, 2, 3)]
    b = [config.next + i if config.next + i <= config.n else -1 for i in range(3)]

    def child(array: list[int], token: int) -> int:
        return array[token] if token >= 0 else -1

    children = []
    for top in s[:2]:
        children += [child(a, top) for a in (config.lc1, config.rc1, config.lc2, config.rc2)]
    grandchildren = []
    for top in s[:2]:
        grandchildren += [
            child(config.lc1, child(config.lc1, top)),
            child(config.rc1, child(config.rc1, top)),
        ]
    return s + b + children + grandchildren


def feature_ids(
    config: Config, words: Sequence[int], tags: Sequence[int], labelled: bool
) -> np.ndarray:
    """The feature ids of ``config``: 18 words, 18 tags, and (``labelled``) 12 labels.

    Args:
      config: the configuration.
      words, tags: ids of tokens ``0..n`` (index 0: ROOT's ids).
      labelled: add the 12 label features; a label index ``l`` has id ``l + 1`` (0 = NULL).

    Returns:
      ``[48]`` (or ``[36]``) int32.
    """
    tokens = feature_tokens(config)
    ids = [words[t] if t >= 0 else NULL_ID for t in tokens]
    ids += [tags[t] if t >= 0 else NULL_ID for t in tokens]
    if labelled:
        ids += [config.label[t] + 1 if t >= 0 else NULL_ID for t in tokens[6:]]
    return np.asarray(ids, np.int32)


def oracle(heads: Sequence[int], labels: Sequence[int], num_labels: int) -> list[int] | None:
    """The static oracle's transitions for a gold tree, or None when arc-standard cannot
    build it (a non-projective tree, or one with more than one root).

    Args:
      heads: head of tokens ``1..n`` (0 = root).
      labels: label index of tokens ``1..n`` (all 0 when unlabelled).
      num_labels: ``L``.
    """
    n = len(heads)
    gold = [-1, *heads]
    missing = [0] * (n + 1)  # children not attached yet
    for h in heads:
        missing[h] += 1
    config = Config(n)
    transitions: list[int] = []
    while not config.done:
        stack = config.stack
        s1 = stack[-1]
        s2 = stack[-2] if len(stack) >= 2 else -1
        legal = legal_mask(config, num_labels)
        if s2 > 0 and gold[s2] == s1:
            t = 1 + labels[s2 - 1]
        elif s2 >= 0 and gold[s1] == s2 and missing[s1] == 0 and legal[1 + num_labels]:
            t = 1 + num_labels + labels[s1 - 1]
        elif legal[SHIFT]:
            t = SHIFT
        else:
            return None
        if t != SHIFT:
            missing[s1 if t <= num_labels else s2] -= 1  # the head gained a child
        config.apply(t, num_labels)
        transitions.append(t)
    return transitions if config.head[1:] == list(heads) else None


def parse_reference(
    score: Callable[[np.ndarray], np.ndarray],
    words: Sequence[int],
    tags: Sequence[int],
    num_labels: int,
    labelled: bool,
) -> Config:
    """Greedy parse of one sentence, one transition at a time (the reference decoder).

    Args:
      score: feature ids ``[F]`` -> transition scores ``[T]``.
      words, tags: ids of tokens ``0..n``.
      num_labels, labelled: as for :func:`feature_ids`.

    Returns:
      The final configuration (``head``, ``label``).
    """
    config = Config(len(words) - 1)
    while not config.done:
        scores = np.asarray(score(feature_ids(config, words, tags, labelled)), np.float32)
        scores = np.where(legal_mask(config, num_labels), scores, -np.inf)
        config.apply(int(np.argmax(scores)), num_labels)
    return config
