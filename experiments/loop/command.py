"""The command line around :func:`~experiments.loop.driver.train`: :func:`run_cli` reads the
task's data, answers a run asked for again (:func:`existing_run`), trains under the signal
handlers and prints the summary, or the command that resumes an interrupted run
(:func:`resume_command`).
"""

from __future__ import annotations

import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.loop import distributed
from experiments.loop.checkpoints import CHECKPOINT_DIR, check_resume, saved_run
from experiments.loop.config import TrainConfig
from experiments.loop.driver import train
from experiments.loop.results import RESULTS_FILE, patience_exhausted, summary_line
from experiments.loop.signals import handle_signals
from experiments.loop.task import Task

__all__ = ["existing_run", "resume_command", "run_cli"]


def resume_command(prog: str, argv: Sequence[str], out: Path) -> str:
    """The command that resumes a run started with ``argv``."""
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return shlex.join(["python", "-m", prog, *args, "--resume"])


def _metric(task: Task) -> str:
    return getattr(task, "metric", "acc")


def existing_run(task: Task, cfg: TrainConfig, prog: str, argv: Sequence[str]) -> int | None:
    """What a run asked for without ``--resume`` or ``--overwrite`` does when ``cfg.out``
    already holds checkpoints: the same run, finished (all ``cfg.epochs``, or stopped early by
    ``--patience``), says where its results are (exit code 0); unfinished, how to resume it;
    with other settings, which ones (exit code 2, nothing written). None: nothing saved
    there, or a flag says what to do with it.
    """
    if cfg.resume or cfg.overwrite:
        return None
    saved = saved_run(cfg, task)
    if saved is None:
        return None
    history, changed = saved
    done = len(history)
    say = distributed.main_process_only(lambda text: print(text, file=sys.stderr))
    tell = distributed.main_process_only(print)
    if changed:
        say(
            f"{cfg.out} holds a run with other settings: {', '.join(changed)}. "
            "Pass --overwrite to replace it, or another --out."
        )
        return 2
    results = cfg.out / RESULTS_FILE
    if done >= cfg.epochs or patience_exhausted(history, cfg.patience, _metric(task)):
        tell(
            f"{cfg.out} holds this run already, finished after {done} "
            f"epoch{'s' if done != 1 else ''}: results in "
            f"{results}. Pass --overwrite to train it again."
        )
        return 0
    say(
        f"{cfg.out} holds this run, stopped after epoch {done} of {cfg.epochs}. Resume it "
        f"with:\n  {resume_command(prog, argv, cfg.out)}\nor pass --overwrite to start afresh."
    )
    return 2


def run_cli(
    task_factory: Callable[[], Task],
    cfg: TrainConfig,
    prog: str,
    argv: Sequence[str],
    prepare: Callable[[Task], None] | None = None,
    finish: Callable[[Task], None] | None = None,
) -> int:
    """Trains under SIGINT/SIGTERM handlers and prints the summary; returns the exit code.

    ``task_factory`` reads the data first, so that a data error comes before anything about
    the run folder; then :func:`existing_run` answers a run asked for again, every check of
    the run folder is made, and ``prepare(task)``, when given, may write files of the task's
    own into ``cfg.out`` before training. ``finish(task)`` runs after training that was not
    interrupted (not for a finished run asked for again). Errors (:class:`ConfigError` and
    the data reader's) propagate.
    """
    task = task_factory()
    code = existing_run(task, cfg, prog, argv)
    if code is not None:
        return code
    check_resume(cfg, task)  # writes nothing: a refused run leaves the folder as it was
    if prepare is not None:
        prepare(task)
    with handle_signals(distributed.stop_flag()) as flag:
        result = train(task, cfg, stop=flag)
    if distributed.is_main_process():
        print(summary_line(result))
        print(f"results: {result.out / RESULTS_FILE}")
    if result.status != "interrupted":
        if finish is not None:
            finish(task)
        return 0
    signum = signal.Signals(result.signum or signal.SIGINT)
    if not distributed.is_main_process():
        return 128 + int(signum)
    if result.history:
        command = resume_command(prog, argv, result.out)
        print(
            f"interrupted by {signum.name} after epoch {len(result.history)}; checkpoint in "
            f"{result.out / CHECKPOINT_DIR}. Resume with:\n  {command}",
            file=sys.stderr,
        )
    else:
        print(
            f"interrupted by {signum.name} before the first epoch ended: nothing saved; "
            "run the same command again to start afresh.",
            file=sys.stderr,
        )
    return 128 + int(signum)
