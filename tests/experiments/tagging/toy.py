"""Toy corpora and runners shared by the tagging tests."""

import random
from pathlib import Path

from experiments.corpora.conll import Sentence
from experiments.tagging import cli

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


COMMON = ["--epochs", "2", "--hidden", "16", "--batch-size", "4", "--timing-batches", "0"]


def run_main(args: list) -> int:
    return cli.main([str(a) for a in args])
