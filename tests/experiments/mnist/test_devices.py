"""The default device count divides the batch: batch 50 trains on an 8-device host."""

import functools
import json
from pathlib import Path

import pytest

from experiments.mnist import cli
from experiments.mnist import task as mnist_task
from experiments.mnist.data import load_mnist
from tests.experiments.mnist.test_cli import write_tiny_mnist


@pytest.mark.slow
def test_batch_of_50_uses_the_most_devices_that_divide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mnist"
    specs = write_tiny_mnist(folder)
    monkeypatch.setattr(mnist_task, "load_mnist", functools.partial(load_mnist, expected=specs))
    out = tmp_path / "run"
    argv = ["--data-dir", str(folder), "--out", str(out), "--hidden", "16", "--k", "4",
            "--batch-size", "50", "--epochs", "1", "--timing-batches", "1"]  # fmt: skip
    assert cli.main(argv) == 0  # no --devices: the host has 8 (tests/conftest.py)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num_devices"] == 5  # the most of 8 that divide 50
    assert "using 5 of 8 devices" in capsys.readouterr().out
