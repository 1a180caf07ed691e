"""Tests for experiments.tagging.cli: training runs, --resume, --predict and bad flags."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from experiments.corpora.conll import Sentence, read_tagged
from experiments.tagging.cli import build_parser
from experiments.tagging.features import DEFAULT_FEATURES
from tests.experiments.tagging.toy import (
    COMMON,
    run_main,
    toy_sentences,
    write_conll2000,
    write_conllx,
)

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")


@pytest.fixture(scope="module")
def corpus2000(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("conll2000")
    return {
        "train": write_conll2000(d / "train.txt", toy_sentences(60, 0)),
        "test": write_conll2000(d / "test.txt", toy_sentences(12, 1)),
    }


@pytest.fixture(scope="module")
def corpusx(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("conllx")
    test = toy_sentences(10, 3)
    # A tag never seen in training: must count as an error, not crash.
    test[0] = Sentence(test[0].words, ("UH", *test[0].tags[1:]))
    return {
        "train": write_conllx(d / "train.conllx", toy_sentences(48, 0)),
        "dev": write_conllx(d / "dev.conllx", toy_sentences(8, 2)),
        "test": write_conllx(d / "test.conllx", test),
    }


# Command line: training, results, prediction


def check_results(out: Path, k: int, mode: str) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert len(results["epochs"]) == 2
    best, history = results["best"], results["epochs"]
    # The paper's selection: the first epoch with the highest dev accuracy, its test accuracy.
    top = max(history, key=lambda r: (r["dev_acc"], -r["epoch"]))
    assert best == {"epoch": top["epoch"], "dev_acc": top["dev_acc"], "test_acc": top["test_acc"]}
    cfg = results["config"]
    assert cfg["task"] == "tagging" and cfg["k"] == k and cfg["mode"] == mode
    assert cfg["hidden"] == 16 and cfg["features"] == list(DEFAULT_FEATURES)
    assert (out / "vocab.json").is_file() and (out / "accuracy.png").is_file()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 2])
def test_train_conll2000_and_predict(corpus2000, tmp_path, capsys, k):
    out = tmp_path / "run"
    args = ["--train-file", corpus2000["train"], "--test-file", corpus2000["test"]]
    args += [*COMMON, "--k", k, "--devices", 1, "--out", out]
    if k == 0:  # one epoch, then the second one through --resume
        assert run_main([*args, "--epochs", 1]) == 0
        assert run_main([*args, "--resume"]) == 0
    else:
        assert run_main(args) == 0
    capsys.readouterr()
    results = check_results(out, k, "unified")
    assert results["config"]["dev_file"] is None  # 10% of train held out
    assert results["config"]["dev_sentences"] == 6 and results["config"]["train_sentences"] == 54
    assert results["epochs"][1]["loss"] < results["epochs"][0]["loss"]

    predicted = tmp_path / "predicted.txt"
    args = ["--predict", corpus2000["test"], "--out", out, "--predict-output", predicted]
    assert run_main(args) == 0
    # --predict uses the best epoch: it agrees with the gold tags as often as the loop said.
    agreement = re.search(r"agreement with the tags in .*: ([0-9.]+)%", capsys.readouterr().out)
    assert agreement is not None
    assert float(agreement.group(1)) == pytest.approx(results["best"]["test_acc"], abs=0.006)
    gold = read_tagged(corpus2000["test"])
    tagged = read_tagged(predicted, format="conll2000")
    assert [s.words for s in tagged] == [s.words for s in gold]
    tags = set(json.loads((out / "vocab.json").read_text())["tags"])
    assert {t for s in tagged for t in s.tags} <= tags
    # The other columns are kept.
    assert predicted.read_text().splitlines()[0].split()[2] == "O"


@pytest.mark.slow
def test_train_conllx_per_example_bidirectional(corpusx, tmp_path, capsys):
    """Per-example top-k, both directions, dropout, two devices, a dev file, and a test tag
    never seen in training."""
    out = tmp_path / "run"
    args = [
        "--train-file", corpusx["train"], "--dev-file", corpusx["dev"],
        "--test-file", corpusx["test"], *COMMON, "--k", 2, "--mode", "per-example",
        "--bidirectional", "--dropout", 0.2, "--devices", 2, "--out", out,
    ]  # fmt: skip
    assert run_main(args) == 0
    results = check_results(out, 2, "per-example")
    assert results["config"]["bidirectional"] and results["config"]["dev_sentences"] == 8
    assert results["num_devices"] == 2
    test_tokens = sum(len(s.words) for s in read_tagged(corpusx["test"]))
    # The UH token can never be right.
    assert results["best"]["test_acc"] <= 100.0 * (test_tokens - 1) / test_tokens + 1e-9
    predicted = tmp_path / "predicted.conllx"
    args = ["--predict", corpusx["test"], "--out", out, "--predict-output", predicted]
    assert run_main(args) == 0
    tagged = read_tagged(predicted, format="conllx")
    assert sum(len(s.words) for s in tagged) == test_tokens
    assert "UH" not in {t for s in tagged for t in s.tags}
    printed = capsys.readouterr().out
    assert (
        f"tagged 10 sentences ({test_tokens} tokens) with epoch {results['best']['epoch']}"
        in printed
    )


# ---------------------------------------------------------------------------------------------
# Bad arguments fail before training


def expect_error(args: list, capsys, *needles: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_k_must_be_below_hidden(corpus2000, capsys, tmp_path):
    files = ["--train-file", corpus2000["train"], "--test-file", corpus2000["test"]]
    expect_error(
        [*files, "--hidden", 8, "--k", 8, "--out", tmp_path], capsys, "--k 8", "--hidden 8"
    )
    expect_error([*files, "--k", -1, "--out", tmp_path], capsys, "--k must be >= 0")


def test_missing_files_are_named(corpus2000, capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    args = ["--train-file", missing, "--test-file", corpus2000["test"], "--out", tmp_path]
    expect_error(args, capsys, "--train-file", str(missing))
    args = ["--train-file", corpus2000["train"], "--out", tmp_path]
    expect_error(args, capsys, "--test-file is required")
    args = ["--corpus", "ptb-dep-sample", "--data-dir", tmp_path, "--out", tmp_path]
    expect_error(args, capsys, str(tmp_path / "ptb-dep-sample" / "train.conllx.gz"))


def test_corpus_needs_a_data_dir(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MEPROP_DATA_DIR", raising=False)
    expect_error(["--corpus", "conll2000", "--out", tmp_path], capsys, "MEPROP_DATA_DIR")


def test_bad_features_and_batch(corpus2000, capsys, tmp_path):
    files = ["--train-file", corpus2000["train"], "--test-file", corpus2000["test"]]
    expect_error([*files, "--features", "caps,shoe", "--out", tmp_path], capsys, "shoe")
    args = [*files, "--batch-size", 3, "--devices", 2, "--out", tmp_path]
    expect_error(args, capsys, "--batch-size 3")


def test_predict_needs_a_run(corpus2000, capsys, tmp_path):
    args = ["--predict", corpus2000["test"], "--out", tmp_path]
    expect_error(args, capsys, "vocab.json")


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.data
@pytest.mark.skipif(REAL_DATA_DIR is None, reason="MEPROP_DATA_DIR is not set")
def test_real_conll2000_smoke(tmp_path):
    out = tmp_path / "run"
    args = [
        "--corpus", "conll2000", "--limit-train", 300, "--epochs", 1, "--hidden", 64,
        "--batch-size", 8, "--lr", 0.01, "--devices", 1, "--timing-batches", 0, "--out", out,
    ]  # fmt: skip
    assert run_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["train_sentences"] == 300 and cfg["dev_sentences"] == 894
    assert cfg["test_sentences"] == 2012 and cfg["num_tags"] <= 45
    # 38 updates at a high learning rate: far above the 14% of always answering NN.
    assert results["best"]["test_acc"] > 50.0


def test_help_hides_sparse_update(capsys):
    """The LSTM scan reuses its cell, so the loop's --sparse-update cannot apply: not offered,
    and refused with a one-line message if given anyway."""
    assert "--sparse-update" not in build_parser().format_help()


def test_sparse_update_is_refused(corpus2000, capsys, tmp_path):
    files = ["--train-file", corpus2000["train"], "--test-file", corpus2000["test"]]
    expect_error([*files, "--sparse-update", "--out", tmp_path], capsys, "--sparse-update")


# ---------------------------------------------------------------------------------------------
# One trained run: refused resumes and prediction


@pytest.fixture(scope="module")
def trained(corpusx, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("trained") / "run"
    args = [
        "--train-file", corpusx["train"], "--dev-file", corpusx["dev"],
        "--test-file", corpusx["test"], *COMMON, "--epochs", 1, "--k", 2, "--devices", 1,
        "--min-count", 1, "--out", out,
    ]  # fmt: skip
    assert run_main(args) == 0
    return out, args


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["--min-count", 2], "min_count"),
        (["--features", "caps,suffix3"], "features"),
        (["--limit-train", 30], "limit_train"),
    ],
)
def test_refused_resume_leaves_the_run_untouched(trained, capsys, change, needle):
    out, args = trained
    before = file_hashes(out)
    assert "vocab.json" in before and any(k.startswith("checkpoints") for k in before)
    expect_error([*args, *change, "--resume"], capsys, "--resume", needle)
    assert file_hashes(out) == before


@pytest.mark.slow
def test_the_same_run_asked_for_again(trained, capsys):
    """The same command: where the results are, exit 0, nothing written; more epochs: the
    --resume command, exit 2; a setting changed: which one, exit 2."""
    out, args = trained
    before = file_hashes(out)
    assert run_main(args) == 0
    assert "finished after 1 epoch:" in capsys.readouterr().out
    assert run_main([*args, "--epochs", 2]) == 2
    err = capsys.readouterr().err
    assert "stopped after epoch 1 of 2" in err and "--resume" in err
    assert run_main([*args, "--seed", 3]) == 2
    assert "seed (0 there, 3 now)" in capsys.readouterr().err
    assert file_hashes(out) == before


@pytest.mark.slow
def test_refused_resume_on_changed_data(trained, capsys, tmp_path):
    """Same flags, but the training file's contents changed: other vocabularies."""
    out, args = trained
    train = Path(args[args.index("--train-file") + 1])
    copy = write_conllx(tmp_path / train.name, toy_sentences(48, 9))
    moved = [copy if a == train else a for a in args]
    before = file_hashes(out)
    with pytest.raises(SystemExit) as exc:
        run_main([*moved, "--resume"])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    assert file_hashes(out) == before


def _untag_tab(path: Path, target: Path, comment: bool) -> Path:
    """``path`` (CoNLL-X) with the tag columns blanked to ``_``, optionally as CoNLL-U with a
    comment line and a multiword range before each sentence."""
    blocks = []
    for block in path.read_text().strip().split("\n\n"):
        lines = []
        for line in block.split("\n"):
            cols = line.split("\t")
            cols[3] = cols[4] = "_"
            lines.append("\t".join(cols))
        if comment:
            lines = ["# sent_id = x", "1-2\tab\t_\t_\t_\t_\t_\t_\t_\t_", *lines]
        blocks.append("\n".join(lines))
    target.write_text("\n\n".join(blocks) + "\n")
    return target


def _predict(run: Path, path: Path, output: Path, capsys) -> str:
    assert run_main(["--predict", path, "--out", run, "--predict-output", output]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_predict_untagged_conllx_conllu_and_plain_text(trained, corpusx, tmp_path, capsys):
    run, _ = trained
    # Reference: the tags predicted for the tagged file.
    reference = tmp_path / "reference.conllx"
    printed = _predict(run, corpusx["test"], reference, capsys)
    assert "agreement with the tags" in printed
    expected = [s.tags for s in read_tagged(reference)]
    words = [s.words for s in read_tagged(corpusx["test"])]
    vocab_tags = set(json.loads((run / "vocab.json").read_text())["tags"])
    assert {t for tags in expected for t in tags} <= vocab_tags

    # CoNLL-X with "_" tags: the same tags, written into the same columns.
    untagged = _untag_tab(corpusx["test"], tmp_path / "untagged.conllx", comment=False)
    printed = _predict(run, untagged, tmp_path / "out.conllx", capsys)
    assert "agreement" not in printed and "tagged 10 sentences" in printed
    got = read_tagged(tmp_path / "out.conllx", format="conllx")
    assert [s.words for s in got] == words and [s.tags for s in got] == expected

    # CoNLL-U with "_" tags, comments and multiword ranges: all kept.
    untagged = _untag_tab(corpusx["test"], tmp_path / "untagged.conllu", comment=True)
    _predict(run, untagged, tmp_path / "out.conllu", capsys)
    text = (tmp_path / "out.conllu").read_text()
    assert text.count("# sent_id = x") == 10 and text.count("1-2\tab") == 10
    got = read_tagged(tmp_path / "out.conllu", format="conllu")
    assert [s.words for s in got] == words and [s.tags for s in got] == expected

    # Plain text, one token a line: written back as "word TAG" lines.
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join("\n".join(w) for w in words) + "\n")
    printed = _predict(run, plain, tmp_path / "out.txt", capsys)
    assert "agreement" not in printed
    lines = (tmp_path / "out.txt").read_text().split("\n\n")
    assert len([b for b in lines if b.strip()]) == 10
    got = read_tagged(tmp_path / "out.txt", format="conll2000")
    assert [s.words for s in got] == words and [s.tags for s in got] == expected
    out_lines = (tmp_path / "out.txt").read_text().splitlines()
    assert all(len(line.split()) == 2 for line in out_lines if line)
