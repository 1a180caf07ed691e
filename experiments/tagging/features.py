"""Word features and the vocabularies of the tagger (see :mod:`experiments.tagging`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.corpora.conll import Sentence

__all__ = [
    "DEFAULT_FEATURES",
    "END",
    "FEATURES",
    "PAD",
    "PAD_ID",
    "UNK",
    "UNK_ID",
    "VOCAB_FILE",
    "Encoded",
    "Vocab",
    "Vocabularies",
    "caps_pattern",
    "digit_class",
    "extract_features",
    "normalize_word",
]

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
END = "</s>"
VOCAB_FILE = "vocab.json"
VOCAB_FORMAT_VERSION = 1
_NUMBER_CHARS = frozenset("0123456789,.-/:")


def normalize_word(word: str) -> str:
    """Lowercase with every decimal digit replaced by ``0`` (``"1,234"`` -> ``"0,000"``)."""
    return "".join("0" if ch.isdigit() else ch for ch in word.lower())


def caps_pattern(word: str) -> str:
    """``lower``, ``init``, ``upper``, ``mixed`` or ``none`` (see the module docstring)."""
    letters = [ch for ch in word if ch.isalpha()]
    if not any(ch.isupper() or ch.islower() for ch in letters):
        return "none"  # no letters at all, or only uncased ones
    uppers = [ch.isupper() for ch in letters]
    if not any(uppers):
        return "lower"
    if all(uppers) and len(letters) >= 2:
        return "upper"
    if uppers[0] and not any(uppers[1:]):
        return "init"
    return "mixed"


def digit_class(word: str) -> str:
    """``none`` (no digit), ``number`` (digits and ``, . - / :`` only) or ``some``."""
    if not any(ch.isdigit() for ch in word):
        return "none"
    return "number" if all(ch.isdigit() or ch in _NUMBER_CHARS for ch in word) else "some"


def _length_bucket(word: str) -> str:
    n = len(word)
    return str(n) if n <= 7 else ("8-9" if n <= 9 else "10+")


def _next_word(words: Sequence[str], i: int) -> str:
    return normalize_word(words[i + 1]) if i + 1 < len(words) else END


#: Feature extractors: name -> f(words, i) giving the feature value of token i.
FEATURES: Mapping[str, Callable[[Sequence[str], int], str]] = {
    "caps": lambda words, i: caps_pattern(words[i]),
    "digit": lambda words, i: digit_class(words[i]),
    "hyphen": lambda words, i: "yes" if "-" in words[i] else "no",
    "prefix2": lambda words, i: normalize_word(words[i])[:2],
    "suffix2": lambda words, i: normalize_word(words[i])[-2:],
    "suffix3": lambda words, i: normalize_word(words[i])[-3:],
    "length": lambda words, i: _length_bucket(words[i]),
    "next": _next_word,
}
DEFAULT_FEATURES: tuple[str, ...] = (
    "caps",
    "digit",
    "hyphen",
    "prefix2",
    "suffix2",
    "suffix3",
    "next",
)


def extract_features(words: Sequence[str], names: Sequence[str]) -> list[tuple[str, ...]]:
    """The feature values of every token: one tuple (in the order of ``names``) per word."""
    extractors = [FEATURES[name] for name in names]
    return [tuple(f(words, i) for f in extractors) for i in range(len(words))]


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Strings <-> ids. Id 0 is padding and id 1 ``<unk>`` unless ``specials`` is False.

    Attributes:
      items: the strings, in id order.
      specials: whether ``items`` starts with ``<pad>`` and ``<unk>``.
    """

    items: tuple[str, ...]
    specials: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.items)})

    @classmethod
    def build(cls, counts: Counter[str], min_count: int) -> Vocab:
        """``<pad>``, ``<unk>``, then the strings seen ``min_count`` times or more (most
        frequent first, ties alphabetically)."""
        kept = sorted(
            (s for s, c in counts.items() if c >= min_count), key=lambda s: (-counts[s], s)
        )
        return cls((PAD, UNK, *kept))

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: str) -> bool:
        return item in self._index  # type: ignore[attr-defined]

    def id(self, item: str) -> int:
        """The id of ``item``: ``<unk>``'s when unknown, or -1 without specials."""
        return self._index.get(item, UNK_ID if self.specials else -1)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class Vocabularies:
    """Everything needed to turn sentences into ids and ids into tags."""

    words: Vocab
    features: tuple[Vocab, ...]
    feature_names: tuple[str, ...]
    tags: Vocab
    min_count: int

    @classmethod
    def build(
        cls, sentences: Sequence[Sentence], feature_names: Sequence[str], min_count: int
    ) -> Vocabularies:
        """Vocabularies of the training ``sentences``."""
        words: Counter[str] = Counter()
        features: list[Counter[str]] = [Counter() for _ in feature_names]
        tags: Counter[str] = Counter()
        for sentence in sentences:
            words.update(normalize_word(w) for w in sentence.words)
            tags.update(sentence.tags)
            for values in extract_features(sentence.words, feature_names):
                for counter, value in zip(features, values, strict=True):
                    counter[value] += 1
        return cls(
            words=Vocab.build(words, min_count),
            features=tuple(Vocab.build(c, min_count) for c in features),
            feature_names=tuple(feature_names),
            tags=Vocab(tuple(sorted(tags)), specials=False),
            min_count=min_count,
        )

    def encode(self, sentence: Sentence) -> Encoded:
        """Ids of one sentence; a tag unknown to the vocabulary gets id -1."""
        n = len(sentence.words)
        feats = np.zeros((n, len(self.feature_names)), np.int32)
        for i, values in enumerate(extract_features(sentence.words, self.feature_names)):
            feats[i] = [v.id(x) for v, x in zip(self.features, values, strict=True)]
        return Encoded(
            words=np.array([self.words.id(normalize_word(w)) for w in sentence.words], np.int32),
            features=feats,
            tags=np.array([self.tags.id(t) for t in sentence.tags], np.int32),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable copy (see :meth:`from_json`)."""
        return {
            "format_version": VOCAB_FORMAT_VERSION,
            "min_count": self.min_count,
            "words": list(self.words.items),
            "features": {
                name: list(v.items)
                for name, v in zip(self.feature_names, self.features, strict=True)
            },
            "tags": list(self.tags.items),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vocabularies:
        """The inverse of :meth:`to_json`."""
        if data.get("format_version") != VOCAB_FORMAT_VERSION:
            raise ValueError(f"unsupported vocabulary format {data.get('format_version')!r}")
        names = tuple(data["features"])
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            raise ValueError(f"unknown features {unknown} in the vocabulary file")
        return cls(
            words=Vocab(tuple(data["words"])),
            features=tuple(Vocab(tuple(data["features"][n])) for n in names),
            feature_names=names,
            tags=Vocab(tuple(data["tags"]), specials=False),
            min_count=int(data["min_count"]),
        )


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One sentence as ids: ``words [n]``, ``features [n, F]``, ``tags [n]`` (int32)."""

    words: np.ndarray
    features: np.ndarray
    tags: np.ndarray
