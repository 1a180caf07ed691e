"""Tests for experiments.tagging.features: word features and vocabularies."""

import json
from collections import Counter

import pytest

from experiments.corpora.conll import Sentence
from experiments.tagging.features import (
    DEFAULT_FEATURES,
    END,
    UNK_ID,
    Vocab,
    Vocabularies,
    caps_pattern,
    digit_class,
    extract_features,
    normalize_word,
)
from tests.experiments.tagging.toy import toy_sentences


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
    assert third["next"] == END and third["digit"] == "some"
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
    assert enc.words[1] == UNK_ID and enc.words[0] > UNK_ID
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
    v = Vocab.build(Counter({"b": 2, "a": 2, "c": 5, "d": 1}), 2)
    assert v.items == ("<pad>", "<unk>", "c", "a", "b")
    assert v.id("d") == UNK_ID
