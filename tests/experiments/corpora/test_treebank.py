"""Tests for experiments.corpora.treebank: reading, validating and writing dependency trees."""

import gzip
import os
from pathlib import Path

import pytest

from experiments.common import DataError
from experiments.corpora.treebank import Tree, is_projective, read_treebank, write_treebank

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")

CONLLU = """\
# sent_id = 1
# text = Don't stop.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tstop\tstop\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t3:conj\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = 2
1\tHello\thello\tINTJ\tUH\t_\t0\troot\t_\t_
"""

CONLLX = """\
1\tThe\t_\tDT\tDT\t_\t2\t_\t_\t_
2\tcat\t_\tNN\tNN\t_\t3\t_\t_\t_
3\tsat\t_\tVBD\tVBD\t_\t0\t_\t_\t_
4\t,\t_\t,\t,\t_\t3\t_\t_\t_
5\t''\t_\t''\t''\t_\t3\t_\t_\t_
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reads_conllu_skipping_ranges_and_empty_nodes(tmp_path):
    trees = read_treebank(write(tmp_path / "a.conllu", CONLLU))
    assert len(trees) == 2
    first = trees[0]
    assert first.words == ("Do", "n't", "stop", ".")
    assert first.tags == ("AUX", "PART", "VERB", "PUNCT")  # auto: UPOS for CoNLL-U
    assert first.heads == (3, 3, 0, 3)
    assert first.labels == ("aux", "advmod", "root", "punct")
    assert first.punct == (False, False, False, True)
    assert first.lines[0] == "# sent_id = 1" and len(first.lines) == 8
    assert first.line_numbers == (4, 5, 6, 8)
    xpos = read_treebank(tmp_path / "a.conllu", tag_column="xpos")
    assert xpos[0].tags == ("VBP", "RB", "VB", ".")


def test_reads_unlabelled_conllx_with_penn_punctuation(tmp_path):
    path = tmp_path / "a.conllx.gz"
    path.write_bytes(gzip.compress(CONLLX.encode()))
    (tree,) = read_treebank(path)
    assert tree.labels is None and tree.heads == (2, 3, 0, 3, 3)
    assert tree.tags == ("DT", "NN", "VBD", ",", "''")
    assert tree.punct == (False, False, False, True, True)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("2\tcat\t_\tNN\tNN\t_\tx\t_\t_\t_", "HEAD 'x' is not a token number"),
        ("2\tcat\t_\tNN\tNN\t_\t9\t_\t_\t_", "HEAD 9 out of range 0..5"),
        ("2\tcat\t_\tNN\tNN\t_\t3\t_\t_", "expected 10 tab-separated columns, found 9"),
        ("7\tcat\t_\tNN\tNN\t_\t3\t_\t_\t_", "token ID '7', expected 2"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, needle):
    lines = CONLLX.splitlines()
    lines[1] = line
    path = write(tmp_path / "bad.conllx", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        read_treebank(path, format="conllx")
    assert f"{path}:2: " in str(exc.value) and needle in str(exc.value)


def test_sentences_that_are_not_trees(tmp_path):
    no_root = CONLLX.replace("\t0\t", "\t2\t")  # sat -> cat -> sat: no root, a cycle
    path = write(tmp_path / "a.conllx", no_root)
    with pytest.raises(DataError, match=rf"{path}:1: sentence has no root"):
        read_treebank(path)
    cycle = (
        "1\ta\t_\tX\tX\t_\t2\t_\t_\t_\n2\tb\t_\tX\tX\t_\t1\t_\t_\t_\n3\tc\t_\tX\tX\t_\t0\t_\t_\t_\n"
    )
    path = write(tmp_path / "b.conllx", cycle)
    with pytest.raises(DataError, match=rf"{path}:1: token 1 is on a HEAD cycle"):
        read_treebank(path)


def test_heads_may_be_missing_only_when_allowed(tmp_path):
    text = CONLLX.replace("\t2\t_\t_\t_", "\t_\t_\t_\t_").replace("\t3\t_\t_\t_", "\t_\t_\t_\t_")
    text = text.replace("\t0\t_\t_\t_", "\t_\t_\t_\t_")
    path = write(tmp_path / "a.conllx", text)
    with pytest.raises(DataError, match=rf"{path}:1: HEAD '_'"):
        read_treebank(path)
    (tree,) = read_treebank(path, heads_required=False)
    assert tree.heads is None and len(tree) == 5


def test_write_replaces_only_head_and_deprel(tmp_path):
    src = write(tmp_path / "a.conllu", CONLLU)
    trees = read_treebank(src)
    out = tmp_path / "out.conllu"
    write_treebank(out, trees, [[3, 1, 0, 1], [0]], [["a", "b", "root", "c"], ["root"]])
    before, after = src.read_text().splitlines(), out.read_text().splitlines()
    assert after[len(before) :] == [""]  # every sentence ends with a blank line
    for old, new in zip(before, after[: len(before)], strict=True):
        old_cols, new_cols = old.split("\t"), new.split("\t")
        if old.startswith("#") or "-" in old_cols[0] or "." in old_cols[0] or not old:
            assert new == old
        else:
            assert old_cols[:6] + old_cols[8:] == new_cols[:6] + new_cols[8:]
    assert [t.heads for t in read_treebank(out)] == [(3, 1, 0, 1), (0,)]
    assert read_treebank(out)[0].labels == ("a", "b", "root", "c")


def test_write_hand_built_trees(tmp_path):
    tree = Tree(("a", "b"), ("X", "Y"), None)
    write_treebank(tmp_path / "o.conllx", [tree], [[2, 0]])
    (back,) = read_treebank(tmp_path / "o.conllx", format="conllx")
    assert back.words == ("a", "b") and back.heads == (2, 0) and back.tags == ("X", "Y")


@pytest.mark.parametrize(
    ("heads", "projective"),
    [
        ((2, 3, 0, 3), True),
        ((3, 4, 0, 3), False),  # 1 <- 3 crosses 2 <- 4
        ((0, 1, 1), True),
        ((3, 0, 2), False),  # 1 <- 3 spans the root 2
        ((0, 4, 1, 1), False),  # 2 <- 4 and 3 <- 1 cross
        ((2, 0, 4, 2, 2), True),
        ((3, 0, 2, 2), False),  # 1 <- 3 crosses the root arc 0 -> 2
    ],
)
def test_is_projective(heads, projective):
    assert is_projective(heads) is projective


@pytest.mark.data
@pytest.mark.skipif(REAL_DATA_DIR is None, reason="MEPROP_DATA_DIR is not set")
def test_real_treebanks():
    root = Path(REAL_DATA_DIR)
    ptb = read_treebank(root / "ptb-dep-sample" / "dev.conllx.gz")
    assert len(ptb) == 273 and sum(map(len, ptb)) == 6327
    assert all(t.labels is None and t.heads.count(0) == 1 for t in ptb)
    ud = read_treebank(root / "ud-english-lines" / "en_lines-ud-dev.conllu.gz")
    assert len(ud) == 1118 and sum(map(len, ud)) == 21637
    assert all(t.labels is not None for t in ud)
    assert {t.tags[i] for t in ud for i in range(len(t)) if t.punct[i]} == {"PUNCT"}
