"""The run cache: code versions, cache keys, run folders, the subprocess runner and the
time estimate.

A run lives in ``<cache>/<task>/<key>/`` where ``key`` hashes the task, its flags, the seed
and the code version of its training path (the source files of ``meprop_jax/``,
``experiments/loop/``, ``experiments/common/``, ``experiments/corpora/`` and the task's
package). A run whose ``results.json`` says ``complete`` is reused, never rerun; one with a
checkpoint is continued with ``--resume`` (restarted with ``--overwrite`` if that fails);
anything else starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.report.grids import RunSpec

RESULTS_FILE = "results.json"  # written by experiments.loop
BENCH_FILE = "bench.json"
SPEC_FILE = "spec.json"
TIMING_FILE = "report_run.json"
LOG_FILE = "train.log"
CHECKPOINT_DIR = "checkpoints"
#: Source folders of every training path; the task's package comes on top.
SHARED_SOURCES: tuple[str, ...] = (
    "meprop_jax",
    "experiments/loop",
    "experiments/common",
    "experiments/corpora",
)
INTERRUPTED_CODES = frozenset({130, 143, -signal.SIGINT, -signal.SIGTERM})

#: ``runner(spec, run_dir, mode) -> exit code``; ``mode`` is ``"fresh"``, ``"resume"`` or
#: ``"restart"``.
Runner = Callable[[RunSpec, Path, str], int]


class Interrupted(Exception):
    """A run (or the report) was stopped by a signal; rerunning the report resumes."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def code_version(root: Path, task: str) -> str:
    """A hash of the ``*.py`` files of ``task``'s training path under ``root``."""
    folders = [*SHARED_SOURCES, f"experiments/{task}"]
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_key(spec: RunSpec, code: str) -> str:
    """The run's identity: task, flags, seed and code version (nothing else)."""
    payload = {"task": spec.task, "args": list(spec.args), "seed": spec.seed, "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(cache: Path, spec: RunSpec, code: str) -> Path:
    return cache / spec.task / cache_key(spec, code)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(spec: RunSpec, directory: Path) -> bool:
    """Whether the run in ``directory`` finished: a complete ``results.json`` (with the
    meSimp entry for a meSimp run), or a bench section's JSON."""
    if spec.task == "bench":
        return read_json(directory / BENCH_FILE) is not None
    results = read_json(directory / RESULTS_FILE)
    if results is None or results.get("status") != "complete":
        return False
    return "--mesimp" not in spec.args or "mesimp" in results


def has_checkpoint(directory: Path) -> bool:
    ckpt = directory / CHECKPOINT_DIR
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def subprocess_command(spec: RunSpec, directory: Path, mode: str) -> list[str]:
    """The command that runs ``spec`` into ``directory`` (``mode`` as in :data:`Runner`)."""
    command = [sys.executable, *spec.command()[1:]]
    if spec.task == "bench":
        return [*command, "--out", str(directory / BENCH_FILE)]
    extra = {"fresh": [], "resume": ["--resume"], "restart": ["--overwrite"]}[mode]
    return [*command, "--out", str(directory), *extra]


def child_environment(cache: Path) -> dict[str, str]:
    """The environment of a run: JAX's on-disk compilation cache under ``cache`` (seeds of
    one setting compile the same programs), unless one is configured already."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str((cache / "jax-compilation-cache").absolute()))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    return env


def subprocess_runner(cache: Path) -> Runner:
    """The real runner: ``python -m experiments.<task> ... --out DIR``, its output in
    ``DIR/train.log``. Ctrl-C reaches the child too (same process group); the runner waits
    for it to save its checkpoint before passing the interruption on."""
    env = child_environment(cache)

    def run(spec: RunSpec, directory: Path, mode: str) -> int:
        command = subprocess_command(spec, directory, mode)
        with open(directory / LOG_FILE, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo_root()
            )
            try:
                return proc.wait()
            except KeyboardInterrupt:
                try:
                    proc.wait(timeout=120)
                except (KeyboardInterrupt, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
                raise

    return run


@dataclasses.dataclass(frozen=True)
class Outcome:
    spec: RunSpec
    directory: Path
    status: str  # "reused", "ran", "failed" or "not run" (``--write-only``)


def ensure_run(spec: RunSpec, directory: Path, runner: Runner) -> Outcome:
    """Reuses a finished run, otherwise runs (resumes, or restarts) it.

    Raises:
      Interrupted: the run was stopped by a signal (its checkpoint stays for the next try).
    """
    if is_complete(spec, directory):
        return Outcome(spec, directory, "reused")
    directory.mkdir(parents=True, exist_ok=True)
    record = {"task": spec.task, "args": list(spec.args), "seed": spec.seed}
    (directory / SPEC_FILE).write_text(json.dumps(record, indent=2) + "\n")
    start = time.perf_counter()
    mode = "resume" if spec.task != "bench" and has_checkpoint(directory) else "fresh"
    if spec.task != "bench" and mode == "fresh" and (directory / RESULTS_FILE).exists():
        mode = "restart"
    code = runner(spec, directory, mode)
    if code in INTERRUPTED_CODES:
        raise Interrupted(f"{' '.join(spec.command())} stopped (exit code {code})")
    if not is_complete(spec, directory) and mode == "resume":
        code = runner(spec, directory, "restart")  # a checkpoint it cannot continue
        if code in INTERRUPTED_CODES:
            raise Interrupted(f"{' '.join(spec.command())} stopped (exit code {code})")
    if not is_complete(spec, directory):
        return Outcome(spec, directory, "failed")
    timing = {"wall_s": time.perf_counter() - start, "mode": mode, "exit_code": code}
    (directory / TIMING_FILE).write_text(json.dumps(timing) + "\n")
    return Outcome(spec, directory, "ran")


def unique(specs: Iterable[RunSpec]) -> list[RunSpec]:
    """``specs`` without repeats (a cell shared by two grids runs once), in order."""
    return list(dict.fromkeys(specs))


@dataclasses.dataclass(frozen=True)
class Estimate:
    done: int
    todo: int
    seconds: float  # for the runs still to do
    scale: Mapping[str, float]  # measured / nominal time per task, from finished runs


def estimate(specs: Sequence[RunSpec], dirs: Mapping[RunSpec, Path]) -> Estimate:
    """The time the unfinished runs will take: each run's nominal time (per-task seconds per
    epoch), scaled per task by the median ratio of measured to nominal time of the runs the
    report has already finished."""
    ratios: dict[str, list[float]] = {}
    todo: list[RunSpec] = []
    for spec in specs:
        if not is_complete(spec, dirs[spec]):
            todo.append(spec)
            continue
        timing = read_json(dirs[spec] / TIMING_FILE)
        if timing and timing.get("mode") == "fresh" and spec.nominal_s > 0:
            ratios.setdefault(spec.task, []).append(timing["wall_s"] / spec.nominal_s)
    scale = {task: statistics.median(r) for task, r in ratios.items()}
    seconds = sum(s.nominal_s * scale.get(s.task, 1.0) for s in todo)
    return Estimate(len(specs) - len(todo), len(todo), seconds, scale)


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
