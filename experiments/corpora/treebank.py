"""Dependency trees from CoNLL-X and CoNLL-U files, and writing predicted trees back.

Both formats have 10 tab-separated columns; the ones read here are ID (1), FORM (2),
CPOSTAG/UPOS (4), POSTAG/XPOS (5), HEAD (7) and DEPREL (8). CoNLL-U comment lines (``#``),
multiword-token ranges (``1-2``) and empty nodes (``3.1``) are no part of the tree: they are
skipped when reading and written back unchanged. Files may be gzip-compressed.

Punctuation (left out of attachment scores): a token whose CPOSTAG/UPOS is ``PUNCT`` or whose
CPOSTAG/UPOS or POSTAG/XPOS is one of the Penn Treebank punctuation tags :data:`PENN_PUNCT`
(`````, ``''``, ``,``, ``.``, ``:``), the usual rule for English dependency parsing.

A malformed line (wrong column count, token IDs out of order, a HEAD that is no number or out
of range, a sentence without a root token or with a HEAD cycle) raises
:class:`~experiments.common.DataError` naming ``file:line``.
"""

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.common import DataError
from experiments.corpora.conll import _SKIPPED_ID, _blocks, _detect, _read_lines

__all__ = [
    "PENN_PUNCT",
    "TAG_COLUMNS",
    "Tree",
    "is_projective",
    "read_treebank",
    "write_treebank",
]

#: Penn Treebank tags of punctuation tokens.
PENN_PUNCT = frozenset({"``", "''", ",", ".", ":"})
#: ``--tag-column`` values: ``auto`` reads UPOS from CoNLL-U and POSTAG from CoNLL-X.
TAG_COLUMNS: tuple[str, ...] = ("auto", "upos", "xpos")

_NUM_COLUMNS = 10
_UPOS, _XPOS, _HEAD, _DEPREL = 3, 4, 6, 7


@dataclass(frozen=True)
class Tree:
    """One sentence and its dependency tree.

    Attributes:
        words: the tokens (FORM).
        tags: one POS tag per token (the column chosen by ``tag_column``).
        heads: HEAD of every token, 0 for the root; None when the file has none (``_``).
        labels: DEPREL of every token; None when the sentence has none (all ``_``).
        punct: whether each token is punctuation (see the module docstring).
        lines: the sentence's lines as read (comments, ranges, empty nodes included), empty when
            built by hand; ignored by ``==``.
        line_numbers: 1-based line number of each token in the file (empty when built by hand).
    """

    words: tuple[str, ...]
    tags: tuple[str, ...]
    heads: tuple[int, ...] | None
    labels: tuple[str, ...] | None = None
    punct: tuple[bool, ...] = ()
    lines: tuple[str, ...] = field(default=(), compare=False, repr=False)
    line_numbers: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.words)
        if not self.punct:
            object.__setattr__(self, "punct", (False,) * n)
        for name in ("tags", "heads", "labels", "punct"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{n} words but {len(value)} {name}")

    def __len__(self) -> int:
        return len(self.words)


def is_projective(heads: Sequence[int]) -> bool:
    """Whether no two arcs of the tree cross (``heads[i - 1]`` is token ``i``'s head, 0 the
    root; the root arc counts, so a word outside the root's span also breaks it)."""
    arcs = [(min(h, d), max(h, d)) for d, h in enumerate(heads, start=1)]
    for left, right in arcs:
        for other_left, other_right in arcs:
            if left < other_left < right < other_right:
                return False
    return True


def _is_token(line: str) -> bool:
    return not line.startswith("#") and _SKIPPED_ID.fullmatch(line.split("\t", 1)[0]) is None


def _is_punct(columns: Sequence[str]) -> bool:
    upos, xpos = columns[_UPOS], columns[_XPOS]
    return upos == "PUNCT" or upos in PENN_PUNCT or xpos in PENN_PUNCT


def _check_tree(heads: Sequence[int], numbers: Sequence[int], where: str) -> None:
    """Raises DataError unless ``heads`` has a root and every token reaches it."""
    if 0 not in heads:
        raise DataError(f"{where}:{numbers[0]}: sentence has no root (no token with HEAD 0)")
    for start in range(1, len(heads) + 1):
        seen, token = set(), start
        while token != 0:
            if token in seen:
                raise DataError(
                    f"{where}:{numbers[start - 1]}: token {start} is on a HEAD cycle (not a tree)"
                )
            seen.add(token)
            token = heads[token - 1]


def _parse_tree(
    block: Sequence[tuple[int, str]], tag_index: int, path: str, heads_required: bool
) -> Tree:
    """One tree from its consecutive non-blank ``(line_no, line)`` pairs."""
    words, tags, heads, labels, punct, numbers = [], [], [], [], [], []
    for line_no, line in block:
        if not _is_token(line):
            continue
        where = f"{path}:{line_no}"
        columns = line.split("\t")
        if len(columns) != _NUM_COLUMNS:
            raise DataError(
                f"{where}: expected {_NUM_COLUMNS} tab-separated columns, found {len(columns)}"
            )
        expected = len(words) + 1
        if not columns[0].isdigit() or int(columns[0]) != expected:
            raise DataError(f"{where}: token ID {columns[0]!r}, expected {expected}")
        if not columns[1]:
            raise DataError(f"{where}: empty word (FORM column)")
        head = columns[_HEAD]
        if head == "_" and not heads_required:
            heads.append(None)
        elif not head.isdigit():
            raise DataError(f"{where}: HEAD {head!r} is not a token number")
        else:
            heads.append(int(head))
        words.append(columns[1])
        tags.append(columns[tag_index] or "_")
        labels.append(columns[_DEPREL])
        punct.append(_is_punct(columns))
        numbers.append(line_no)
    if not words:
        raise DataError(f"{path}:{block[0][0]}: comment lines with no tokens after them")
    given = [h is not None for h in heads]
    if any(given) and not all(given):
        line_no = numbers[given.index(not given[0])]
        raise DataError(f"{path}:{line_no}: HEAD '_' mixed with numeric HEADs in one sentence")
    final_heads = None
    if all(given):
        n = len(words)
        for h, line_no in zip(heads, numbers, strict=True):
            if h > n:
                raise DataError(f"{path}:{line_no}: HEAD {h} out of range 0..{n}")
        final_heads = tuple(heads)
        _check_tree(final_heads, numbers, path)
    has_label = [label not in ("", "_") for label in labels]
    if any(has_label) and not all(has_label):
        line_no = numbers[has_label.index(not has_label[0])]
        raise DataError(f"{path}:{line_no}: DEPREL '_' mixed with labels in one sentence")
    return Tree(
        words=tuple(words),
        tags=tuple(tags),
        heads=final_heads,
        labels=tuple(labels) if all(has_label) else None,
        punct=tuple(punct),
        lines=tuple(line for _, line in block),
        line_numbers=tuple(numbers),
    )


def read_treebank(
    path: str | os.PathLike[str],
    format: str = "auto",
    tag_column: str = "auto",
    heads_required: bool = True,
) -> list[Tree]:
    """Read the dependency trees of a CoNLL-X or CoNLL-U file.

    Args:
        path: the file (gzip or not).
        format: ``"auto"`` (detected as in :func:`experiments.corpora.conll.detect_format`),
            ``"conllx"`` or ``"conllu"``.
        tag_column: ``"upos"`` (column 4), ``"xpos"`` (column 5) or ``"auto"`` (UPOS for
            CoNLL-U, POSTAG for CoNLL-X).
        heads_required: False accepts sentences whose HEADs are all ``_`` (files to parse);
            their ``heads`` are None.

    Returns:
        The trees in file order, each keeping its original lines.

    Raises:
        ValueError: unknown ``format`` or ``tag_column``.
        DataError: unreadable or empty file, or a malformed line (``path:line: problem``).
    """
    if format not in ("auto", "conllx", "conllu"):
        raise ValueError(f"unknown format {format!r}; valid: auto, conllx, conllu")
    if tag_column not in TAG_COLUMNS:
        raise ValueError(f"unknown tag_column {tag_column!r}; valid: {', '.join(TAG_COLUMNS)}")
    lines = _read_lines(path)
    fmt = _detect(lines, path) if format == "auto" else format
    if fmt not in ("conllx", "conllu"):
        raise DataError(f"{path}: dependency trees need CoNLL-X or CoNLL-U (10 columns)")
    if tag_column == "auto":
        tag_column = "upos" if fmt == "conllu" else "xpos"
    tag_index = _UPOS if tag_column == "upos" else _XPOS
    trees = [_parse_tree(b, tag_index, str(path), heads_required) for b in _blocks(lines)]
    if not trees:
        raise DataError(f"{path}: empty file (no sentences)")
    return trees


def _tree_lines(
    tree: Tree, heads: Sequence[int], labels: Sequence[str] | None, index: int
) -> list[str]:
    """The tree's lines with HEAD (and DEPREL) replaced, or minimal new ones."""
    if not tree.lines:
        rows = []
        for i, word in enumerate(tree.words, start=1):
            label = labels[i - 1] if labels is not None else "_"
            rows.append(
                f"{i}\t{word}\t_\t{tree.tags[i - 1]}\t{tree.tags[i - 1]}\t_\t"
                f"{heads[i - 1]}\t{label}\t_\t_"
            )
        return rows
    out = list(tree.lines)
    positions = [i for i, line in enumerate(out) if _is_token(line)]
    if len(positions) != len(heads):
        raise ValueError(f"sentence {index}: {len(positions)} tokens but {len(heads)} heads")
    for j, position in enumerate(positions):
        columns = out[position].split("\t")
        columns[_HEAD] = str(heads[j])
        if labels is not None:
            columns[_DEPREL] = labels[j]
        out[position] = "\t".join(columns)
    return out


def write_treebank(
    path: str | os.PathLike[str],
    trees: Sequence[Tree],
    heads: Sequence[Sequence[int]],
    labels: Sequence[Sequence[str]] | None = None,
) -> None:
    """Write trees with new HEADs (and DEPRELs), every other column and line unchanged.

    Trees read by :func:`read_treebank` are written line for line (comments, multiword
    tokens and empty nodes kept); hand-built ones get minimal 10-column lines. A path ending
    in ``.gz`` is written gzip-compressed.

    Args:
        path: the output file.
        trees: the sentences.
        heads: one HEAD sequence per tree (0 = root).
        labels: one DEPREL sequence per tree, or None to keep the DEPREL column.

    Raises:
        ValueError: heads or labels that do not fit the trees.
    """
    if len(heads) != len(trees) or (labels is not None and len(labels) != len(trees)):
        raise ValueError(f"{len(trees)} trees but {len(heads)} head sequences (or labels)")
    chunks = []
    for index, tree in enumerate(trees):
        tree_labels = None if labels is None else labels[index]
        if len(heads[index]) != len(tree) or (
            tree_labels is not None and len(tree_labels) != len(tree)
        ):
            raise ValueError(f"sentence {index}: {len(tree)} words, heads/labels do not fit")
        chunks.append("\n".join(_tree_lines(tree, heads[index], tree_labels, index)) + "\n\n")
    data = "".join(chunks).encode("utf-8")
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
