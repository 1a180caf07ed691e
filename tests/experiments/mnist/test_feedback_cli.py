"""``--error-feedback`` of the MNIST command line: flags, run folder, checkpointed memory."""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.mnist import cli
from meprop_jax import feedback
from tests.experiments.mnist.test_cli import metrics, tiny_args


def _settings(*argv: str):
    return cli.settings_from_args(cli.build_parser().parse_args(list(argv)), devices=1)


def test_flag_without_value_is_pure_error_feedback() -> None:
    assert _settings("--error-feedback").feedback == cli.DEFAULT_FEEDBACK == 1.0
    assert _settings("--error-feedback", "0.25").feedback == 0.25
    assert _settings().feedback == 0.0
    model = _settings("--error-feedback", "0.5").model()
    assert model.feedback == 0.5


def test_out_dir_names_the_decay() -> None:
    argv = ["--error-feedback", "0.5"]
    out = cli.default_out(_settings(*argv), cli.build_parser().parse_args(argv))
    assert out == Path("runs/mnist-k30-unified-fb0.5-h500x2-adam-b50-s0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--error-feedback", "0"], "--error-feedback DECAY must be in"),
        (["--error-feedback", "1.5"], "--error-feedback DECAY must be in"),
        (["--error-feedback", "--k", "0"], "--k >= 1"),
        (["--error-feedback", "--kdim"], "--k >= 1"),
        (["--error-feedback", "--mode", "per-example"], "--mode unified"),
        (["--error-feedback", "--sparse-update"], "--sparse-update"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _memory(out: Path, epoch: int) -> dict:
    state = ocp.StandardCheckpointer().restore(
        (out / "checkpoints" / str(epoch) / "state").absolute()
    )
    return state["params"][feedback.MEMORY_COLLECTION]


@pytest.mark.slow
def test_resume_keeps_the_memory(tiny_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    extra = ("--mode", "unified", "--error-feedback", "0.5")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main(tiny_args(tiny_dir, whole, *extra)) == 0
    first = tiny_args(tiny_dir, split, *extra)
    first[first.index("--epochs") + 1] = "1"
    assert cli.main(first) == 0
    assert cli.main([*tiny_args(tiny_dir, split, *extra), "--resume"]) == 0
    want = json.loads((whole / "results.json").read_text())
    got = json.loads((split / "results.json").read_text())
    assert got["config"]["feedback"] == 0.5
    assert metrics(got["epochs"]) == metrics(want["epochs"])
    # The memory is checkpointed, it is not empty, and the resumed run carried it on.
    after_one = _memory(split, 1)
    assert set(after_one) == {"hidden_0", "hidden_1"}
    assert all(np.count_nonzero(m["memory"]) > 0 for m in after_one.values())
    for name, m in _memory(whole, 2).items():
        np.testing.assert_array_equal(m["memory"], _memory(split, 2)[name]["memory"])
