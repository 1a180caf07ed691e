"""One training loop for every experiment: jitted scanned epochs, data parallelism, honest
timings, checkpoints that survive interruption, and a ``results.json`` per run.

Modules: :mod:`~experiments.loop.task` (the :class:`Task` interface),
:mod:`~experiments.loop.config` (settings, flags, optimizers, devices),
:mod:`~experiments.loop.signals` (interruption), :mod:`~experiments.loop.checkpoints`
(orbax checkpoints, ``--resume`` checks), :mod:`~experiments.loop.results` (``results.json``,
plots, log lines), :mod:`~experiments.loop.probes` (forward/backward/update timing),
:mod:`~experiments.loop.programs` (the jitted programs), :mod:`~experiments.loop.indexed`
(an :class:`IndexedGroup`'s minibatches), :mod:`~experiments.loop.distributed`
(several processes with ``jax.distributed``), :mod:`~experiments.loop.driver` (:func:`train`)
and :mod:`~experiments.loop.command` (:func:`run_cli`, the command line around it).
"""

from experiments.common import CLI_MODES, ConfigError, add_mode_argument, require
from experiments.loop.checkpoints import check_resume, restore_params, saved_config
from experiments.loop.command import run_cli
from experiments.loop.config import (
    DEFAULT_LR,
    OPTIMIZERS,
    TrainConfig,
    add_train_arguments,
    check_divisible,
    make_optimizer,
    make_sparse_optimizer,
    resolve_devices,
    resolve_eval_batch,
    train_config_from_args,
)
from experiments.loop.distributed import is_main_process, setup_processes
from experiments.loop.driver import train
from experiments.loop.results import RESULTS_FILE, best_epoch
from experiments.loop.signals import StopFlag, handle_signals
from experiments.loop.task import IndexedGroup, RunResult, Task, TrainState

__all__ = [
    "CLI_MODES",
    "DEFAULT_LR",
    "OPTIMIZERS",
    "RESULTS_FILE",
    "ConfigError",
    "IndexedGroup",
    "RunResult",
    "StopFlag",
    "Task",
    "TrainConfig",
    "TrainState",
    "add_mode_argument",
    "add_train_arguments",
    "best_epoch",
    "check_divisible",
    "check_resume",
    "handle_signals",
    "is_main_process",
    "make_optimizer",
    "make_sparse_optimizer",
    "require",
    "resolve_devices",
    "resolve_eval_batch",
    "restore_params",
    "run_cli",
    "saved_config",
    "setup_processes",
    "train",
    "train_config_from_args",
]
