"""Tests of experiments.loop.command.run_cli: a run asked for again, and what it checks first."""

from pathlib import Path

import pytest

from experiments.common import DataError
from experiments.loop import command
from experiments.loop.task import RunResult
from tests.experiments.loop.toy import ToyTask, config, file_hashes

ARGV = ["--k", "4"]


def reference_config(reference: RunResult, **kw):
    """The reference run's own settings (3 epochs with probes), changed by ``kw``."""
    return config(reference.out, **{"epochs": 3, "timing_batches": 3, **kw})


def never(task: ToyTask) -> None:
    raise AssertionError("a run asked for again must not train or finish again")


@pytest.mark.slow
def test_a_finished_run_asked_for_again_says_where_its_results_are(
    reference: RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    before = file_hashes(reference.out)
    code = command.run_cli(
        ToyTask, reference_config(reference), "experiments.toy", ARGV, never, never
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "finished after 3 epochs" in out and str(reference.out / "results.json") in out
    assert "--overwrite" in out
    assert file_hashes(reference.out) == before


@pytest.mark.slow
def test_an_unfinished_run_says_how_to_resume(
    reference: RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asked for more epochs than the folder holds: the resume command, exit code 2."""
    before = file_hashes(reference.out)
    cfg = reference_config(reference, epochs=5)
    assert command.run_cli(ToyTask, cfg, "experiments.toy", ARGV, never, never) == 2
    err = capsys.readouterr().err
    assert "stopped after epoch 3 of 5" in err
    assert command.resume_command("experiments.toy", ARGV, reference.out) in err
    assert "--overwrite" in err
    assert file_hashes(reference.out) == before


@pytest.mark.slow
def test_a_run_with_other_settings_names_them(
    reference: RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    before = file_hashes(reference.out)
    cfg = reference_config(reference, seed=5)
    assert command.run_cli(ToyTask, cfg, "experiments.toy", ARGV, never, never) == 2
    err = capsys.readouterr().err
    assert "seed (0 there, 5 now)" in err and "--overwrite" in err
    assert command.run_cli(lambda: ToyTask(k=2), reference_config(reference), "x", ARGV) == 2
    assert "k (4 there, 2 now)" in capsys.readouterr().err
    assert file_hashes(reference.out) == before


@pytest.mark.slow
def test_the_inputs_are_checked_before_the_run_folder(reference: RunResult) -> None:
    """A data error shows even where the folder holds a run (finished or not)."""

    def missing_data() -> ToyTask:
        raise DataError("--data-dir /empty lacks train.gz")

    for epochs in (3, 5):
        cfg = reference_config(reference, epochs=epochs)
        with pytest.raises(DataError, match="/empty lacks"):
            command.run_cli(missing_data, cfg, "experiments.toy", ARGV)


@pytest.mark.slow
def test_overwrite_trains_afresh_and_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--overwrite still starts afresh; prepare and finish run around the training."""
    calls = []
    out = tmp_path / "run"
    cfg = config(out, epochs=1)

    def prepare(task: ToyTask) -> None:
        calls.append("prepare")
        assert not (out / "checkpoints").exists()  # before the first write of the loop

    first = command.run_cli(ToyTask, cfg, "experiments.toy", ARGV, prepare, calls.append)
    assert first == 0 and calls[0] == "prepare" and isinstance(calls[1], ToyTask)
    calls.clear()
    again = config(out, epochs=1, overwrite=True)
    assert command.run_cli(ToyTask, again, "experiments.toy", ARGV, None, calls.append) == 0
    assert len(calls) == 1
    assert "best epoch 1" in capsys.readouterr().out


def test_a_run_ended_by_patience_counts_as_finished(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 of 10 epochs, dev best at epoch 2: finished for --patience 2, not for 3."""
    dev = {1: 50.0, 2: 60.0, 3: 55.0, 4: 58.0}
    history = [{"epoch": e, "dev_acc": a, "test_acc": a} for e, a in dev.items()]
    monkeypatch.setattr(command, "saved_run", lambda cfg, task: (history, []))
    cfg = config(tmp_path, epochs=10, patience=2)
    assert command.existing_run(ToyTask(), cfg, "experiments.toy", ARGV) == 0
    assert "finished after 4 epochs" in capsys.readouterr().out
    cfg = config(tmp_path, epochs=10, patience=3)
    assert command.existing_run(ToyTask(), cfg, "experiments.toy", ARGV) == 2
    assert "stopped after epoch 4 of 10" in capsys.readouterr().err
