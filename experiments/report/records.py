"""The committed run records: the report's cache, built up run by run.

Each finished run's record lives in ``<report>/runs/<task>/<key>/`` (``key``: see
:func:`~experiments.report.cache.cache_key`; task, flags and seed, not the code version):

- ``results.json``, the run's own record (a bench section: ``bench.json`` and its log);
- ``spec.json``, the command behind it and the code it ran on (:func:`code_record`);
- ``report_run.json``, its wall time (:data:`~experiments.report.cache.TIMING_FILE`).

A run whose record is there is never run again, so a grid that stops (or runs across days,
with each record committed as it lands: :func:`commit`) continues from what is committed.
Checkpoints and logs of unfinished runs stay in the run cache (``runs/report-cache``, not
committed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.report import cache
from experiments.report.grids import RunSpec

RECORDS_DIR = "runs"


def record_dir(out: Path, spec: RunSpec) -> Path:
    """The folder of ``spec``'s record under the report folder ``out``."""
    return out / RECORDS_DIR / spec.task / cache.cache_key(spec)


def is_recorded(spec: RunSpec, directory: Path) -> bool:
    """Whether ``directory`` holds ``spec``'s finished record."""
    return cache.is_complete(spec, directory)


def record_files(spec: RunSpec) -> tuple[str, ...]:
    if spec.task == "bench":
        return (cache.BENCH_FILE, cache.LOG_FILE, cache.SPEC_FILE, cache.TIMING_FILE)
    return (cache.RESULTS_FILE, cache.SPEC_FILE, cache.TIMING_FILE)


def code_record(root: Path, task: str) -> dict[str, Any]:
    """What ``spec.json`` says of the code: the hash of the task's training sources
    (:func:`~experiments.report.cache.code_version`) and the checkout's commit, if any."""
    record: dict[str, Any] = {"code_version": cache.code_version(root, task)}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        record["commit"] = head.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        record["commit"] = None
    return record


def publish(spec: RunSpec, work: Path, target: Path, code: Mapping[str, Any]) -> Path:
    """Copies the finished run in ``work`` to its record folder ``target`` (``spec.json``
    gains ``code``); returns ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in record_files(spec):
        if name == cache.SPEC_FILE:
            payload = {"task": spec.task, "args": list(spec.args), "seed": spec.seed, **code}
            (target / name).write_text(json.dumps(payload, indent=2) + "\n")
        elif (work / name).exists():
            shutil.copyfile(work / name, target / name)
    return target


def stray(out: Path, specs: Iterable[RunSpec]) -> list[Path]:
    """Record folders under ``out`` that no run of ``specs`` uses (earlier grids)."""
    used = {record_dir(out, s) for s in specs}
    return sorted(p for p in (out / RECORDS_DIR).glob("*/*") if p.is_dir() and p not in used)


def commit(paths: Sequence[Path], message: str, root: Path) -> str | None:
    """``git add`` and ``git commit`` of ``paths`` alone (other staged changes stay
    staged); returns None, or git's complaint when it refused (the files stay on disk and
    the next commit takes them)."""
    names = [str(p.absolute()) for p in paths if p.exists()]
    steps = (["git", "add", "--", *names], ["git", "commit", "-q", "-m", message, "--", *names])
    for step in steps:
        try:
            done = subprocess.run(step, cwd=root, capture_output=True, text=True)
        except OSError as exc:
            return str(exc)
        if done.returncode:
            return (done.stderr or done.stdout).strip() or f"{step[1]} exit {done.returncode}"
    return None
