"""``--error-feedback`` and ``--adaptive-k`` of the tagger's command line: flags, and a tiny
bidirectional run whose LSTM cells share a memory and a chosen-k record over time steps."""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.tagging import cli
from meprop_jax import AdaptiveK, feedback
from tests.experiments.tagging.test_cli import expect_error
from tests.experiments.tagging.toy import COMMON, run_main, toy_sentences, write_conll2000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("conll2000")
    return {
        "train": write_conll2000(d / "train.txt", toy_sentences(24, 0)),
        "test": write_conll2000(d / "test.txt", toy_sentences(6, 1)),
    }


def _files(corpus: dict[str, Path], out: Path) -> list:
    return ["--train-file", corpus["train"], "--test-file", corpus["test"], "--out", out]


def test_flags_reach_the_model(corpus, tmp_path) -> None:
    argv = [str(a) for a in _files(corpus, tmp_path)]
    args = cli.build_parser().parse_args([*argv, "--error-feedback", "0.5", "--adaptive-k"])
    settings = cli.settings_from_args(args, devices=1)
    assert (settings.feedback, settings.adaptive) == (0.5, AdaptiveK(mass=0.9, k_min=1))
    args = cli.build_parser().parse_args(argv)
    assert cli.settings_from_args(args, devices=1).adaptive is None


def test_bad_flags_name_the_flag(corpus, tmp_path, capsys) -> None:
    base = [*_files(corpus, tmp_path), "--devices", 1]
    expect_error([*base, "--error-feedback", "0"], capsys, "--error-feedback DECAY")
    expect_error([*base, "--error-feedback", "--k", 0], capsys, "--error-feedback needs meProp")
    expect_error([*base, "--error-feedback", "--mode", "per-example"], capsys, "--mode unified")
    expect_error([*base, "--adaptive-k", "--k", 0], capsys, "--adaptive-k needs meProp")
    expect_error([*base, "--adaptive-k", "--adaptive-k-min", 11], capsys, "1..--k (10)")


@pytest.mark.slow
def test_tiny_run_shares_the_memory_and_reports_the_chosen_k(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [*_files(corpus, out), *COMMON, "--k", 3, "--devices", 1, "--bidirectional"]
    args += ["--epochs", 1, "--error-feedback", "--adaptive-k", "--adaptive-k-mass", 0.5]
    assert run_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    (event,) = results["epochs"][0]["events"]
    means = event["adaptive_k_mean"]
    assert set(means) == {"lstm", "lstm_backward"}
    assert all(1.0 <= k <= 3.0 for k in means.values())  # per gate and time step
    assert "epoch 1: mean adaptive k lstm" in capsys.readouterr().out
    state = ocp.StandardCheckpointer().restore((out / "checkpoints" / "1" / "state").absolute())
    memories = state["params"][feedback.MEMORY_COLLECTION]
    for name in ("lstm", "lstm_backward"):
        memory = memories[name]["memory"]
        assert memory.shape == (4 * 16,) and np.all(np.isfinite(memory))
        assert np.count_nonzero(memory) > 0
