"""The run cache: cache keys, run folders, reuse and resumption, code versions and the
time estimate (the runners are in :mod:`experiments.report.runners`, the committed records
in :mod:`experiments.report.records`).

A run trains in ``<cache>/<task>/<key>/`` where ``key`` hashes the task, its flags and the
seed. The code version of its training path (a hash of the source files of ``meprop_jax/``,
``experiments/loop/``, ``experiments/common/``, ``experiments/corpora/`` and the task's
package) is recorded with the run, not keyed: a grid that takes days keeps its finished runs
while the code moves on, and the report says which code versions its records come from. A
run whose ``results.json`` says ``complete`` is reused, never rerun; one with a checkpoint
is continued with ``--resume`` (restarted with ``--overwrite`` if that fails); anything else
starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import statistics
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


def cache_key(spec: RunSpec) -> str:
    """The run's identity: task, flags and seed (nothing else)."""
    payload = {"task": spec.task, "args": list(spec.args), "seed": spec.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(cache: Path, spec: RunSpec) -> Path:
    """Where ``spec`` trains (checkpoints, log) in the run cache ``cache``."""
    return cache / spec.task / cache_key(spec)


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


@dataclasses.dataclass(frozen=True)
class RunTime:
    runs: int  # finished runs with a timing record
    seconds: float  # their wall times, summed
    resumed: int  # of them, runs whose record covers only the process that finished them


def run_time(specs: Sequence[RunSpec], dirs: Mapping[RunSpec, Path]) -> RunTime:
    """The summed wall time of the finished runs of ``specs``, as their timing records give
    it (a run reused from an earlier report keeps the time it took then)."""
    seconds, runs, resumed = 0.0, 0, 0
    for spec in unique(specs):
        timing = read_json(dirs[spec] / TIMING_FILE) if is_complete(spec, dirs[spec]) else None
        if not timing:
            continue
        seconds += float(timing["wall_s"])
        runs += 1
        resumed += timing.get("mode") == "resume"
    return RunTime(runs, seconds, resumed)


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
