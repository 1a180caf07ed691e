"""Checkpoints, and the comparison of settings that guards ``--resume``.

``<out>/checkpoints/<epoch>/`` (orbax) holds two items: ``state`` = ``{"params",
"opt_state"}`` and ``meta`` (JSON) = ``{"epoch", "history", "config", "rng"}``. A checkpoint
is written every ``checkpoint_every`` epochs, at every new best dev epoch and after the last
epoch; the last ``keep_checkpoints`` and the best dev epoch's are kept, so that prediction
can always read the model that model selection chose. ``--resume`` refuses
a checkpoint made with other settings (except those in
:data:`experiments.loop.config.RESUMABLE_CHANGES`); :func:`check_resume` does that check,
and every other check of the run folder, without writing anything, so a refused resume
leaves every file of the run as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.common import ConfigError
from experiments.loop.config import RESUMABLE_CHANGES, TrainConfig
from experiments.loop.task import Params, TrainState

CHECKPOINT_DIR = "checkpoints"


def latest_checkpoint(directory: Path) -> int | None:
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """A manager that keeps every checkpoint: :func:`drop_old_checkpoints` chooses."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        directory.absolute(), options=options, item_names=("state", "meta")
    )


def drop_old_checkpoints(manager: ocp.CheckpointManager, keep: int, best: int | None) -> None:
    """Deletes every checkpoint but the latest ``keep`` and the best dev epoch ``best``."""
    steps = sorted(manager.all_steps())
    kept = set(steps[-keep:]) | {best}
    for step in steps:
        if step not in kept:
            manager.delete(step)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    epoch: int,
    state: TrainState,
    history: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    seed: int,
    *,
    with_shapes: bool = False,
) -> None:
    """Saves ``state`` as epoch ``epoch``, with the history, config and root key as JSON.

    The root key is all the RNG state there is: every key derives from it and the epoch.
    ``with_shapes`` also stores every array's shape (meta ``"shapes"``, in leaf order), for a
    model that changes its shapes while training (meSimp's shrinking layers): the restore
    then rebuilds its template at the saved shapes.
    """
    tree = {"params": state.params, "opt_state": state.opt_state}
    root = np.asarray(jax.random.key_data(jax.random.key(seed)))
    meta = {
        "epoch": epoch,
        "history": list(history),
        "config": dict(config),
        "rng": root.ravel().tolist(),
    }
    if with_shapes:
        meta["shapes"] = [list(np.shape(leaf)) for leaf in jax.tree.leaves(tree)]
    manager.save(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def restore_checkpoint(
    manager: ocp.CheckpointManager, template: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    epoch = manager.latest_step()
    tree = {"params": template.params, "opt_state": template.opt_state}
    saved = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    if "shapes" in saved["meta"]:
        tree = _with_shapes(tree, saved["meta"]["shapes"])
    restored = manager.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()),
    )
    state = restored["state"]
    return TrainState(state["params"], state["opt_state"], template.taps), restored["meta"]


def _with_shapes(tree: Any, shapes: Sequence[Sequence[int]]) -> Any:
    """``tree`` with every leaf whose saved shape differs replaced by an abstract array of
    that shape (same dtype and sharding), for orbax to restore into."""
    leaves, treedef = jax.tree.flatten(tree)
    if len(leaves) != len(shapes):
        raise ConfigError(
            f"--resume: the checkpoint holds {len(shapes)} arrays, the model {len(leaves)}"
        )
    abstract = [
        leaf
        if tuple(shape) == np.shape(leaf)
        else jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=leaf.sharding)
        for leaf, shape in zip(leaves, shapes, strict=True)
    ]
    return jax.tree.unflatten(treedef, abstract)


def restore_params(out: Path, template: Params, epoch: int | None = None) -> tuple[Params, int]:
    """The parameters saved in the run folder ``out``, without the optimizer state (for
    inference: the optimizer need not be rebuilt).

    Args:
      out: a run folder (``--out`` of a training run).
      template: the parameter pytree, as arrays or ``jax.ShapeDtypeStruct`` with shardings;
        the restored arrays take their shapes, dtypes and shardings.
      epoch: the checkpoint to read; None, or an epoch whose checkpoint is no longer kept,
        reads the latest.

    Returns:
      ``(params, epoch)``.

    Raises:
      ConfigError: ``out`` holds no checkpoint.
    """
    directory = (out / CHECKPOINT_DIR).absolute()
    latest = latest_checkpoint(directory)
    if latest is None:
        raise ConfigError(f"--out {out}: no checkpoint in {directory}")
    if epoch is None or not (directory / str(epoch)).is_dir():
        epoch = latest
    item = {"params": template}
    restore = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    with ocp.CheckpointManager(directory, item_names=("state", "meta")) as manager:
        restored = manager.restore(epoch, args=ocp.args.Composite(state=restore))
    return restored["state"]["params"], epoch


def config_changes(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    task_defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Differing settings; a setting missing from ``saved`` (a checkpoint written before the
    setting existed) counts as its default: the loop's, or the task's (``task_defaults``, see
    :func:`task_setting_defaults`)."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    defaults = {**(task_defaults or {}), **_field_defaults(TrainConfig)}
    return sorted(k for k in keys if saved.get(k, defaults.get(k)) != current.get(k))


def _field_defaults(cls: Any) -> dict[str, Any]:
    """A dataclass's field defaults as they read back from JSON (tuples as lists, ...)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            try:
                out[f.name] = json.loads(json.dumps(f.default))
            except TypeError:  # not JSON: no default to compare with
                pass
    return out


def task_setting_defaults(task: Any) -> dict[str, Any]:
    """The defaults of ``task.settings`` (a dataclass, as the tasks here have), so that a run
    saved before a task setting existed still resumes under that setting's default value."""
    settings = getattr(task, "settings", None)
    if not dataclasses.is_dataclass(settings):
        return {}
    return _field_defaults(type(settings))


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuses to start over existing checkpoints (or to resume without any).

    Raises:
      ConfigError: naming ``--resume``, ``--overwrite`` and ``--out``.
    """
    has_checkpoints = latest_checkpoint(cfg.out / CHECKPOINT_DIR) is not None
    if cfg.resume and not has_checkpoints:
        raise ConfigError(f"--resume: no checkpoint in {cfg.out / CHECKPOINT_DIR} (check --out)")
    if not cfg.resume and not cfg.overwrite and has_checkpoints:
        raise ConfigError(
            f"{cfg.out} already holds checkpoints: pass --resume to continue that run, "
            "--overwrite to start afresh, or another --out"
        )


def run_config(task: Any, cfg: TrainConfig, n_devices: int) -> dict[str, Any]:
    """The settings stored with a run and compared by ``--resume``: the task's name, the
    loop's settings, the device count and the task's hyperparameters.

    Through JSON once, so that it compares equal to the copy stored in a checkpoint.
    """
    return json.loads(
        json.dumps({"task": task.name, **cfg.as_dict(), "num_devices": n_devices, **task.config()})
    )


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences orbax's warnings that a read-only manager is read-only (said at every read)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _saved_meta(directory: Path) -> dict[str, Any]:
    """The ``meta`` item of the latest checkpoint in ``directory``, read without writing."""
    with _quiet_absl():
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        with ocp.CheckpointManager(
            directory.absolute(), options=options, item_names=("state", "meta")
        ) as manager:
            restored = manager.restore(
                manager.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
    return restored["meta"]


def saved_config(out: Path) -> dict[str, Any] | None:
    """The settings saved with the latest checkpoint in the run folder ``out`` (the run
    config, task settings included), or None when it holds none. Writes nothing; a task
    resolving an ``auto`` flag on ``--resume`` reads what the run was started with."""
    directory = out / CHECKPOINT_DIR
    if latest_checkpoint(directory) is None:
        return None
    return dict(_saved_meta(directory)["config"])


def saved_run(cfg: TrainConfig, task: Any) -> tuple[list[dict[str, Any]], list[str]] | None:
    """The run already in ``cfg.out``: the epoch records its latest checkpoint holds and the
    settings that differ from ``task`` and ``cfg`` (as :func:`check_resume` lists them), or
    None when the folder holds no checkpoint. Writes nothing."""
    directory = cfg.out / CHECKPOINT_DIR
    if latest_checkpoint(directory) is None:
        return None
    meta = _saved_meta(directory)
    current = run_config(task, cfg, 0)  # the device count may change (RESUMABLE_CHANGES)
    changed = config_changes(meta["config"], current, task_setting_defaults(task))
    return list(meta["history"]), [
        f"{k} ({meta['config'].get(k)!r} there, {current.get(k)!r} now)" for k in changed
    ]


def check_resume(cfg: TrainConfig, task: Any) -> None:
    """Every check :func:`~experiments.loop.train` makes of the run folder before it writes
    anything: ``--resume`` needs a checkpoint made with the same settings, a fresh run needs a
    folder without checkpoints (or ``--overwrite``). Writes nothing, so a task that writes
    files of its own into ``cfg.out`` can call it first.

    Raises:
      ConfigError: the one a refused run gives, naming the differing settings.
    """
    check_out_dir(cfg)
    if not cfg.resume:
        return
    _, changed = saved_run(cfg, task)
    if changed:
        raise ConfigError(
            f"--resume: {cfg.out} was trained with other settings for " + ", ".join(changed)
        )
