"""Tests of experiments.loop.checkpoints: the run folder checks and a refused resume."""

import dataclasses
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.common import ConfigError
from experiments.loop import checkpoints, driver
from experiments.loop.driver import train
from tests.experiments.loop.toy import ToyTask, config, file_hashes, quiet


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        checkpoints.check_resume(cfg, ToyTask())
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train(ToyTask(), cfg, log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_refused_runs_leave_every_file_untouched(tmp_path: Path) -> None:
    """A refused resume (other settings, of the loop or of the task) or a fresh run over
    checkpoints writes nothing: every file and folder of the run stays byte-identical."""
    first = train(ToyTask(), config(tmp_path, epochs=2), max_epochs_this_run=1, log=quiet)
    assert first.status == "stopped"
    before = file_hashes(tmp_path)
    assert {"results.json", "accuracy.png", "checkpoints/1/meta/metadata"} <= set(before)
    refusals = [
        (ToyTask(), config(tmp_path, epochs=2), r"--resume.*--overwrite.*--out"),
        (ToyTask(), config(tmp_path, epochs=2, seed=5, resume=True), r"seed \(0 there, 5 now\)"),
        (ToyTask(k=2), config(tmp_path, epochs=2, resume=True), r"k \(4 there, 2 now\)"),
        (
            ToyTask(),
            config(tmp_path, epochs=2, resume=True, optimizer="sgd"),
            r"optimizer \('adam' there, 'sgd' now\)",
        ),
    ]
    for task, cfg, message in refusals:
        with pytest.raises(ConfigError, match=message) as from_check:
            checkpoints.check_resume(cfg, task)
        with pytest.raises(ConfigError, match=message) as from_train:
            train(task, cfg, log=quiet)
        assert str(from_check.value) == str(from_train.value)
        assert file_hashes(tmp_path) == before, message
    # What may change does not stop a resume: more epochs, another device count.
    checkpoints.check_resume(config(tmp_path, epochs=5, devices=2, resume=True), ToyTask())
    assert file_hashes(tmp_path) == before
    fresh = train(ToyTask(), config(tmp_path, epochs=1, overwrite=True), log=quiet)
    assert fresh.status == "complete"


@pytest.mark.slow
def test_restore_params_reads_the_saved_epoch(tmp_path: Path) -> None:
    run = train(ToyTask(), config(tmp_path, epochs=2), log=quiet)
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run.state.params
    )
    params, epoch = checkpoints.restore_params(tmp_path, template)
    assert epoch == 2
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(run.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ConfigError, match="no checkpoint"):
        checkpoints.restore_params(tmp_path / "missing", template)


@pytest.mark.slow
def test_the_best_dev_epochs_checkpoint_outlives_the_kept_latest(
    tmp_path: Path, monkeypatch
) -> None:
    """With one checkpoint kept and the best dev score at epoch 2 of 4, epochs 2 and 4 stay
    on disk, and epoch 2's holds the parameters that a run stopped after two epochs has."""
    scripted_dev = {1: 50.0, 2: 90.0, 3: 60.0, 4: 70.0}
    train_epoch = driver._train_epoch

    def with_scripted_dev(run, state, epoch):
        state, record = train_epoch(run, state, epoch)
        return state, {**record, "dev_acc": scripted_dev[epoch]}

    monkeypatch.setattr(driver, "_train_epoch", with_scripted_dev)
    run = train(ToyTask(), config(tmp_path / "run", epochs=4, keep_checkpoints=1), log=quiet)
    assert run.best["epoch"] == 2
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == [2, 4]
    short = train(ToyTask(), config(tmp_path / "short", epochs=4), max_epochs_this_run=2, log=quiet)
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), run.state.params
    )
    params, epoch = checkpoints.restore_params(tmp_path / "run", template, epoch=2)
    assert epoch == 2
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(short.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_task_setting_newer_than_the_run_counts_as_its_default() -> None:
    @dataclasses.dataclass(frozen=True)
    class Settings:
        hidden: int = 500
        kernel_layout: str = "in_out"
        channels: tuple[int, ...] = (32, 64)

    task = types.SimpleNamespace(settings=Settings())
    defaults = checkpoints.task_setting_defaults(task)
    assert defaults == {"hidden": 500, "kernel_layout": "in_out", "channels": [32, 64]}
    saved = {"hidden": 500}  # written before kernel_layout and channels existed
    now = {"hidden": 500, "kernel_layout": "in_out", "channels": [32, 64]}
    assert checkpoints.config_changes(saved, now, defaults) == []
    moved = {**now, "kernel_layout": "out_in"}
    assert checkpoints.config_changes(saved, moved, defaults) == ["kernel_layout"]
    # Without the task's defaults a missing setting differs from any value.
    assert checkpoints.config_changes(saved, now) == ["channels", "kernel_layout"]
    assert checkpoints.task_setting_defaults(types.SimpleNamespace()) == {}


def test_config_changes_ignores_resumable_settings() -> None:
    saved = {"seed": 0, "epochs": 3, "num_devices": 8, "k": 4}
    assert checkpoints.config_changes(saved, {**saved, "epochs": 9, "num_devices": 2}) == []
    assert checkpoints.config_changes(saved, {**saved, "seed": 1, "k": 2}) == ["k", "seed"]
    # A loop setting missing from an older checkpoint counts as its default.
    assert checkpoints.config_changes({}, {"sparse_update": False}) == []
    assert checkpoints.config_changes({}, {"sparse_update": True}) == ["sparse_update"]
