"""Runners: how the report starts one run (``runner(spec, run_dir, mode) -> exit code``).

- :func:`subprocess_runner`: ``python -m experiments.<task> ...`` as a fresh interpreter,
  the runner of the full grids.
- :func:`forked_runner`: the same command line in a process forked from a server that has
  imported the task modules once (``multiprocessing``'s forkserver). It saves the interpreter's
  start-up and imports, about 5 s a run on two cores, which is most of a ``--quick`` run. Each
  run is still its own process; only imports are shared, never a JAX backend.

Both write the run's output to ``DIR/train.log``, give the run JAX's on-disk compilation cache
under the cache folder, and let Ctrl-C reach the run, waiting for it to save its checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from experiments.report.cache import BENCH_FILE, LOG_FILE, Runner, repo_root
from experiments.report.grids import TASKS, RunSpec

#: How long an interrupted run may take to save its checkpoint before it is killed.
SAVE_GRACE_S = 120


def command_args(spec: RunSpec, directory: Path, mode: str) -> list[str]:
    """The task's arguments that run ``spec`` into ``directory`` (``mode`` as in
    :data:`~experiments.report.cache.Runner`)."""
    args = list(spec.command()[3:])
    if spec.task == "bench":
        return [*args, "--out", str(directory / BENCH_FILE)]
    extra = {"fresh": [], "resume": ["--resume"], "restart": ["--overwrite"]}[mode]
    return [*args, "--out", str(directory), *extra]


def fresh_command(task: str, args: Sequence[str]) -> list[str]:
    """``python -m experiments.<task> ARGS`` with this interpreter."""
    return [sys.executable, "-m", f"experiments.{task}", *args]


def subprocess_command(spec: RunSpec, directory: Path, mode: str) -> list[str]:
    """The full command line of a run, with this interpreter."""
    return fresh_command(spec.task, command_args(spec, directory, mode))


def child_environment(cache: Path, min_compile_s: float = 1.0) -> dict[str, str]:
    """The environment of a run: JAX's on-disk compilation cache under ``cache`` (seeds of
    one setting compile the same programs), unless one is configured already."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str((cache / "jax-compilation-cache").absolute()))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", f"{min_compile_s:g}")
    return env


def _wait(join: Callable[[float | None], None], kill: Callable[[], None]) -> None:
    """Waits for a run; on Ctrl-C gives it :data:`SAVE_GRACE_S` to save, then re-raises."""
    try:
        join(None)
    except KeyboardInterrupt:
        try:
            join(SAVE_GRACE_S)
        except KeyboardInterrupt:
            pass
        kill()
        raise


def _log_command(log_path: Path, command: Sequence[str]) -> None:
    """Echoes the command into the run's log. Callers name the interpreter ``python``, not
    ``sys.executable``: the log is committed with the run's record, which must hold no path
    of the machine that ran it."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")


def run_fresh(task: str, args: Sequence[str], output: Path, env: Mapping[str, str]) -> int:
    """``python -m experiments.<task> ARGS`` in a fresh interpreter, its output appended to
    ``output``; returns its exit code."""
    with open(output, "a") as out:
        proc = subprocess.Popen(
            fresh_command(task, args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=repo_root(),
        )

        def join(timeout):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

        def kill():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        _wait(join, kill)
        return proc.returncode


def subprocess_runner(cache: Path) -> Runner:
    """A fresh interpreter per run; its output goes to ``DIR/train.log``."""
    env = child_environment(cache)

    def run(spec: RunSpec, directory: Path, mode: str) -> int:
        args = command_args(spec, directory, mode)
        _log_command(directory / LOG_FILE, [f"python -m experiments.{spec.task}", *args])
        return run_fresh(spec.task, args, directory / LOG_FILE, env)

    return run


def _forked_main(task: str, args: list[str], output: str, env: Mapping[str, str]) -> None:
    """Runs ``python -m experiments.<task> ARGS`` inside a forked process, its stdout and
    stderr (Python's and the C libraries') sent to ``output``."""
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # The server's environment is that of the first report in this process; use this one's.
    os.environ.clear()
    os.environ.update(env)
    os.chdir(repo_root())
    import jax

    # JAX read its JAX_* variables when the server imported it, so set these two again.
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    sys.argv = [f"python -m experiments.{task}", *args]
    # Run it as ``python -m`` would: afresh as __main__ (its imports stay loaded).
    sys.modules.pop(f"experiments.{task}.__main__", None)
    runpy.run_module(f"experiments.{task}", run_name="__main__", alter_sys=True)


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        # The task modules without running them; experiments.<task>.__main__ guards its call.
        context.set_forkserver_preload(["jax", *(f"experiments.{t}.__main__" for t in TASKS)])
        _CONTEXT = context
    return _CONTEXT


def run_forked(task: str, args: Sequence[str], output: Path, env: Mapping[str, str]) -> int:
    """``python -m experiments.<task> ARGS`` in a forked process; returns its exit code."""
    proc = _context().Process(target=_forked_main, args=(task, list(args), str(output), dict(env)))
    proc.start()

    def kill():
        if proc.is_alive():
            proc.kill()
            proc.join()

    _wait(proc.join, kill)
    return proc.exitcode


def forked_runner(cache: Path, min_compile_s: float = 0.0) -> Runner:
    """Runs forked from a server that imported the tasks once (see the module docstring);
    programs that compile in at least ``min_compile_s`` go to JAX's on-disk cache (0: all,
    since tiny runs share many small programs)."""
    env = child_environment(cache, min_compile_s)

    def run(spec: RunSpec, directory: Path, mode: str) -> int:
        args = command_args(spec, directory, mode)
        _log_command(directory / LOG_FILE, [f"python -m experiments.{spec.task}", *args])
        return run_forked(spec.task, args, directory / LOG_FILE, env)

    return run
