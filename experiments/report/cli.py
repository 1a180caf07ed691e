"""``python -m experiments.report``: runs (or reuses) the grids and writes the report.

The committed records under ``<out>/runs/`` are the cache (:mod:`experiments.report.records`):
a run with a record there is reused; any other run trains in the run cache (``--cache``),
resuming from its checkpoint if it has one, and its record is copied to ``<out>/runs/`` as
soon as it finishes (``--commit-each`` also commits it, with the rewritten report).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from experiments.common import ConfigError
from experiments.common.cli import OneLineErrorParser
from experiments.report import cache, grids, records, runners

DEFAULT_OUT = Path("docs/report")
QUICK_OUT = Path("runs/report-quick")  # a smoke run never writes over the committed report
DEFAULT_CACHE = Path("runs/report-cache")
DEFAULT_SEEDS = 3
QUICK_SEEDS = 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m experiments.report",
        description="Run (or reuse) the grids of experiment runs and write a Markdown report "
        "with figures that compares them with the meProp paper.",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per setting (default {DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAME[,NAME]",
        help=f"only these grids, from {', '.join(grids.GRID_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny runs (few examples, 2 epochs, fewer settings): a smoke run of the whole "
        "pipeline, not results",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"report folder, with the run records under runs/ (default {DEFAULT_OUT}; "
        f"{QUICK_OUT} with --quick)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"run folders, one per configuration and code version (default {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the grid and the time estimate, run nothing"
    )
    parser.add_argument(
        "--write-only",
        action="store_true",
        help="write the report from the finished runs, run nothing (the rest shows as not run)",
    )
    parser.add_argument(
        "--commit-each",
        action="store_true",
        help="after each finished run, rewrite the report and git-commit it with the run's "
        "record (only those files; other staged changes stay staged), so that a grid left "
        "running in the background keeps what it has done",
    )
    return parser


def help_flags(
    task: str, cache_dir: Path, code: str, forked: bool = False
) -> frozenset[str] | None:
    """The flags ``python -m experiments.<task> --help`` lists (kept per code version), or
    None when the command fails. ``forked``: ask through :func:`runners.run_forked`, otherwise
    :func:`runners.run_fresh`."""
    saved = cache_dir / "help" / f"{task}-{code}.txt"
    if not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        partial = saved.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        launch = runners.run_forked if forked else runners.run_fresh
        status = launch(task, ["--help"], partial, runners.child_environment(cache_dir))
        if status != 0:
            return None
        partial.rename(saved)
    return grids.parse_help_flags(saved.read_text())


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="run", file=sys.stderr, dynamic_ncols=True)


class Runs:
    """The runs of the selected grids: where each one's record goes (``records``) and where
    it trains (``work``)."""

    def __init__(self, specs: Sequence[grids.RunSpec], out: Path, cache_dir: Path):
        self.specs = list(specs)
        self.records = {s: records.record_dir(out, s) for s in self.specs}
        self.work = {s: cache.run_dir(cache_dir, s) for s in self.specs}

    def recorded(self, spec: grids.RunSpec) -> bool:
        return records.is_recorded(spec, self.records[spec])

    def dirs(self) -> dict[grids.RunSpec, Path]:
        """Each run's folder now: its record once finished, else its run-cache folder."""
        return {s: self.records[s] if self.recorded(s) else self.work[s] for s in self.specs}


def run_grids(
    grid: Runs,
    runner: cache.Runner,
    root: Path,
    on_record: Callable[[grids.RunSpec, dict[grids.RunSpec, cache.Outcome]], None] | None = None,
) -> dict[grids.RunSpec, cache.Outcome]:
    """Runs what has no record, in order, under a progress bar; copies each finished run's
    record into place and then calls ``on_record(spec, outcomes so far)``."""
    specs = grid.specs
    outcomes: dict[grids.RunSpec, cache.Outcome] = {}
    with _progress(len(specs), sum(grid.recorded(s) for s in specs)) as bar:
        for spec in specs:
            if grid.recorded(spec):
                outcomes[spec] = cache.Outcome(spec, grid.records[spec], "reused")
                continue
            bar.set_postfix_str(" ".join(spec.command()[2:])[-70:])
            outcome = cache.ensure_run(spec, grid.work[spec], runner)
            if outcome.status == "failed":
                outcomes[spec] = outcome
                bar.write(
                    f"failed: {' '.join(spec.command())} (see {outcome.directory / cache.LOG_FILE})"
                )
            else:  # ran now, or finished earlier in the run cache without a record
                code = records.code_record(root, spec.task)
                target = records.publish(spec, grid.work[spec], grid.records[spec], code)
                outcomes[spec] = cache.Outcome(spec, target, outcome.status)
                if on_record is not None:
                    on_record(spec, outcomes)
            bar.update(1)
            left = cache.estimate(specs, grid.dirs())
            bar.set_description(f"~{cache.format_duration(left.seconds)} left")
    return outcomes


def print_plan(
    selected: Sequence[grids.Grid],
    dirs: Mapping[grids.RunSpec, Path],
    est: cache.Estimate,
    commands: bool,
) -> None:
    """Each grid (with every command when ``commands``) and the time estimate."""
    for grid in selected:
        if grid.skipped:
            print(f"{grid.name}: {grid.title}\n  skipped: {grid.skipped}")
            continue
        done = sum(cache.is_complete(s, dirs[s]) for s in grid.specs())
        print(f"{grid.name}: {grid.title} ({done} of {len(grid.specs())} runs done)")
        for spec in grid.specs() if commands else ():
            state = "done" if cache.is_complete(spec, dirs[spec]) else "to run"
            print(f"  [{state}] {' '.join(spec.command())}")
    scale = ", ".join(f"{t} x{s:.2f}" for t, s in sorted(est.scale.items())) or "none yet"
    print(
        f"{est.done + est.todo} runs: {est.done} done, {est.todo} to run; estimated "
        f"{cache.format_duration(est.seconds)} (measured/nominal time per task: {scale})"
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    runner: cache.Runner | None = None,
    flags: Mapping[str, frozenset[str] | None] | None = None,
) -> int:
    """Runs the report; returns the exit code.

    Args:
      argv: the command line (default ``sys.argv[1:]``).
      runner: runs one configuration (default: a subprocess per run; with ``--quick``, a
        process forked from a server that imported the tasks once).
      flags: each task's known flags (default: read from its ``--help``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = grids.parse_only(args.only)
        seeds = args.seeds
        if seeds is None:
            seeds = QUICK_SEEDS if args.quick else DEFAULT_SEEDS
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    except ConfigError as exc:
        parser.error(str(exc))
    root = cache.repo_root()
    # The report covers every grid, from whatever is recorded; --only limits what runs.
    built = grids.build(grids.GRID_NAMES, seeds, args.quick)
    tasks = sorted({s.task for g in built for s in g.specs()})
    codes = {t: cache.code_version(root, t) for t in tasks}
    if flags is None:
        flags = {t: help_flags(t, args.cache, codes[t], forked=args.quick) for t in tasks}
    every = [grids.check_flags(g, flags) for g in built]
    selected = [g for g in every if g.name in names]
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    runnable = lambda gs: cache.unique(s for g in gs if not g.skipped for s in g.specs())
    grid, reported = (
        Runs(runnable(selected), out, args.cache),
        Runs(runnable(every), out, args.cache),
    )
    specs = grid.specs
    est = cache.estimate(specs, grid.dirs())
    print_plan(selected, grid.dirs(), est, commands=args.dry_run)
    if args.dry_run:
        return 0
    if runner is None:
        # Tiny runs are mostly start-up: share the imports (see experiments.report.runners).
        runner = (
            runners.forked_runner(args.cache)
            if args.quick
            else runners.subprocess_runner(args.cache)
        )
    from experiments.report import write

    def write_report(outcomes: Mapping[grids.RunSpec, cache.Outcome]) -> Path:
        pending = {s: cache.Outcome(s, reported.work[s], "not run") for s in reported.specs}
        done = {
            s: cache.Outcome(s, reported.records[s], "reused")
            for s in reported.specs
            if reported.recorded(s)
        }
        return write.write_report(
            out,
            every,
            reported.dirs(),
            {**pending, **done, **outcomes},
            quick=args.quick,
            seeds=seeds,
            stray=records.stray(out, reported.specs),
        )

    def commit_record(spec: grids.RunSpec, outcomes: Mapping[grids.RunSpec, cache.Outcome]) -> None:
        readme = write_report(outcomes)
        paths = [grid.records[spec], readme, *(out / name for name in write.FIGURE_FILES)]
        command = " ".join(spec.command()[3:])
        refused = records.commit(paths, f"report run: {spec.task} {command}", root)
        if refused:
            print(f"git commit of {grid.records[spec]} refused: {refused}", file=sys.stderr)

    start = time.perf_counter()
    try:
        if args.write_only:
            outcomes = {
                s: cache.Outcome(s, grid.records[s], "reused") for s in specs if grid.recorded(s)
            }
        else:
            on_record = commit_record if args.commit_each else None
            outcomes = run_grids(grid, runner, root, on_record)
    except (cache.Interrupted, KeyboardInterrupt) as exc:
        print(
            f"\ninterrupted ({exc or 'Ctrl-C'}); finished runs are recorded in "
            f"{out / records.RECORDS_DIR} and checkpoints kept in {args.cache}: run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
    readme = write_report(outcomes)
    outcomes = {**{s: cache.Outcome(s, grid.work[s], "not run") for s in specs}, **outcomes}
    failed = sum(o.status == "failed" for o in outcomes.values())
    print(
        f"report: {readme} ({len(outcomes)} runs, {failed} failed, "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return 1 if failed else 0
