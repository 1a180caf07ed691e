"""Command-line tests of python -m experiments.parsing: errors, a tiny run, --predict."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.corpora.treebank import read_treebank
from experiments.parsing import main as parsing

_WORDS = {
    "DET": ["the", "a", "this"],
    "ADJ": ["big", "red", "old"],
    "NOUN": ["cat", "dog", "bird", "house"],
    "VERB": ["sees", "likes", "ate"],
    "PUNCT": [".", "!"],
}


def toy_sentence(rng: random.Random) -> list[tuple[str, str, int, str]]:
    """DET (ADJ) NOUN VERB DET NOUN PUNCT with its tree: (word, UPOS, head, label)."""
    tokens = [("DET", "det")]
    adj = rng.random() < 0.4
    if adj:
        tokens.append(("ADJ", "amod"))
    subj = len(tokens) + 1
    verb = subj + 1
    tokens += [("NOUN", "nsubj"), ("VERB", "root"), ("DET", "det"), ("NOUN", "obj")]
    tokens.append(("PUNCT", "punct"))
    heads = [subj] * (2 if adj else 1) + [verb, 0, verb + 2, verb, verb]
    return [
        (rng.choice(_WORDS[tag]), tag, head, label)
        for (tag, label), head in zip(tokens, heads, strict=True)
    ]


def write_toy(path: Path, n: int, seed: int, extras: bool = False) -> Path:
    rng = random.Random(seed)
    blocks = []
    for s in range(n):
        lines = [f"# sent_id = {seed}-{s}"]
        for i, (word, tag, head, label) in enumerate(toy_sentence(rng), start=1):
            if extras and i == 1:
                lines.append(f"1-2\t{word}x\t_\t_\t_\t_\t_\t_\t_\t_")
            lines.append(f"{i}\t{word}\t{word}\t{tag}\t{tag.lower()}\t_\t{head}\t{label}\t_\tM={i}")
            if extras and i == 2:
                lines.append("2.1\tgone\tgo\tVERB\tverb\t_\t_\t_\t2:dep\t_")
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def run_main(args: list) -> int:
    return parsing.main([str(a) for a in args])


def expect_error(args: list, capsys, *needles: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toy")
    return {
        "train": write_toy(d / "train.conllu", 40, 0),
        "dev": write_toy(d / "dev.conllu", 6, 1),
        "test": write_toy(d / "test.conllu", 6, 2),
    }


def files(toy: dict[str, Path]) -> list:
    return [
        *["--train-file", toy["train"], "--dev-file", toy["dev"], "--test-file", toy["test"]],
        *["--devices", 1],
    ]


def test_bad_flags_name_the_flag(toy, tmp_path, capsys):
    expect_error([*files(toy), "--k", 500, "--out", tmp_path], capsys, "--k 500", "--hidden 500")
    expect_error([*files(toy), "--kdim", "--k", 0, "--out", tmp_path], capsys, "--kdim")
    missing = tmp_path / "none.conllu"
    args = ["--train-file", missing, "--dev-file", toy["dev"], "--test-file", toy["test"]]
    expect_error([*args, "--devices", 1, "--out", tmp_path], capsys, "--train-file", str(missing))
    expect_error(["--train-file", toy["train"], "--out", tmp_path], capsys, "--dev-file")
    expect_error(["--predict", toy["test"], "--out", tmp_path], capsys, "vocab.json")


def test_defaults_are_the_measured_ones_and_name_the_run_by_what_differs():
    args = parsing.build_parser().parse_args(["--corpus", "ptb-dep-sample"])
    s = parsing.settings_from_args(args, devices=1)
    assert (s.k, s.mode, s.dropout, s.batch_size, args.epochs) == (20, "per-example", 0.5, 250, 6)
    files = {"corpus": "ptb-dep-sample"}
    name = parsing.default_out(s, files, args).name
    assert name == "parse-ptb-dep-sample-k20-per-example-h500-cube-adam-b250-s0"
    # Dropout 0 differs from the default, so it must not share the default run's folder.
    args = parsing.build_parser().parse_args(["--corpus", "ptb-dep-sample", "--dropout", "0"])
    s = parsing.settings_from_args(args, devices=1)
    assert parsing.default_out(s, files, args).name == f"{name}-drop0"


def test_malformed_data_exits_2_with_file_and_line(toy, tmp_path):
    bad = tmp_path / "bad.conllu"
    lines = toy["train"].read_text().splitlines()
    cols = lines[3].split("\t")
    cols[6] = "99"
    lines[3] = "\t".join(cols)
    bad.write_text("\n".join(lines) + "\n")
    args = ["--train-file", bad, "--dev-file", toy["dev"], "--test-file", toy["test"]]
    args += ["--devices", 1]
    command = [sys.executable, "-m", "experiments.parsing", *map(str, args)]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{bad}:4: HEAD 99 out of range" in err[0]


@pytest.mark.slow
def test_tiny_run_then_predict_round_trip(toy, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        *files(toy), "--hidden", 32, "--k", 4, "--embed-dim", 8, "--epochs", 2,
        "--batch-size", 32, "--lr", 0.01, "--timing-batches", 2, "--out", out,
    ]  # fmt: skip
    assert run_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["task"] == "parsing" and cfg["k"] == 4 and cfg["labelled"]
    assert cfg["train_examples"] == 2 * sum(map(len, read_treebank(toy["train"])))
    assert cfg["skipped_nonprojective"] == 0 and cfg["num_transitions"] == 1 + 2 * 6
    best = results["best"]
    test = best["test_uas"]
    for record in results["epochs"]:
        for split in ("dev", "test"):
            assert record[f"{split}_las"] <= record[f"{split}_uas"]
    parse = results["parse"]
    assert parse["test_sentences"] == 6 and parse["parse_sents_per_s"] > 0
    assert parse["test_uas"] == pytest.approx(test, abs=1e-6)  # the loop's decoder agrees
    assert (out / "vocab.json").is_file()
    assert "parse speed:" in capsys.readouterr().out
    # Asked for again: where the results are, exit code 0, nothing parsed or written again.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run_main(args) == 0
    said = capsys.readouterr().out
    assert "finished after 2 epochs" in said and "parse speed" not in said
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    source = write_toy(tmp_path / "in.conllu", 5, 7, extras=True)
    predicted = tmp_path / "predicted.conllu"
    assert run_main(["--predict", source, "--out", out, "--predict-output", predicted]) == 0
    before, after = source.read_text().splitlines(), predicted.read_text().splitlines()
    assert after[len(before) :] == [""]
    for old, new in zip(before, after[: len(before)], strict=True):
        old_cols, new_cols = old.split("\t"), new.split("\t")
        if not old or old.startswith("#") or not old_cols[0].isdigit():
            assert new == old  # comments, blank lines, multiword tokens, empty nodes
        else:
            assert old_cols[:6] + old_cols[8:] == new_cols[:6] + new_cols[8:]
    trees = read_treebank(predicted)  # validates: a root, no cycle, every HEAD in range
    labels = set(json.loads((out / "vocab.json").read_text())["labels"])
    for tree in trees:
        assert tree.heads.count(0) == 1 and set(tree.labels) <= labels
    assert "parsed 5 sentences" in capsys.readouterr().out
