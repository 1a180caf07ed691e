"""Tests of experiments.loop.results: model selection and the log and summary lines."""

from pathlib import Path

from experiments.loop import results
from experiments.loop.task import RunResult

TIMING = {"train_wall_s": 1.0, "eval_s": 0.5, "compile_s": 0.0, "forward_s": None}


def test_best_epoch_first_of_ties() -> None:
    history = [
        {"epoch": 1, "dev_acc": 90.0, "test_acc": 89.0},
        {"epoch": 2, "dev_acc": 95.0, "test_acc": 93.0},
        {"epoch": 3, "dev_acc": 95.0, "test_acc": 94.0},
    ]
    assert results.best_epoch(history) == {"epoch": 2, "dev_acc": 95.0, "test_acc": 93.0}
    assert results.best_epoch([]) is None


def test_best_epoch_by_task_metric_with_extras() -> None:
    history = [
        {"epoch": 1, "dev_uas": 80.0, "test_uas": 79.0, "dev_loss": 1.0, "dev_las": 70.0,
         "test_las": 69.0},
        {"epoch": 2, "dev_uas": 85.0, "test_uas": 83.0, "dev_loss": 0.9, "dev_las": 71.0,
         "test_las": 72.0},
    ]  # fmt: skip
    assert results.best_epoch(history, "uas") == {
        "epoch": 2,
        "dev_uas": 85.0,
        "test_uas": 83.0,
        "dev_las": 71.0,
        "test_las": 72.0,
    }


def test_log_and_summary_name_the_metric() -> None:
    record = {"epoch": 1, "loss": 0.5, "dev_acc": 91.0, "test_acc": 90.0, "dev_loss": 0.4,
              "test_loss": 0.4, "timing": TIMING}  # fmt: skip
    lines: list[str] = []
    results.log_epoch(record, 3, lines.append)
    assert lines == ["epoch 1/3  loss 0.5000  dev 91.00%  test 90.00%  train 1.00s  eval 0.50s"]
    parser = {"epoch": 1, "loss": 0.5, "dev_uas": 81.0, "test_uas": 80.0, "dev_loss": 0.4,
              "test_loss": 0.4, "dev_las": 71.0, "test_las": 70.0, "timing": TIMING}  # fmt: skip
    lines.clear()
    results.log_epoch(parser, 3, lines.append, "uas")
    assert "dev uas 81.00%  test uas 80.00%  dev las 71.00%  test las 70.00%" in lines[0]
    best = results.best_epoch([parser], "uas")
    run = RunResult([parser], best, "complete", None, Path("r"), metric="uas")
    assert results.summary_line(run) == (
        "best epoch 1: dev uas 81.00% test uas 80.00% dev las 71.00% test las 70.00%, "
        "train wall 1.000s"
    )
