"""Tests for experiments.tagging: features, vocabularies, batching, the model, the CLI."""

import json
import os
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.corpora.conll import Sentence, read_tagged
from experiments.tagging import main as tagging
from experiments.tagging.main import (
    DEFAULT_FEATURES,
    Vocab,
    Vocabularies,
    batch_arrays,
    bucket_length,
    bucketize,
    caps_pattern,
    digit_class,
    extract_features,
    normalize_word,
)

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")

# A toy language with a deterministic tagging: DT (JJ) NN VBZ/VBD (DT NN|CD NNS) .
_LEXICON = {
    "DT": ["the", "a", "The", "A", "this"],
    "JJ": ["big", "small", "red", "well-known"],
    "NN": ["cat", "dog", "Paris", "IBM", "bird", "house"],
    "VBZ": ["sees", "likes", "eats"],
    "VBD": ["saw", "liked", "ate"],
    "CD": ["12", "3,000", "7.5"],
    "NNS": ["apples", "birds", "houses"],
    ".": [".", "!"],
}


def toy_sentences(n: int, seed: int) -> list[Sentence]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tags = ["DT"] + (["JJ"] if rng.random() < 0.3 else []) + ["NN", rng.choice(["VBZ", "VBD"])]
        tags += [*rng.choice([["DT", "NN"], ["CD", "NNS"]]), "."]
        words = [rng.choice(_LEXICON[t]) for t in tags]
        out.append(Sentence(tuple(words), tuple(tags)))
    return out


def write_conll2000(path: Path, sentences: list[Sentence]) -> Path:
    blocks = [
        "\n".join(f"{w} {t} O" for w, t in zip(s.words, s.tags, strict=True)) for s in sentences
    ]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def write_conllx(path: Path, sentences: list[Sentence]) -> Path:
    blocks = []
    for s in sentences:
        lines = [
            f"{i}\t{w}\t_\t{t[:2]}\t{t}\t_\t0\t_\t_\t_"
            for i, (w, t) in enumerate(zip(s.words, s.tags, strict=True), start=1)
        ]
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


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


COMMON = ["--epochs", "2", "--hidden", "16", "--batch-size", "4", "--timing-batches", "0"]


def run_main(args: list[str]) -> int:
    return tagging.main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Features and vocabularies


def test_normalize_word():
    assert normalize_word("Hello") == "hello"
    assert normalize_word("1,234.5") == "0,000.0"
    assert normalize_word("B-52s") == "b-00s"


@pytest.mark.parametrize(
    ("word", "pattern"),
    [
        ("cat", "lower"),
        ("Paris", "init"),
        ("I", "init"),
        ("IBM", "upper"),
        ("McDonald", "mixed"),
        ("iPhone", "mixed"),
        ("1,000", "none"),
        (".", "none"),
        ("U.S.", "upper"),
        ("3Com", "init"),
    ],
)
def test_caps_pattern(word, pattern):
    assert caps_pattern(word) == pattern


@pytest.mark.parametrize(
    ("word", "cls"),
    [
        ("cat", "none"),
        ("1,000", "number"),
        ("7.5", "number"),
        ("10/12", "number"),
        ("B-52", "some"),
    ],
)
def test_digit_class(word, cls):
    assert digit_class(word) == cls


def test_extract_features_default_set():
    feats = extract_features(["The", "well-known", "1990s"], DEFAULT_FEATURES)
    assert len(feats) == 3 and all(len(f) == len(DEFAULT_FEATURES) for f in feats)
    assert dict(zip(DEFAULT_FEATURES, feats[0], strict=True)) == {
        "caps": "init",
        "digit": "none",
        "hyphen": "no",
        "prefix2": "th",
        "suffix2": "he",
        "suffix3": "the",
        "next": "well-known",
    }
    second = dict(zip(DEFAULT_FEATURES, feats[1], strict=True))
    assert second["hyphen"] == "yes" and second["next"] == "0000s"
    third = dict(zip(DEFAULT_FEATURES, feats[2], strict=True))
    assert third["next"] == tagging.END and third["digit"] == "some"
    assert third["prefix2"] == "00" and third["suffix3"] == "00s"


def test_length_feature_and_short_words():
    names = ("length", "suffix3", "prefix2")
    assert extract_features(["a"], names) == [("1", "a", "a")]
    assert extract_features(["internationally"], names)[0][0] == "10+"
    assert extract_features(["elephant"], names)[0][0] == "8-9"


def test_vocab_min_count_maps_rare_to_unk():
    sents = [Sentence(("the", "cat"), ("DT", "NN")), Sentence(("The", "dog"), ("DT", "NN"))]
    vocab = Vocabularies.build(sents, ("caps", "suffix2"), min_count=2)
    assert vocab.words.items[:2] == ("<pad>", "<unk>")
    assert "the" in vocab.words and "cat" not in vocab.words  # "the" twice (lowercased)
    enc = vocab.encode(Sentence(("The", "cat"), ("DT", "VB")))
    assert enc.words[1] == tagging.UNK_ID and enc.words[0] > tagging.UNK_ID
    assert enc.features.shape == (2, 2)
    assert enc.tags[0] == vocab.tags.id("DT") >= 0
    assert enc.tags[1] == -1  # unseen tag
    assert vocab.tags.items == ("DT", "NN")


def test_vocab_json_round_trip():
    vocab = Vocabularies.build(toy_sentences(10, 0), DEFAULT_FEATURES, 1)
    again = Vocabularies.from_json(json.loads(json.dumps(vocab.to_json())))
    assert again == vocab
    assert again.words.id("cat") == vocab.words.id("cat")


def test_vocab_build_order():
    from collections import Counter

    v = Vocab.build(Counter({"b": 2, "a": 2, "c": 5, "d": 1}), 2)
    assert v.items == ("<pad>", "<unk>", "c", "a", "b")
    assert v.id("d") == tagging.UNK_ID


# ---------------------------------------------------------------------------------------------
# Buckets and minibatches


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 8, 9, 16, 17, 64, 65, 128, 129, 249)] == [
        8, 8, 8, 16, 16, 24, 64, 128, 128, 256, 256,
    ]  # fmt: skip


def test_bucketize_and_batches():
    sents = [*toy_sentences(7, 0), Sentence(tuple("w" for _ in range(12)), ("NN",) * 12)]
    vocab = Vocabularies.build(sents, DEFAULT_FEATURES, 1)
    enc = [vocab.encode(s) for s in sents]
    buckets = bucketize(enc, len(DEFAULT_FEATURES))
    assert [b.length for b in buckets] == [8, 16]
    assert sorted(np.concatenate([b.index for b in buckets]).tolist()) == list(range(8))
    arrays = batch_arrays(buckets[0], 4, order=np.arange(len(buckets[0]))[::-1])
    assert arrays["words"].shape == (2, 4, 8)
    assert arrays["features"].shape == (2, 4, 8, len(DEFAULT_FEATURES))
    lengths = arrays["lengths"].reshape(-1)
    assert lengths[7] == 0  # the 8th slot is an empty filler sentence
    assert arrays["mask"].sum() == sum(len(s.words) for s in sents[:7])
    # Masked-out positions are padding ids.
    assert np.all(arrays["words"][arrays["mask"] == 0] == 0)
    first = buckets[0].index[-1]  # reversed order: the last sentence comes first
    assert lengths[0] == len(sents[first].words)


def test_token_loss_counts_unknown_tags_as_errors():
    logits = jnp.array([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])
    tags = jnp.array([[0, -1, 1]], jnp.int32)
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, aux = tagging.token_loss(logits, tags, mask)
    assert float(aux["count"]) == 2.0 and float(aux["correct"]) == 1.0
    assert np.isfinite(float(loss)) and float(loss) < 0.01


# ---------------------------------------------------------------------------------------------
# The model


def random_params(model: tagging.Tagger, seed: int):
    """Parameters of the right shapes without compiling the initialisers (slow on CPU)."""
    shapes = jax.eval_shape(lambda k: tagging.init_params(model, k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_change_predictions(bidirectional):
    sents = toy_sentences(20, 0)
    long = Sentence(("w",) * 13, ("NN",) * 13)
    vocab = Vocabularies.build([*sents, long], DEFAULT_FEATURES, 1)
    settings = tagging.TaggerSettings(hidden=16, k=2, bidirectional=bidirectional)
    model = settings.model(vocab)
    params = random_params(model, 3)
    target = vocab.encode(sents[0])
    n = len(target.words)

    def logits(encoded, length, empty=0):
        b = len(encoded) + empty  # ``empty`` trailing all-padding rows
        words = np.zeros((b, length), np.int32)
        feats = np.zeros((b, length, len(DEFAULT_FEATURES)), np.int32)
        lengths = np.zeros(b, np.int32)
        for i, e in enumerate(encoded):
            words[i, : len(e.words)] = e.words
            feats[i, : len(e.words)] = e.features
            lengths[i] = len(e.words)
        return np.asarray(model.apply(params, words, feats, lengths, False))

    alone = logits([target], n)[0]
    batch = [vocab.encode(long), target, vocab.encode(sents[1])]
    padded = logits(batch, 16, empty=1)[1, :n]
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    assert np.array_equal(padded.argmax(-1), alone.argmax(-1))
    # predict_tags buckets and batches on its own: same tags whatever the company.
    together = tagging.predict_tags(model, params, batch, batch_size=4)[1]
    single = tagging.predict_tags(model, params, [target], batch_size=1)[0]
    assert np.array_equal(together, single) and np.array_equal(single, alone.argmax(-1))


def test_model_parameter_shapes():
    vocab = Vocabularies.build(toy_sentences(10, 0), DEFAULT_FEATURES, 1)
    model = tagging.TaggerSettings(hidden=12, k=3).model(vocab)
    params = jax.eval_shape(lambda k: tagging.init_params(model, k), jax.random.key(0))["params"]
    assert params["word_embedding"].shape == (len(vocab.words), 50)
    assert params["feature_embedding_6"].shape == (len(vocab.features[6]), 20)
    assert params["lstm"]["ii"]["kernel"].shape == (190, 12)  # 50 + 7 x 20 inputs
    assert params["output"]["kernel"].shape == (12, len(vocab.tags))


# ---------------------------------------------------------------------------------------------
# Command line: training, results, prediction


def check_results(out: Path, k: int, mode: str) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert len(results["epochs"]) == 2
    best = results["best"]
    assert 0.0 <= best["dev_acc"] <= 100.0 and 0.0 <= best["test_acc"] <= 100.0
    cfg = results["config"]
    assert cfg["task"] == "tagging" and cfg["k"] == k and cfg["mode"] == mode
    assert cfg["hidden"] == 16 and cfg["features"] == list(DEFAULT_FEATURES)
    assert (out / "vocab.json").is_file() and (out / "accuracy.png").is_file()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 2])
def test_train_conll2000_and_predict(corpus2000, tmp_path, k):
    out = tmp_path / "run"
    args = ["--train-file", corpus2000["train"], "--test-file", corpus2000["test"]]
    args += [*COMMON, "--k", k, "--devices", 1, "--out", out]
    if k == 0:  # one epoch, then the second one through --resume
        assert run_main([*args, "--epochs", 1]) == 0
        assert run_main([*args, "--resume"]) == 0
    else:
        assert run_main(args) == 0
    results = check_results(out, k, "unified")
    assert results["config"]["dev_file"] is None  # 10% of train held out
    assert results["config"]["dev_sentences"] == 6 and results["config"]["train_sentences"] == 54
    assert results["epochs"][1]["loss"] < results["epochs"][0]["loss"]

    predicted = tmp_path / "predicted.txt"
    args = ["--predict", corpus2000["test"], "--out", out, "--predict-output", predicted]
    assert run_main(args) == 0
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
