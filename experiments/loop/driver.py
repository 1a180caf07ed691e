"""The epoch driver: :func:`train` (jitted scanned epochs, data parallelism, checkpoints that
survive interruption, a ``results.json`` per run); :mod:`experiments.loop.command` is the
command line around it.

``train_wall_s`` is the real wall time of an epoch's training phase (shuffling and batching
on the host, transfer to the devices, all scanned chunks), excluding XLA compilation, which
is reported separately as ``compile_s``; ``eval_s`` is the dev and test evaluation; the
forward/backward/update estimates come from :mod:`experiments.loop.probes`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.common import ConfigError
from experiments.loop import distributed
from experiments.loop.checkpoints import (
    CHECKPOINT_DIR,
    check_resume,
    checkpoint_manager,
    drop_old_checkpoints,
    restore_checkpoint,
    run_config,
    save_checkpoint,
)
from experiments.loop.config import (
    TrainConfig,
    make_optimizer,
    make_sparse_optimizer,
    resolve_devices,
    validate_config,
)
from experiments.loop.probes import NO_PROBES, bound_by_wall, probe_timings
from experiments.loop.programs import (
    KEY_EVAL,
    KEY_INIT,
    KEY_ORDER,
    KEY_SHUFFLE,
    KEY_STEPS,
    Programs,
    batch_size,
    check_group_batches,
    check_taps,
    chunk_plan,
    epoch_key,
    group_steps,
    init_state,
    put_batches,
    put_groups,
    put_replicated,
    root_subkey,
    state_hooks,
)
from experiments.loop.results import (
    RESULTS_FILE,
    SPLITS,
    best_epoch,
    log_epoch,
    patience_exhausted,
    plot,
    results_payload,
    write_json,
)
from experiments.loop.signals import StopFlag
from experiments.loop.task import Array, Batch, Params, RunResult, Task, TrainState


def _progress_bar(enabled: bool, total: int, epoch: int, epochs: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr
    )


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during a run (everything the epoch loop reads but never changes)."""

    task: Task
    cfg: TrainConfig
    config: Mapping[str, Any]
    mesh: jax.sharding.Mesh
    programs: Programs
    manager: ocp.CheckpointManager
    eval_groups: Mapping[str, Sequence[Batch]]
    eval_key: Array
    stop: StopFlag
    progress: bool
    log: Callable[[str], None]
    metric: str = "acc"
    # The tables of IndexedGroup training groups already on the devices (put_groups).
    tables: dict[int, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)


def train(
    task: Task,
    cfg: TrainConfig,
    *,
    stop: StopFlag | None = None,
    max_epochs_this_run: int | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Trains ``task`` as configured, writing results, plots and checkpoints to ``cfg.out``.

    Args:
      task: the experiment.
      cfg: loop settings.
      stop: checked at every chunk boundary; when set, the partial epoch is dropped, the last
        completed epoch is checkpointed and the run returns with status ``"interrupted"``.
      max_epochs_this_run: stop (status ``"stopped"``, checkpoint saved) after this many
        epochs of this call; for tests and time-limited jobs.
      log: where progress lines go.

    Returns:
      The per-epoch history and the best epoch.

    Raises:
      ConfigError: bad settings, batches that do not split over the devices, or a resume
        whose checkpoint was made with different settings.
    """
    validate_config(cfg)
    log = distributed.main_process_only(log)
    # Every check comes before the first write: a refused run leaves the folder untouched.
    check_resume(cfg, task)
    host_eval = {split: task.eval_groups(split) for split in SPLITS}
    n_devices = _choose_devices(task, cfg, host_eval, log)
    for groups in host_eval.values():
        check_group_batches(groups, n_devices)
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    hooks = state_hooks(task)
    if cfg.sparse_update or cfg.compact_gradients:
        if hooks is not None:
            flag = "--sparse-update" if cfg.sparse_update else "--kernel-grad compact"
            raise ConfigError(
                f"{flag} does not combine with the model state of {task.name!r} "
                f"(collections {', '.join(hooks.collections)})"
            )
        check_taps(task, root_subkey(cfg.seed, KEY_INIT))
        tx = make_sparse_optimizer(
            cfg.optimizer, cfg.learning_rate, cfg.clip, lazy=cfg.sparse_update
        )
    else:
        tx = make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.clip)
    config = run_config(task, cfg, n_devices)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = cfg.out / CHECKPOINT_DIR
    if cfg.overwrite and ckpt_dir.exists() and distributed.is_main_process():
        shutil.rmtree(ckpt_dir)
    distributed.barrier("experiments.loop: run folder ready")

    with jax.set_mesh(mesh):
        eval_groups = {
            split: [put_batches(g, mesh) for g in groups] for split, groups in host_eval.items()
        }
        # One compiled program: run eagerly, a Flax init dispatches (and compiles) op by op.
        init = jax.jit(
            lambda key: init_state(task, tx, key), out_shardings=NamedSharding(mesh, P())
        )
        state = init(root_subkey(cfg.seed, KEY_INIT))
        manager = checkpoint_manager(ckpt_dir)
        run = _Run(
            task=task,
            cfg=cfg,
            config=config,
            mesh=mesh,
            programs=Programs(task.loss_fn, tx, hooks, getattr(task, "compiler_options", None)),
            manager=manager,
            eval_groups=eval_groups,
            eval_key=put_replicated(root_subkey(cfg.seed, KEY_EVAL), mesh),
            stop=stop or StopFlag(),
            progress=distributed.is_main_process()
            and (sys.stderr.isatty() if cfg.progress is None else cfg.progress),
            log=log,
            metric=getattr(task, "metric", "acc"),
        )
        try:
            history: list[dict[str, Any]] = []
            if cfg.resume:
                state, history = _resume(run, state)
            return _epochs(run, state, history, max_epochs_this_run)
        finally:
            manager.close()


def _write_results(run: _Run, history: Sequence[Mapping[str, Any]], status: str) -> None:
    """``results.json``: config, per-epoch metrics, best epoch and the platform (written by
    process 0 alone)."""
    if not distributed.is_main_process():
        return
    payload = results_payload(run.config, history, status, run.mesh, run.metric)
    write_json(run.cfg.out / RESULTS_FILE, payload)


def _choose_devices(
    task: Task,
    cfg: TrainConfig,
    host_eval: Mapping[str, Sequence[Batch]],
    log: Callable[[str], None],
) -> int:
    """``cfg.devices``, or by default the most local devices that divide every batch (the
    evaluation batches and those of the first training epoch), said in the log when that is
    fewer than all of them."""
    if cfg.devices is not None or jax.local_device_count() == 1:
        return resolve_devices(cfg.devices)
    first = task.train_groups(1, jax.random.fold_in(epoch_key(cfg.seed, 1), KEY_SHUFFLE))
    sizes = {batch_size(g) for groups in (*host_eval.values(), first) for g in groups}
    n_devices = resolve_devices(None, sorted(sizes))
    if n_devices < jax.local_device_count():
        log(
            f"using {n_devices} of {jax.local_device_count()} devices: the most that divide "
            f"the batch sizes {sorted(sizes)} (--devices chooses)"
        )
    return n_devices


def _resume(run: _Run, template: TrainState) -> tuple[TrainState, list[dict[str, Any]]]:
    """The last checkpoint's state and history (:func:`check_resume` has compared the
    settings before, so a checkpoint of another layout, e.g. ``sparse_update``'s optimizer
    state, is never read into this run's template)."""
    state, meta = restore_checkpoint(run.manager, template)
    run.log(f"resuming {run.cfg.out} after epoch {meta['epoch']}")
    return state, list(meta["history"])


def _epochs(
    run: _Run,
    state: TrainState,
    history: list[dict[str, Any]],
    max_epochs_this_run: int | None,
) -> RunResult:
    """Runs the remaining epochs, checkpointing as configured; saves a last checkpoint and
    the results however the loop ends."""
    cfg = run.cfg
    first = len(history) + 1
    saved_epoch = len(history)
    status = "complete"
    for epoch in range(first, cfg.epochs + 1):
        if patience_exhausted(history, cfg.patience, run.metric):
            best = best_epoch(history, run.metric)["epoch"]
            run.log(
                f"early stop after epoch {epoch - 1}: dev {run.metric} has not improved since "
                f"epoch {best} (--patience {cfg.patience})"
            )
            break
        if run.stop.requested:
            status = "interrupted"
            break
        if max_epochs_this_run is not None and epoch - first >= max_epochs_this_run:
            status = "stopped"
            break
        outcome = _train_epoch(run, state, epoch)
        if outcome is None:
            run.log(f"epoch {epoch} abandoned part-way; keeping epoch {epoch - 1}")
            status = "interrupted"
            break
        state, record = outcome
        history.append(record)
        log_epoch(record, cfg.epochs, run.log, run.metric)
        new_best = best_epoch(history, run.metric)["epoch"] == epoch
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or new_best:
            _save(run, epoch, state, history)
            saved_epoch = epoch
        _write_results(run, history, "running")
    else:
        if run.stop.requested and len(history) < cfg.epochs:
            status = "interrupted"
    if history and saved_epoch != len(history):
        _save(run, len(history), state, history)
    _write_results(run, history, status)
    if distributed.is_main_process():
        plot(history, cfg.out, run.metric)
    best = best_epoch(history, run.metric)
    return RunResult(history, best, status, run.stop.signum, cfg.out, state, run.metric)


def _save(run: _Run, epoch: int, state: TrainState, history: Sequence[Mapping[str, Any]]) -> None:
    # A task with a schedule may resize its model: the shapes let --resume rebuild it.
    resizes = getattr(run.task, "schedule", None) is not None
    save_checkpoint(
        run.manager, epoch, state, history, run.config, run.cfg.seed, with_shapes=resizes
    )
    drop_old_checkpoints(
        run.manager, run.cfg.keep_checkpoints, best_epoch(history, run.metric)["epoch"]
    )


def _scheduler(run: _Run, epoch: int) -> Callable[..., Any] | None:
    """The task's ``schedule`` hook for ``epoch`` (see :class:`Task`), returning a state
    replicated over the mesh again, or None for a task without one."""
    schedule = getattr(run.task, "schedule", None)
    if schedule is None:
        return None

    def hook(state: TrainState, done: int, chunks: int) -> tuple[TrainState, list[Any]]:
        state, events = schedule(state, epoch, done, chunks, run.log)
        return put_replicated(state, run.mesh), list(events)

    return hook


def _train_epoch(
    run: _Run, state: TrainState, epoch: int
) -> tuple[TrainState, dict[str, Any]] | None:
    """Trains, evaluates and times one epoch; None when stopped part-way."""
    key = epoch_key(run.cfg.seed, epoch)
    wall_start = time.perf_counter()
    host_groups = run.task.train_groups(epoch, jax.random.fold_in(key, KEY_SHUFFLE))
    steps = [group_steps(g) for g in host_groups]
    if sum(steps) == 0:
        raise ConfigError("the task produced no training minibatches (see --limit-train)")
    check_group_batches(host_groups, run.n_devices)
    groups = put_groups(host_groups, run.mesh, run.tables)
    steps_key = jax.random.fold_in(key, KEY_STEPS)
    step_keys = [
        put_replicated(jax.random.fold_in(steps_key, g), run.mesh) for g in range(len(groups))
    ]
    plan = chunk_plan(steps, run.cfg.chunk_steps, jax.random.fold_in(key, KEY_ORDER))
    bar = _progress_bar(run.progress, sum(steps), epoch, run.cfg.epochs)
    schedule = _scheduler(run, epoch)
    events: list[Any] = []
    try:
        state, loss_sum, count, compile_s, done = _run_chunks(
            run.programs, state, groups, plan, step_keys, run.stop, bar, schedule, events
        )
    finally:
        if bar is not None:
            bar.close()
    if not done:
        return None
    train_wall = time.perf_counter() - wall_start - compile_s

    eval_start = time.perf_counter()
    metrics, eval_compile = {}, 0.0
    for split in SPLITS:
        metrics[split], seconds = _evaluate_split(
            run.programs, state.params, run.eval_groups[split], run.eval_key, run.metric
        )
        eval_compile += seconds
    eval_wall = time.perf_counter() - eval_start - eval_compile
    # The selection metric first, then the losses, then the task's extra metrics.
    extra = [n for n in metrics["dev"] if n not in (run.metric, "loss")]
    names = [run.metric, "loss", *extra]
    probes, probe_compile = dict(NO_PROBES), 0.0
    probe_start = time.perf_counter()
    if run.cfg.timing_batches > 0:
        probes, probe_compile = probe_timings(
            run.programs, state, groups, step_keys, run.cfg.timing_batches
        )
    probe_wall = time.perf_counter() - probe_start - probe_compile
    probes = bound_by_wall(probes, train_wall)
    record = {
        "epoch": epoch,
        "loss": loss_sum / max(count, 1.0),
        **{f"{split}_{name}": metrics[split][name] for name in names for split in SPLITS},
        "steps": int(sum(steps)),
        "timing": {
            **probes,
            "train_wall_s": float(train_wall),
            "eval_s": float(eval_wall),
            "probe_s": float(probe_wall),
            "compile_s": float(compile_s + eval_compile + probe_compile),
        },
    }
    if schedule is not None:
        record["events"] = events
    return state, record


def _run_chunks(
    programs: Programs,
    state: TrainState,
    groups: Sequence[Batch],
    plan: Sequence[tuple[int, int, int]],
    step_keys: Sequence[Array],
    stop: StopFlag,
    bar: Any,
    schedule: Callable[..., Any] | None = None,
    events: list[Any] | None = None,
) -> tuple[TrainState, float, float, float, bool]:
    """Runs the planned chunks; returns state, loss sum, count, compile seconds, and whether
    every chunk ran (False: stopped early).

    The chunks donate their input state; the first gets a copy, so that ``state`` stays
    valid for an epoch that is abandoned part-way. ``schedule(state, done, chunks)``, when
    given, runs before the first chunk and after every chunk, and its events are appended
    to ``events``.
    """
    loss_sum, count, compile_s = 0.0, 0.0, 0.0
    if plan and not stop.requested:
        state = jax.tree.map(lambda a: a.copy(), state)
        if schedule is not None:
            state, new_events = schedule(state, 0, len(plan))
            events.extend(new_events)
    for done, (g, start, length) in enumerate(plan, start=1):
        if stop.requested:
            return state, loss_sum, count, compile_s, False
        args = (state, groups[g], step_keys[g], np.int32(start), np.int32(length))
        fn, seconds = programs.compiled("train_chunk", *args)
        compile_s += seconds
        state, chunk_loss, chunk_count = fn(*args)
        # float() waits for the chunk, so the bar (and a stop request) act on finished work.
        chunk_loss, chunk_count = float(chunk_loss), float(chunk_count)
        loss_sum += chunk_loss
        count += chunk_count
        if bar is not None:
            bar.update(length)
            bar.set_postfix(loss=f"{chunk_loss / max(chunk_count, 1.0):.4f}")
        if schedule is not None:
            state, new_events = schedule(state, done, len(plan))
            events.extend(new_events)
    return state, loss_sum, count, compile_s, True


def _evaluate_split(
    programs: Programs, params: Params, groups: Sequence[Batch], key: Array, metric: str
) -> tuple[dict[str, float], float]:
    """``{metric: 100 correct / count, "loss": mean loss}`` over the groups of a split, with
    ``100 correct_<name> / count`` under ``<name>`` for every extra count of the task."""
    totals: dict[str, float] = {}
    compile_s = 0.0
    for group in groups:
        fn, seconds = programs.compiled("evaluate", params, group, key)
        compile_s += seconds
        for name, value in jax.device_get(fn(params, group, key)).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    denom = max(totals["count"], 1.0)
    metrics = {metric: 100.0 * totals["correct"] / denom, "loss": totals["loss"] / denom}
    for name in sorted(totals):
        if name.startswith("correct_"):
            metrics[name.removeprefix("correct_")] = 100.0 * totals[name] / denom
    return metrics, compile_s
