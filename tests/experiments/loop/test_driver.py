"""Tests of experiments.loop.driver: whole runs of the tiny toy task."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.common import ConfigError
from experiments.loop import command, driver
from experiments.loop.results import best_epoch, patience_exhausted, summary_line
from experiments.loop.signals import StopFlag
from experiments.loop.task import RunResult
from tests.experiments.loop.toy import (
    METRICS,
    TokenToyTask,
    ToyTask,
    config,
    majority_rate,
    metrics,
    quiet,
)

# Three epochs of the linear toy teacher are learned this far above the label prior.
MARGIN = 15.0


@pytest.mark.slow
def test_run_writes_results_and_plots(reference: RunResult) -> None:
    results = json.loads((reference.out / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["config"]["task"] == "toy"
    assert results["config"]["optimizer"] == "adam" and results["config"]["lr"] == 0.03
    assert results["config"]["k"] == 4
    assert {"jax_version", "devices", "backend", "num_devices", "best", "mean_timing"} <= set(
        results
    )
    assert [r["epoch"] for r in results["epochs"]] == [1, 2, 3]
    for record in results["epochs"]:
        assert list(record)[: len(METRICS) - 1] == list(METRICS[:-1])  # no extra metric
        assert record["steps"] == 6 + 3
    best = results["best"]
    assert best == best_epoch(results["epochs"])
    assert set(best) == {"epoch", "dev_acc", "test_acc"}
    assert best["dev_acc"] == max(r["dev_acc"] for r in results["epochs"])
    # The teacher is linear, so three epochs must beat the label prior clearly.
    assert results["epochs"][-1]["dev_acc"] > majority_rate("dev") + MARGIN
    assert results["epochs"][-1]["test_acc"] > majority_rate("test") + MARGIN
    assert results["epochs"][-1]["loss"] < results["epochs"][0]["loss"]
    assert (reference.out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert (reference.out / "timing.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (reference.out / "checkpoints").iterdir()) == ["1", "2", "3"]


@pytest.mark.slow
def test_same_seed_same_metrics(reference: RunResult, tmp_path: Path) -> None:
    again = driver.train(ToyTask(), config(tmp_path, epochs=3), log=quiet)
    assert metrics(again.history) == metrics(reference.history)
    assert again.history[0]["timing"]["forward_s"] is None  # probes disabled
    assert again.history[0]["timing"]["probe_s"] < 0.05
    other = driver.train(ToyTask(), config(tmp_path / "seed1", epochs=1, seed=1), log=quiet)
    assert metrics(other.history)[0] != metrics(reference.history)[0]


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(reference: RunResult, tmp_path: Path) -> None:
    first = driver.train(ToyTask(), config(tmp_path, epochs=3), max_epochs_this_run=1, log=quiet)
    assert first.status == "stopped" and len(first.history) == 1
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "stopped"
    second = driver.train(ToyTask(), config(tmp_path, epochs=3, resume=True), log=quiet)
    assert second.status == "complete"
    assert metrics(second.history) == metrics(reference.history)
    assert second.best == reference.best


@pytest.mark.slow
def test_interrupt_mid_epoch_keeps_last_complete_epoch(
    reference: RunResult, tmp_path: Path
) -> None:
    stop = StopFlag()
    # checkpoint_every=5: epoch 1 is only saved because of the interruption.
    cfg = config(tmp_path, epochs=3, checkpoint_every=5)
    lines: list[str] = []
    first = driver.train(ToyTask(stop=stop, stop_epoch=2), cfg, stop=stop, log=lines.append)
    assert first.status == "interrupted" and first.signum == 2
    assert len(first.history) == 1  # epoch 2 was abandoned, not half-saved
    assert any("abandoned" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    resumed = driver.train(ToyTask(), dataclasses.replace(cfg, resume=True), log=quiet)
    assert metrics(resumed.history) == metrics(reference.history)


@pytest.mark.slow
def test_eight_devices_match_one(reference: RunResult, tmp_path: Path) -> None:
    assert jax.local_device_count() == 8
    run = driver.train(ToyTask(), config(tmp_path, epochs=3, devices=8), log=quiet)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_devices"] == 8 and len(results["devices"]) == 8
    for got, want in zip(run.history, reference.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["dev_loss"] == pytest.approx(want["dev_loss"], rel=1e-4)
        assert got["dev_acc"] == pytest.approx(want["dev_acc"], abs=1e-3)
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1e-3)


@pytest.mark.slow
def test_default_devices_divide_the_batch(reference: RunResult, tmp_path: Path) -> None:
    """With all 8 devices by default, a batch of 6 runs on the 6 that divide it, and says so."""
    lines: list[str] = []
    run = driver.train(ToyTask(batch=6), config(tmp_path, epochs=1, devices=None), log=lines.append)
    assert run.status == "complete"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_devices"] == 6 and results["config"]["num_devices"] == 6
    assert any("using 6 of 8 devices" in line and "[6]" in line for line in lines)
    # The default with a batch that all 8 divide stays at 8, without a note.
    lines.clear()
    driver.train(ToyTask(), config(tmp_path / "eight", epochs=1, devices=None), log=lines.append)
    assert json.loads((tmp_path / "eight" / "results.json").read_text())["num_devices"] == 8
    assert not any("devices" in line for line in lines)


@pytest.mark.slow
def test_random_mode_and_adagrad_with_clipping_learn(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, epochs=3, optimizer="adagrad", lr=None, clip=5.0, devices=2, progress=True
    )
    run = driver.train(ToyTask(mode="random"), cfg, log=quiet)
    assert run.status == "complete" and np.isfinite(run.history[-1]["loss"])
    assert run.best is not None and run.best["dev_acc"] > majority_rate("dev") + MARGIN


@pytest.mark.slow
def test_task_metric_and_extra_metrics(reference: RunResult, tmp_path: Path) -> None:
    """``Task.metric`` renames the accuracy everywhere; ``correct_<name>`` adds a metric."""
    lines: list[str] = []
    run = driver.train(TokenToyTask(), config(tmp_path, epochs=3), log=lines.append)
    results = json.loads((tmp_path / "results.json").read_text())
    for got, want in zip(results["epochs"], reference.history, strict=True):
        assert list(got)[:8] == [
            "epoch", "loss", "dev_tok", "test_tok", "dev_loss", "test_loss", "dev_top2",
            "test_top2",
        ]  # fmt: skip
        assert "dev_acc" not in got
        # Same model and data: the renamed metric is the reference's accuracy.
        assert got["dev_tok"] == want["dev_acc"] and got["test_tok"] == want["test_acc"]
        assert got["dev_top2"] >= got["dev_tok"] and got["test_top2"] >= got["test_tok"]
        assert got["dev_top2"] > got["dev_tok"] or got["dev_tok"] == 100.0
    best = results["best"]
    assert best == run.best
    assert set(best) == {"epoch", "dev_tok", "test_tok", "dev_top2", "test_top2"}
    assert best["epoch"] == reference.best["epoch"]
    assert best["dev_tok"] == reference.best["dev_acc"]
    assert "dev tok " in lines[0] and "dev top2 " in lines[0]
    assert "dev tok " in summary_line(run) and "test top2 " in summary_line(run)


@pytest.mark.slow
def test_sparse_update_run_times_and_resumes_exactly(
    sparse_reference: RunResult, reference: RunResult, tmp_path: Path
) -> None:
    import meprop_jax

    results = json.loads((sparse_reference.out / "results.json").read_text())
    assert results["status"] == "complete" and results["config"]["sparse_update"] is True
    assert results["best"]["dev_acc"] > majority_rate("dev") + MARGIN
    for record in sparse_reference.history:
        t = record["timing"]
        assert t["probe_steps"] == 3 and t["probe_step_s"] > 0
        assert t["probe_forward_backward_s"] > 0 and t["update_s"] >= 0.0
    # Lazy Adam is not the authors' dense Adam: the runs differ.
    assert metrics(sparse_reference.history) != metrics(reference.history)
    assert sparse_reference.state.taps is not None
    assert isinstance(sparse_reference.state.opt_state, meprop_jax.optim.SparseState)

    task = ToyTask(sparse_update=True)
    sparse = config(tmp_path, epochs=3, sparse_update=True)
    first = driver.train(task, sparse, max_epochs_this_run=1, log=quiet)
    assert first.status == "stopped"
    # The settings are compared before the (differently shaped) optimizer state is read.
    with pytest.raises(ConfigError, match=r"sparse_update \(True there, False now\)"):
        driver.train(ToyTask(), config(tmp_path, epochs=3, resume=True), log=quiet)
    second = driver.train(task, dataclasses.replace(sparse, resume=True), log=quiet)
    assert metrics(second.history) == metrics(sparse_reference.history)
    got, want = second.state, sparse_reference.state
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_indexed_groups_train_as_their_minibatches(
    reference: RunResult, tmp_path: Path, devices: int
) -> None:
    """Training groups given as IndexedGroups (a table and each epoch's rows of it) train,
    evaluate and probe as the same minibatches given whole: bit for bit on one device, and
    with the batch split over eight as the plain groups are (test_eight_devices_match_one)."""
    cfg = config(tmp_path, epochs=3, timing_batches=3, devices=devices)
    run = driver.train(ToyTask(indexed=True), cfg, log=quiet)
    if devices == 1:
        assert metrics(run.history) == metrics(reference.history)
        for a, b in zip(jax.tree.leaves(run.state), jax.tree.leaves(reference.state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        plain = driver.train(ToyTask(), dataclasses.replace(cfg, out=tmp_path / "plain"), log=quiet)
        assert metrics(run.history) == metrics(plain.history)
    assert all(r["timing"]["probe_steps"] == 3 for r in run.history)


@pytest.mark.slow
def test_indexed_groups_under_sparse_update(sparse_reference: RunResult, tmp_path: Path) -> None:
    task = ToyTask(sparse_update=True, indexed=True)
    run = driver.train(
        task, config(tmp_path, epochs=3, timing_batches=3, sparse_update=True), log=quiet
    )
    assert metrics(run.history) == metrics(sparse_reference.history)


# ---------------------------------------------------------------------------------------------
# Refusals before training


def test_uneven_batch_over_devices_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--batch-size 8 .*--devices"):
        driver.train(ToyTask(), config(tmp_path / "run", devices=3), log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"epochs": -3}, "--epochs"),
        ({"lr": 0.0}, "--lr"),
        ({"clip": -1.0}, "--clip"),
        ({"devices": 9}, "--devices"),
        ({"devices": 0}, "--devices"),
        ({"timing_batches": -1}, "--timing-batches"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"patience": -1}, "--patience"),
        ({"resume": True, "overwrite": True}, "--resume"),
    ],
)
def test_bad_config_rejected_before_any_write(
    tmp_path: Path, change: dict[str, object], flag: str
) -> None:
    with pytest.raises(ConfigError, match=flag):
        driver.train(ToyTask(), config(tmp_path / "run", **change), log=quiet)
    assert not (tmp_path / "run").exists()


def test_sparse_update_needs_taps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--sparse-update: .*no compact-gradient taps"):
        driver.train(
            ToyTask(k=0, sparse_update=True),
            config(tmp_path / "run", sparse_update=True),
            log=quiet,
        )
    assert not (tmp_path / "run").exists()


def test_resume_command() -> None:
    cmd = command.resume_command(
        "experiments.mnist", ["--k", "20", "--overwrite"], Path("runs/a b")
    )
    assert cmd == "python -m experiments.mnist --k 20 --out 'runs/a b' --resume"
    cmd = command.resume_command("experiments.mnist", ["--out", "r", "--resume"], Path("r"))
    assert cmd == "python -m experiments.mnist --out r --resume"


def test_patience_stops_once_dev_has_not_improved(tmp_path: Path) -> None:
    """A learning rate too small to change any prediction: dev stays at its epoch-1 value,
    so with patience 2 the run ends after epoch 3 of 10, complete, tested at epoch 1."""
    lines: list[str] = []
    result = driver.train(
        ToyTask(), config(tmp_path, epochs=10, lr=1e-12, patience=2), log=lines.append
    )
    assert result.status == "complete"
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert len({r["dev_acc"] for r in result.history}) == 1
    assert result.best["epoch"] == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "complete" and saved["config"]["patience"] == 2
    assert saved["early_stop"] == {"patience": 2, "stopped_after_epoch": 3}
    assert saved["best"]["test_acc"] == result.history[0]["test_acc"]
    assert any("early stop after epoch 3" in line for line in lines)
    # Off by default: every epoch runs and the record has no early_stop entry.
    plain = driver.train(ToyTask(), config(tmp_path / "plain", epochs=4, lr=1e-12), log=quiet)
    assert len(plain.history) == 4
    assert "early_stop" not in json.loads((tmp_path / "plain" / "results.json").read_text())


def test_patience_rule() -> None:
    def history(devs):
        return [{"epoch": i + 1, "dev_acc": d, "test_acc": d} for i, d in enumerate(devs)]

    assert not patience_exhausted(history([90, 91, 91, 91]), 0)  # off
    assert not patience_exhausted([], 3)
    # Best at epoch 2 (a tie later does not count as an improvement).
    assert patience_exhausted(history([90, 91, 91, 91]), 2)
    assert not patience_exhausted(history([90, 91, 91, 91]), 3)
    assert not patience_exhausted(history([90, 91, 90, 92]), 1)
    assert patience_exhausted(history([95, 91, 90, 92, 93, 94]), 5)
