"""``--error-feedback`` and ``--adaptive-k`` of the parser's command line: flags, a tiny run
that reports the mean chosen k and keeps the memory, and ``--predict`` from that run."""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.parsing import main as parsing
from meprop_jax import AdaptiveK, feedback
from tests.experiments.parsing.test_cli import expect_error, files, run_main, toy, write_toy

__all__ = ["toy"]  # the fixture, imported for the tests below


def _settings(*argv: str):
    args = parsing.build_parser().parse_args(["--train-file", "t", *argv])
    return parsing.settings_from_args(args, devices=1)


def test_flags_reach_the_model() -> None:
    plain = _settings()
    assert (plain.feedback, plain.adaptive) == (0.0, None)
    s = _settings("--mode", "unified", "--error-feedback", "--adaptive-k", "--adaptive-k-min", "2")
    assert (s.feedback, s.adaptive) == (1.0, AdaptiveK(mass=0.9, k_min=2))


def test_bad_flags_name_the_flag(toy, tmp_path, capsys) -> None:
    base = [*files(toy), "--out", tmp_path]
    # The parser's default mode is per-example, which keeps no memory per column.
    expect_error([*base, "--error-feedback"], capsys, "--error-feedback needs --mode unified")
    base = [*base, "--mode", "unified"]
    expect_error([*base, "--error-feedback", "1.5"], capsys, "--error-feedback DECAY")
    expect_error([*base, "--error-feedback", "--kdim"], capsys, "--error-feedback needs meProp")
    expect_error([*base, "--adaptive-k", "--mode", "random"], capsys, "--adaptive-k needs --mode")
    expect_error([*base, "--adaptive-k-mass", "0.5"], capsys, "only apply with --adaptive-k")
    expect_error([*base, "--adaptive-k", "--adaptive-k-min", "21"], capsys, "1..--k (20)")


@pytest.mark.slow
def test_tiny_run_reports_the_chosen_k_and_predicts(toy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        *files(toy), "--hidden", 32, "--k", 6, "--embed-dim", 8, "--epochs", 1,
        "--batch-size", 32, "--lr", 0.01, "--timing-batches", 2, "--out", out,
        "--mode", "unified", "--error-feedback", 0.5, "--adaptive-k", "--adaptive-k-mass", 0.5,
    ]  # fmt: skip
    assert run_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["feedback"] == 0.5
    (event,) = results["epochs"][0]["events"]
    assert list(event["adaptive_k_mean"]) == ["hidden"]
    assert 1.0 <= event["adaptive_k_mean"]["hidden"] <= 6.0
    assert "epoch 1: mean adaptive k hidden" in capsys.readouterr().out
    state = ocp.StandardCheckpointer().restore((out / "checkpoints" / "1" / "state").absolute())
    memory = state["params"][feedback.MEMORY_COLLECTION]["hidden"]["memory"]
    assert memory.shape == (32,) and np.count_nonzero(memory) > 0
    # A trained run parses: the memory and the statistics are not needed for inference.
    source = write_toy(tmp_path / "in.conllu", 3, 7)
    predicted = tmp_path / "predicted.conllu"
    assert run_main(["--predict", source, "--out", out, "--predict-output", predicted]) == 0
    assert len(predicted.read_text().strip().split("\n\n")) == 3
