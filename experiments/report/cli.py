"""``python -m experiments.report``: runs (or reuses) the grids and writes the report."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.common import ConfigError
from experiments.report import cache, grids, runners

DEFAULT_OUT = Path("docs/report")
DEFAULT_CACHE = Path("runs/report-cache")
DEFAULT_SEEDS = 3
QUICK_SEEDS = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        "--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})"
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


def run_grids(
    specs: Sequence[grids.RunSpec],
    dirs: Mapping[grids.RunSpec, Path],
    runner: cache.Runner,
) -> dict[grids.RunSpec, cache.Outcome]:
    """Runs what is not finished, in order, under a progress bar."""
    done = sum(cache.is_complete(s, dirs[s]) for s in specs)
    outcomes: dict[grids.RunSpec, cache.Outcome] = {}
    with _progress(len(specs), done) as bar:
        for spec in specs:
            if cache.is_complete(spec, dirs[spec]):
                outcomes[spec] = cache.Outcome(spec, dirs[spec], "reused")
                continue
            bar.set_postfix_str(" ".join(spec.command()[2:])[-70:])
            outcome = cache.ensure_run(spec, dirs[spec], runner)
            outcomes[spec] = outcome
            if outcome.status == "failed":
                bar.write(f"failed: {' '.join(spec.command())} (see {dirs[spec] / cache.LOG_FILE})")
            bar.update(1)
            left = cache.estimate(specs, dirs)
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
    built = grids.build(names, seeds, args.quick)
    tasks = sorted({s.task for g in built for s in g.specs()})
    codes = {t: cache.code_version(root, t) for t in tasks}
    if flags is None:
        flags = {t: help_flags(t, args.cache, codes[t], forked=args.quick) for t in tasks}
    selected = [grids.check_flags(g, flags) for g in built]
    specs = cache.unique(s for g in selected if not g.skipped for s in g.specs())
    dirs = {s: cache.run_dir(args.cache, s, codes[s.task]) for s in specs}
    est = cache.estimate(specs, dirs)
    print_plan(selected, dirs, est, commands=args.dry_run)
    if args.dry_run:
        return 0
    if runner is None:
        # Tiny runs are mostly start-up: share the imports (see experiments.report.runners).
        runner = (
            runners.forked_runner(args.cache)
            if args.quick
            else runners.subprocess_runner(args.cache)
        )
    start = time.perf_counter()
    try:
        if args.write_only:
            outcomes = {
                s: cache.Outcome(
                    s, dirs[s], "reused" if cache.is_complete(s, dirs[s]) else "not run"
                )
                for s in specs
            }
        else:
            outcomes = run_grids(specs, dirs, runner)
    except (cache.Interrupted, KeyboardInterrupt) as exc:
        print(
            f"\ninterrupted ({exc or 'Ctrl-C'}); finished runs are kept in {args.cache}: run "
            "the same command again to resume",
            file=sys.stderr,
        )
        return 130
    from experiments.report import write

    readme = write.write_report(args.out, selected, dirs, outcomes, quick=args.quick, seeds=seeds)
    failed = sum(o.status == "failed" for o in outcomes.values())
    print(
        f"report: {readme} ({len(outcomes)} runs, {failed} failed, "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return 1 if failed else 0
