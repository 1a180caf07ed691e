"""Readers and writers for tagged corpora: CoNLL-2000 columns, CoNLL-X and CoNLL-U.

Files may be gzip-compressed (detected by their magic bytes) and are decoded as UTF-8.

* CoNLL-2000: one token a line, ``word POS chunk`` separated by whitespace (``word POS`` is
  accepted too), a blank line between sentences. The tag is column 2.
* CoNLL-X: 10 tab-separated columns ``ID FORM LEMMA CPOSTAG POSTAG FEATS HEAD DEPREL PHEAD
  PDEPREL``; ``tag_column="xpos"`` reads POSTAG (column 5), ``"upos"`` reads CPOSTAG (column 4).
* CoNLL-U: 10 tab-separated columns ``ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC``;
  ``#`` comment lines, multiword-token ranges (``3-4``) and empty nodes (``5.1``) are skipped.
* Plain text (:data:`PLAIN`, input to tag only): one token a line, a blank line between
  sentences. :func:`read_untagged` reads it, and CoNLL-X/U files whose tag column is ``_``;
  :func:`write_tagged` writes plain text as ``word TAG`` lines.

Every :class:`Sentence` read keeps its original lines, so :func:`write_tagged` can write
predicted tags back into an otherwise unchanged copy of the file.
"""

import gzip
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from experiments.common import DataError, read_bytes

__all__ = [
    "FORMATS",
    "MISSING_TAG",
    "PLAIN",
    "TAG_COLUMNS",
    "DataError",
    "Sentence",
    "detect_format",
    "read_tagged",
    "read_untagged",
    "split_dev",
    "write_tagged",
]

FORMATS: tuple[str, ...] = ("conll2000", "conllx", "conllu")
TAG_COLUMNS: tuple[str, ...] = ("xpos", "upos")
#: Plain text, one token a line: readable by :func:`read_untagged` only (it carries no tags).
PLAIN = "plain"
#: The tag of a token that has none (CoNLL's empty field).
MISSING_TAG = "_"

_NUM_TAB_COLUMNS = 10
# CoNLL-X and CoNLL-U agree on the first five columns: ID FORM LEMMA (C)UPOS (X)POSTAG.
_TAB_TAG_INDEX = {"upos": 3, "xpos": 4}
_TAB_COLUMN_NAMES = {
    "conllx": {"upos": "CPOSTAG", "xpos": "POSTAG"},
    "conllu": {"upos": "UPOS", "xpos": "XPOS"},
}
_CONLL2000_TAG_INDEX = 1
_DETECT_TOKEN_LINES = 50

# CoNLL-U multiword-token ranges ("3-4") and empty nodes ("5.1") carry no tag of their own.
_SKIPPED_ID = re.compile(r"\d+-\d+|\d+\.\d+")

T = TypeVar("T")


@dataclass(frozen=True)
class Sentence:
    """A tagged sentence.

    Attributes:
        words: the tokens.
        tags: one tag per token.
        lines: the sentence's lines as read (comments included), empty when built by hand;
            ignored by ``==``.
    """

    words: tuple[str, ...]
    tags: tuple[str, ...]
    lines: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.words) != len(self.tags):
            raise ValueError(f"{len(self.words)} words but {len(self.tags)} tags")


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_choice(value: str, valid: Sequence[str], name: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The file's lines without line terminators (gzip-aware, UTF-8)."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte offset {exc.start}): {exc.reason}") from exc
    # split("\n"), not splitlines(): tokens may legally contain U+2028, U+0085 and the like.
    lines = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _is_blank(line: str) -> bool:
    return not line.strip()


def _is_token_line(line: str, fmt: str) -> bool:
    """Whether a non-blank line is a token of the sentence (vs comment, range, empty node)."""
    if fmt != "conllu":
        return True
    if line.startswith("#"):
        return False
    return _SKIPPED_ID.fullmatch(line.split("\t", 1)[0]) is None


def _split_columns(line: str, fmt: str) -> list[str]:
    return line.split("\t") if fmt in ("conllx", "conllu") else line.split()


def _join_columns(columns: Sequence[str], fmt: str) -> str:
    return "\t".join(columns) if fmt in ("conllx", "conllu") else " ".join(columns)


def _tag_index(fmt: str, tag_column: str) -> int:
    return _CONLL2000_TAG_INDEX if fmt == "conll2000" else _TAB_TAG_INDEX[tag_column]


# ---------------------------------------------------------------------------------------------
# Format detection


def _looks_conllu(columns: Sequence[str]) -> bool:
    """CoNLL-U only features: ranges/empty nodes, ``key=value`` FEATS or MISC, ``h:rel`` DEPS."""
    token_id, feats, deps, misc = columns[0], columns[5], columns[8], columns[9]
    is_skipped_id = _SKIPPED_ID.fullmatch(token_id) is not None
    return is_skipped_id or "=" in feats or "=" in misc or ":" in deps


def _detect(lines: Sequence[str], path: str | os.PathLike[str], allow_plain: bool = False) -> str:
    """Detect the format from the first token lines (see :func:`detect_format`); with
    ``allow_plain``, a first token line of one column means :data:`PLAIN`."""
    seen_comment = False
    first: tuple[int, str] | None = None
    tab_rows: list[list[str]] = []
    for line_no, line in enumerate(lines, start=1):
        if _is_blank(line):
            continue
        # In CoNLL-2000 "#" is also a word ("# # B-NP"), so "#" lines never decide the format.
        if line.startswith("#"):
            seen_comment = True
            continue
        if first is None:
            first = (line_no, line)
        columns = line.split("\t")
        if len(columns) != _NUM_TAB_COLUMNS:
            break  # the first token line decides: CoNLL-2000, or an error reported below
        tab_rows.append(columns)
        if len(tab_rows) >= _DETECT_TOKEN_LINES:
            break
    if first is None:
        raise DataError(f"{path}: empty file (no token lines)")
    line_no, line = first
    if len(line.split("\t")) == _NUM_TAB_COLUMNS:
        is_conllu = seen_comment or any(_looks_conllu(row) for row in tab_rows)
        return "conllu" if is_conllu else "conllx"
    if len(line.split()) in (2, 3):
        return "conll2000"
    if allow_plain and len(line.split()) == 1:
        return PLAIN
    raise DataError(
        f"{path}:{line_no}: cannot detect the format: expected 10 tab-separated columns "
        f"(CoNLL-X/CoNLL-U) or 2-3 whitespace-separated ones (CoNLL-2000), found {line!r}"
    )


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess a file's format from its first token lines.

    A first token line with 10 tab-separated columns means CoNLL-X or CoNLL-U: CoNLL-U when
    the file has ``#`` comment lines, multiword ranges or empty nodes, ``key=value`` FEATS or
    MISC, or ``head:rel`` DEPS within its first 50 tokens; otherwise CoNLL-X. The ambiguous case
    (no such marks) is harmless for tagging: both formats put the word in column 2 and the tags
    in columns 4 and 5. A line with 2 or 3 whitespace-separated columns means CoNLL-2000.

    Args:
        path: the file (gzip or not).

    Returns:
        ``"conll2000"``, ``"conllx"`` or ``"conllu"``.

    Raises:
        DataError: empty file or unrecognised first token line.
    """
    return _detect(_read_lines(path), path)


# ---------------------------------------------------------------------------------------------
# Reading


def _parse_token(
    columns: list[str],
    line_no: int,
    fmt: str,
    tag_column: str,
    expected_id: int,
    path: str,
    require_tag: bool = True,
) -> tuple[str, str]:
    """Word and tag of one token line, validated; without ``require_tag`` a missing tag
    (``_`` or empty in CoNLL-X/U, always in plain text) is :data:`MISSING_TAG`."""
    where = f"{path}:{line_no}"
    if fmt == PLAIN:
        if len(columns) != 1:
            raise DataError(
                f"{where}: expected one token a line (plain text), found {len(columns)} "
                "whitespace-separated columns"
            )
        return columns[0], MISSING_TAG
    if fmt == "conll2000":
        if len(columns) not in (2, 3):
            raise DataError(
                f"{where}: expected 2 or 3 whitespace-separated columns (word POS [chunk]), "
                f"found {len(columns)}"
            )
        return columns[0], columns[_CONLL2000_TAG_INDEX]
    if len(columns) != _NUM_TAB_COLUMNS:
        raise DataError(
            f"{where}: expected {_NUM_TAB_COLUMNS} tab-separated columns, found {len(columns)}"
        )
    token_id, word = columns[0], columns[1]
    if not token_id.isdigit() or int(token_id) != expected_id:
        raise DataError(f"{where}: token ID {token_id!r}, expected {expected_id}")
    if not word:
        raise DataError(f"{where}: empty word (FORM column)")
    tag = columns[_TAB_TAG_INDEX[tag_column]]
    if tag in ("", MISSING_TAG):
        if not require_tag:
            return word, MISSING_TAG
        name = _TAB_COLUMN_NAMES[fmt][tag_column]
        raise DataError(f"{where}: no {name} tag ({tag!r}) for tag_column={tag_column!r}")
    return word, tag


def _parse_block(
    block: Sequence[tuple[int, str]],
    fmt: str,
    tag_column: str,
    path: str,
    require_tags: bool = True,
) -> Sentence:
    """One sentence from its consecutive non-blank ``(line_no, line)`` pairs."""
    words: list[str] = []
    tags: list[str] = []
    for line_no, line in block:
        if not _is_token_line(line, fmt):
            continue
        columns = _split_columns(line, fmt)
        word, tag = _parse_token(
            columns, line_no, fmt, tag_column, len(words) + 1, path, require_tags
        )
        words.append(word)
        tags.append(tag)
    if not words:
        raise DataError(f"{path}:{block[0][0]}: comment lines with no tokens after them")
    return Sentence(tuple(words), tuple(tags), tuple(line for _, line in block))


def _blocks(lines: Sequence[str]) -> list[list[tuple[int, str]]]:
    """Runs of non-blank lines, each line with its 1-based number."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for line_no, line in enumerate(lines, start=1):
        if _is_blank(line):
            if current:
                blocks.append(current)
                current = []
        else:
            current.append((line_no, line))
    if current:
        blocks.append(current)
    return blocks


def read_tagged(
    path: str | os.PathLike[str], format: str = "auto", tag_column: str = "xpos"
) -> list[Sentence]:
    """Read a tagged corpus.

    Args:
        path: the file (gzip or not).
        format: ``"auto"`` (see :func:`detect_format`), ``"conll2000"``, ``"conllx"`` or
            ``"conllu"``.
        tag_column: for CoNLL-X/U, ``"xpos"`` (column 5) or ``"upos"`` (column 4); ignored for
            CoNLL-2000.

    Returns:
        The sentences in file order, each keeping its original lines.

    Raises:
        ValueError: unknown ``format`` or ``tag_column``.
        DataError: unreadable or empty file, or a malformed line (``path:line: problem``).
    """
    _check_choice(format, ("auto", *FORMATS), "format")
    _check_choice(tag_column, TAG_COLUMNS, "tag_column")
    lines = _read_lines(path)
    fmt = _detect(lines, path) if format == "auto" else format
    sentences = [_parse_block(block, fmt, tag_column, str(path)) for block in _blocks(lines)]
    if not sentences:
        raise DataError(f"{path}: empty file (no sentences)")
    return sentences


def read_untagged(
    path: str | os.PathLike[str], format: str = "auto", tag_column: str = "xpos"
) -> tuple[list[Sentence], str]:
    """Read sentences to tag, whose tags may be missing.

    Accepts every format of :func:`read_tagged`, where a CoNLL-X/U tag column may hold ``_``,
    and plain text (:data:`PLAIN`): one token a line, a blank line between sentences. A
    missing tag reads as :data:`MISSING_TAG`.

    Args:
        path: the file (gzip or not).
        format: ``"auto"`` (as :func:`detect_format`, plus plain text for a first token line
            of one column), one of :data:`FORMATS`, or :data:`PLAIN`.
        tag_column: for CoNLL-X/U, ``"xpos"`` or ``"upos"``.

    Returns:
        ``(sentences, format)``: the sentences in file order, each keeping its original lines,
        and the format they were read in (pass it to :func:`write_tagged`).

    Raises:
        ValueError: unknown ``format`` or ``tag_column``.
        DataError: unreadable or empty file, or a malformed line (``path:line: problem``).
    """
    _check_choice(format, ("auto", *FORMATS, PLAIN), "format")
    _check_choice(tag_column, TAG_COLUMNS, "tag_column")
    lines = _read_lines(path)
    fmt = _detect(lines, path, allow_plain=True) if format == "auto" else format
    sentences = [
        _parse_block(block, fmt, tag_column, str(path), require_tags=False)
        for block in _blocks(lines)
    ]
    if not sentences:
        raise DataError(f"{path}: empty file (no sentences)")
    return sentences, fmt


# ---------------------------------------------------------------------------------------------
# Writing


def _check_tags(tags: Sequence[str], n_words: int, index: int) -> None:
    if len(tags) != n_words:
        raise ValueError(f"sentence {index}: {n_words} words but {len(tags)} tags")
    for tag in tags:
        if not tag or any(char.isspace() for char in tag):
            raise ValueError(f"sentence {index}: tag {tag!r} is empty or contains whitespace")


def _retag_lines(
    sentence: Sentence, tags: Sequence[str], fmt: str, tag_column: str, index: int
) -> list[str]:
    """The sentence's original lines with the tag column replaced."""
    token_positions = [i for i, line in enumerate(sentence.lines) if _is_token_line(line, fmt)]
    if len(token_positions) != len(tags):
        raise ValueError(
            f"sentence {index}: its lines hold {len(token_positions)} tokens, got {len(tags)} tags"
        )
    out = list(sentence.lines)
    tag_index = _tag_index(fmt, tag_column)
    for position, tag in zip(token_positions, tags, strict=True):
        columns = _split_columns(out[position], fmt)
        columns[tag_index] = tag
        out[position] = _join_columns(columns, fmt)
    return out


def _sentence_lines(
    sentence: Sentence, tags: Sequence[str], fmt: str, tag_column: str, index: int
) -> list[str]:
    """Lines for one sentence: the original ones retagged, or new minimal ones."""
    if fmt == PLAIN:
        return [f"{word} {tag}" for word, tag in zip(sentence.words, tags, strict=True)]
    if sentence.lines:
        return _retag_lines(sentence, tags, fmt, tag_column, index)
    if fmt == "conll2000":
        return [f"{word} {tag}" for word, tag in zip(sentence.words, tags, strict=True)]
    lines = []
    for i, (word, tag) in enumerate(zip(sentence.words, tags, strict=True), start=1):
        columns = [str(i), word] + ["_"] * (_NUM_TAB_COLUMNS - 2)
        columns[_TAB_TAG_INDEX[tag_column]] = tag
        lines.append("\t".join(columns))
    return lines


def write_tagged(
    path: str | os.PathLike[str],
    sentences: Sequence[Sentence],
    tags: Sequence[Sequence[str]],
    format: str,
    tag_column: str = "xpos",
) -> None:
    """Write sentences with new tags, in the format they were read from.

    Sentences read by :func:`read_tagged` are written back line for line with only the tag
    column replaced (comments, ranges and other columns kept); hand-built ones get minimal
    lines (``word TAG``, or 10 columns with ``_`` for everything but ID, FORM and the tag).
    Plain text (:data:`PLAIN`) is written as ``word TAG`` lines, like CoNLL-2000 without the
    chunk column.
    A path ending in ``.gz`` is written gzip-compressed.

    Args:
        path: the output file.
        sentences: the sentences.
        tags: one tag sequence per sentence.
        format: ``"conll2000"``, ``"conllx"``, ``"conllu"`` or ``"plain"``.
        tag_column: for CoNLL-X/U, the column to write (``"xpos"`` or ``"upos"``).

    Raises:
        ValueError: unknown format/tag column, or tags that do not fit the sentences.
    """
    _check_choice(format, (*FORMATS, PLAIN), "format")
    _check_choice(tag_column, TAG_COLUMNS, "tag_column")
    if len(sentences) != len(tags):
        raise ValueError(f"{len(sentences)} sentences but {len(tags)} tag sequences")
    chunks = []
    for index, (sentence, sentence_tags) in enumerate(zip(sentences, tags, strict=True)):
        _check_tags(sentence_tags, len(sentence.words), index)
        lines = _sentence_lines(sentence, sentence_tags, format, tag_column, index)
        chunks.append("\n".join(lines) + "\n\n")
    data = "".join(chunks).encode("utf-8")
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


# ---------------------------------------------------------------------------------------------
# Splits


def split_dev(sentences: Sequence[T], fraction: float = 0.1) -> tuple[list[T], list[T]]:
    """Hold out the last ``fraction`` of the sentences (at least one) as dev.

    Used when a corpus has no dev file: the order of the file is kept, so the dev sentences
    come from the end of the training text.

    Args:
        sentences: the training sentences.
        fraction: share held out, in (0, 1).

    Returns:
        ``(train, dev)``.

    Raises:
        ValueError: ``fraction`` outside (0, 1) or fewer than two sentences.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(sentences) < 2:
        raise ValueError(f"need at least 2 sentences to split off a dev set, got {len(sentences)}")
    # round(), not int(): n * 0.1 can land just below an integer.
    n_dev = min(len(sentences) - 1, max(1, round(len(sentences) * fraction)))
    cut = len(sentences) - n_dev
    return list(sentences[:cut]), list(sentences[cut:])
