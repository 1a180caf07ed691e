"""Tests for experiments.conll on tiny files (and, marked `data`, the real corpora)."""

import gzip
import os
from pathlib import Path

import pytest

from experiments.corpora.conll import (
    MISSING_TAG,
    PLAIN,
    DataError,
    Sentence,
    detect_format,
    read_tagged,
    read_untagged,
    split_dev,
    write_tagged,
)

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")

CONLL2000 = """\
Confidence NN B-NP
in IN B-PP
the DT B-NP
# # B-NP

He PRP B-NP
left VBD B-VP
"""

CONLLX = """\
1\tPierre\t_\tNNP\tNNP\t_\t2\t_\t_\t_
2\tVinken\t_\tNNP\tNNP\t_\t0\t_\t_\t_

1\tIt\t_\tPRP\tPRP\t_\t2\t_\t_\t_
2\tfell\t_\tVB\tVBD\t_\t0\t_\t_\t_
3\t.\t_\t.\t.\t_\t2\t_\t_\t_
"""

CONLLU = """\
# sent_id = 1
# text = Don't go.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\tMood=Ind\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tgo\tgo\tVERB\tVB\tVerbForm=Inf\t0\troot\t_\tSpaceAfter=No
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = 2
1\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t_\t_
2\tsaw\tsee\tVERB\tVBD\t_\t0\troot\t_\t_
2.1\tsaw\tsee\tVERB\tVBD\t_\t_\t_\t0:root\t_
3\thim\the\tPRON\tPRP\t_\t2\tobj\t_\t_
"""


def write(path: Path, text: str, compress: bool = False) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# --- reading each format -------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_conll2000(tmp_path: Path, compress: bool) -> None:
    # The ".txt" name says nothing about compression: detection is by magic bytes.
    path = write(tmp_path / "train.txt", CONLL2000, compress)
    assert detect_format(path) == "conll2000"
    sentences = read_tagged(path)
    assert sentences == [
        Sentence(("Confidence", "in", "the", "#"), ("NN", "IN", "DT", "#")),
        Sentence(("He", "left"), ("PRP", "VBD")),
    ]


def test_conll2000_first_line_is_hash_token(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "# # B-NP\n1 CD I-NP\n")
    assert detect_format(path) == "conll2000"
    assert read_tagged(path)[0].words == ("#", "1")


@pytest.mark.parametrize("compress", [False, True])
def test_conllx_xpos_and_upos(tmp_path: Path, compress: bool) -> None:
    path = write(tmp_path / "train.conllx", CONLLX, compress)
    assert detect_format(path) == "conllx"
    xpos = read_tagged(path)
    assert [s.words for s in xpos] == [("Pierre", "Vinken"), ("It", "fell", ".")]
    assert xpos[1].tags == ("PRP", "VBD", ".")
    assert read_tagged(path, tag_column="upos")[1].tags == ("PRP", "VB", ".")


@pytest.mark.parametrize("compress", [False, True])
def test_conllu_skips_comments_ranges_empty_nodes(tmp_path: Path, compress: bool) -> None:
    path = write(tmp_path / "x.conllu", CONLLU, compress)
    assert detect_format(path) == "conllu"
    upos = read_tagged(path, tag_column="upos")
    assert upos == [
        Sentence(("Do", "n't", "go", "."), ("AUX", "PART", "VERB", "PUNCT")),
        Sentence(("I", "saw", "him"), ("PRON", "VERB", "PRON")),
    ]
    assert read_tagged(path, tag_column="xpos")[0].tags == ("VBP", "RB", "VB", ".")


@pytest.mark.parametrize(
    "token_line",
    [
        "1\tgo\tgo\tVERB\tVB\tVerbForm=Inf\t0\troot\t_\t_",  # FEATS key=value
        "1\tgo\tgo\tVERB\tVB\t_\t0\troot\t0:root\t_",  # DEPS head:rel
        "1\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No",  # MISC key=value
    ],
)
def test_detect_conllu_by_columns(tmp_path: Path, token_line: str) -> None:
    assert detect_format(write(tmp_path / "f", token_line + "\n")) == "conllu"


def test_detect_ambiguous_is_conllx(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "1\tgo\t_\tVERB\tVB\t_\t0\t_\t_\t_\n")
    assert detect_format(path) == "conllx"


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path / "f", CONLLX)
    assert read_tagged(path, format="conllu") == read_tagged(path, format="conllx")


def test_conllu_underscore_tag_is_error(tmp_path: Path) -> None:
    text = "# c\n1\tgo\tgo\tVERB\t_\t_\t0\troot\t_\t_\n"
    path = write(tmp_path / "u.conllu", text)
    read_tagged(path, tag_column="upos")
    with pytest.raises(DataError, match=r"u\.conllu:2: no XPOS tag"):
        read_tagged(path, tag_column="xpos")


def test_crlf_and_no_final_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "crlf.txt", "a DT B-NP\r\nb NN I-NP\r\n\r\nc VB B-VP")
    assert [s.tags for s in read_tagged(path)] == [("DT", "NN"), ("VB",)]


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fmt", "match"),
    [
        ("a DT B-NP\nb NN I-NP extra\n", "conll2000", r"bad\.txt:2: expected 2 or 3"),
        ("1\ta\t_\tX\tX\t_\t0\t_\t_\t_\n2\tb\tX\tX\t_\n", "conllx", r"bad\.txt:2: expected 10"),
        ("1\ta\t_\tX\tX\t_\t0\t_\t_\t_\nx\tb\t_\tX\tX\t_\t0\t_\t_\t_\n", "conllx", r":2: token ID"),
        ("1\ta\t_\tX\tX\t_\t0\t_\t_\t_\n3\tb\t_\tX\tX\t_\t0\t_\t_\t_\n", "conllx", r":2: token ID"),
        ("1-2\tab\t_\t_\t_\t_\t_\t_\t_\t_\n", "conllx", r"bad\.txt:1: token ID '1-2'"),
        ("1\t\t_\tX\tX\t_\t0\t_\t_\t_\n", "conllx", r"bad\.txt:1: empty word"),
        ("1--2\tab\t_\t_\t_\t_\t_\t_\t_\t_\n", "conllu", r"bad\.txt:1: token ID '1--2'"),
        ("# only a comment\n\n1\ta\t_\tX\tX\t_\t0\t_\t_\t_\n", "conllu", r"bad\.txt:1: comment"),
    ],
    ids=[
        "c2000-cols",
        "tab-cols",
        "non-int-id",
        "id-gap",
        "range-in-conllx",
        "bad-range",
        "empty-word",
        "lone",
    ],
)
def test_malformed_line(tmp_path: Path, text: str, fmt: str, match: str) -> None:
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError, match=match):
        read_tagged(path, format=fmt)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: empty"):
        read_tagged(path)
    with pytest.raises(DataError, match=r"empty\.txt: empty"):
        read_tagged(path, format="conll2000")


def test_undetectable(tmp_path: Path) -> None:
    path = write(tmp_path / "odd.txt", "\na b c d e\n")
    with pytest.raises(DataError, match=r"odd\.txt:2: cannot detect"):
        detect_format(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 NN B-NP\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8"):
        read_tagged(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.gz"
    path.write_bytes(gzip.compress(CONLL2000.encode())[:-12])
    with pytest.raises(DataError, match=r"c\.gz.*gzip"):
        read_tagged(path)


def test_unknown_format_and_tag_column(tmp_path: Path) -> None:
    path = write(tmp_path / "f", CONLL2000)
    with pytest.raises(ValueError, match=r"conll2000, conllx, conllu"):
        read_tagged(path, format="conll2003")
    with pytest.raises(ValueError, match=r"xpos, upos"):
        read_tagged(path, tag_column="pos")
    with pytest.raises(ValueError, match=r"conll2000, conllx, conllu"):
        write_tagged(tmp_path / "o", [], [], format="auto")


# --- writing -------------------------------------------------------------------------------


def lowercase_tags(sentences: list[Sentence]) -> list[tuple[str, ...]]:
    return [tuple(tag.lower() for tag in s.tags) for s in sentences]


@pytest.mark.parametrize(
    ("text", "fmt", "tag_column"),
    [
        (CONLL2000, "conll2000", "xpos"),
        (CONLLX, "conllx", "xpos"),
        (CONLLX, "conllx", "upos"),
        (CONLLU, "conllu", "upos"),
        (CONLLU, "conllu", "xpos"),
    ],
)
@pytest.mark.parametrize("out_name", ["out.txt", "out.txt.gz"])
def test_write_read_round_trip(
    tmp_path: Path, text: str, fmt: str, tag_column: str, out_name: str
) -> None:
    sentences = read_tagged(write(tmp_path / "in", text), tag_column=tag_column)
    predicted = lowercase_tags(sentences)
    out = tmp_path / out_name
    write_tagged(out, sentences, predicted, fmt, tag_column=tag_column)
    back = read_tagged(out, tag_column=tag_column)
    assert [s.words for s in back] == [s.words for s in sentences]
    assert [s.tags for s in back] == predicted
    # Everything but the tag column is kept, including comments and ranges.
    assert [len(s.lines) for s in back] == [len(s.lines) for s in sentences]
    # Writing the original tags back reproduces the input lines.
    write_tagged(out, back, [s.tags for s in sentences], fmt, tag_column=tag_column)
    restored = read_tagged(out, tag_column=tag_column)
    assert [s.lines for s in restored] == [s.lines for s in sentences]


def test_write_chunk_column_kept(tmp_path: Path) -> None:
    sentences = read_tagged(write(tmp_path / "in", CONLL2000))
    out = tmp_path / "out.txt"
    write_tagged(out, sentences, lowercase_tags(sentences), "conll2000")
    assert out.read_text().splitlines()[:2] == ["Confidence nn B-NP", "in in B-PP"]


@pytest.mark.parametrize("fmt", ["conll2000", "conllx", "conllu"])
def test_write_hand_built_sentences(tmp_path: Path, fmt: str) -> None:
    sentences = [Sentence(("a", "b"), ("X", "Y")), Sentence(("c",), ("Z",))]
    out = tmp_path / "out"
    write_tagged(out, sentences, [("P", "Q"), ("R",)], fmt)
    assert detect_format(out) == ("conll2000" if fmt == "conll2000" else "conllx")
    back = read_tagged(out, format=fmt)
    assert back == [Sentence(("a", "b"), ("P", "Q")), Sentence(("c",), ("R",))]


def test_write_rejects_bad_tags(tmp_path: Path) -> None:
    sentences = [Sentence(("a", "b"), ("X", "Y"))]
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        write_tagged(tmp_path / "o", sentences, [("P",)], "conll2000")
    with pytest.raises(ValueError, match="whitespace"):
        write_tagged(tmp_path / "o", sentences, [("P", "Q R")], "conll2000")
    with pytest.raises(ValueError, match="1 sentences but 2"):
        write_tagged(tmp_path / "o", sentences, [("P", "Q"), ()], "conll2000")


def test_sentence_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        Sentence(("a", "b"), ("X",))


# --- split_dev -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_dev"), [(2, 1), (5, 1), (10, 1), (29, 3), (100, 10), (8936, 894)])
def test_split_dev_sizes(n: int, n_dev: int) -> None:
    items = list(range(n))
    train, dev = split_dev(items)
    assert len(dev) == n_dev
    assert train + dev == items  # dev is the end of the training text


def test_split_dev_fraction_and_errors() -> None:
    assert split_dev(list(range(10)), fraction=0.29) == (list(range(7)), [7, 8, 9])
    assert split_dev([1, 2], fraction=0.9) == ([1], [2])
    with pytest.raises(ValueError, match="fraction"):
        split_dev([1, 2, 3], fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_dev([1])


# --- real data -----------------------------------------------------------------------------

REAL_CORPORA = [
    ("conll2000/train.txt.gz", "conll2000", 8936, 211727),
    ("conll2000/test.txt.gz", "conll2000", 2012, 47377),
    ("ptb-dep-sample/train.conllx.gz", "conllx", 3396, 81793),
    ("ptb-dep-sample/dev.conllx.gz", "conllx", 273, None),
    ("ptb-dep-sample/test.conllx.gz", "conllx", 245, None),
]


@pytest.mark.data
@pytest.mark.parametrize(("name", "fmt", "n_sentences", "n_tokens"), REAL_CORPORA)
def test_real_corpora(name: str, fmt: str, n_sentences: int, n_tokens: int | None) -> None:
    if not REAL_DATA_DIR:
        pytest.skip("MEPROP_DATA_DIR is not set")
    path = Path(REAL_DATA_DIR) / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    assert detect_format(path) == fmt
    sentences = read_tagged(path)
    assert len(sentences) == n_sentences
    if n_tokens is not None:
        assert sum(len(s.words) for s in sentences) == n_tokens


# --- untagged input ---------------------------------------------------------------------------


def test_read_untagged_plain_text_and_write_word_tag_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "plain.txt", "\nThe\ncat\n\n\nIt\nfell\n.\n")
    with pytest.raises(DataError, match="cannot detect"):
        detect_format(path)  # plain text is input to tag, never a training format
    sentences, fmt = read_untagged(path)
    assert fmt == PLAIN
    assert [s.words for s in sentences] == [("The", "cat"), ("It", "fell", ".")]
    assert {t for s in sentences for t in s.tags} == {MISSING_TAG}
    out = tmp_path / "tagged.txt"
    write_tagged(out, sentences, [["DT", "NN"], ["PRP", "VBD", "."]], fmt)
    assert out.read_text() == "The DT\ncat NN\n\nIt PRP\nfell VBD\n. .\n\n"
    assert [s.tags for s in read_tagged(out)] == [("DT", "NN"), ("PRP", "VBD", ".")]


def test_read_untagged_plain_text_rejects_two_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "plain.txt", "The\nbig cat\n")
    with pytest.raises(DataError, match=r"plain\.txt:2: expected one token a line"):
        read_untagged(path)


@pytest.mark.parametrize(("text", "fmt"), [(CONLLX, "conllx"), (CONLLU, "conllu")])
def test_read_untagged_tab_formats_with_missing_tags(tmp_path: Path, text: str, fmt: str) -> None:
    blank = "\n".join(
        "\t".join([*c[:3], "_", "_", *c[5:]]) if len(c := line.split("\t")) == 10 else line
        for line in text.split("\n")
    )
    path = write(tmp_path / f"untagged.{fmt}", blank)
    with pytest.raises(DataError, match="no"):
        read_tagged(path, format=fmt)
    sentences, got_fmt = read_untagged(path)
    assert got_fmt == fmt
    tagged = read_tagged(write(tmp_path / f"tagged.{fmt}", text))
    assert [s.words for s in sentences] == [s.words for s in tagged]
    assert {t for s in sentences for t in s.tags} == {MISSING_TAG}
    # Writing the tags back gives the tagged file's tags, every line (comments, ranges) kept.
    out = tmp_path / f"out.{fmt}"
    write_tagged(out, sentences, [s.tags for s in tagged], fmt)
    written = [line for line in out.read_text().split("\n") if line]
    original = [line for line in blank.split("\n") if line]
    assert len(written) == len(original)
    assert [w for w in written if w.startswith("#")] == [o for o in original if o.startswith("#")]
    assert read_tagged(out, format=fmt) == tagged
