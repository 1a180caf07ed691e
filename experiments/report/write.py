"""Writes ``<out>/README.md`` and the figures from the grids' run folders."""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.report import cache, figures, grids, paper, sections, tables

README = "README.md"
#: The report's own copy of each finished run's record, so that its links work wherever the
#: report folder goes (the run folders in the cache also hold checkpoints).
RECORDS_DIR = "runs"


def publish_records(out: Path, dirs: Mapping[grids.RunSpec, Path]) -> dict[grids.RunSpec, Path]:
    """Copies each finished run's record (``results.json``; a bench section's JSON and log)
    to ``out/runs/<task>/<run>/`` and returns the run folders to link: the copies, or the
    cache's folder for a run that has not finished."""
    records = out / RECORDS_DIR
    if records.is_dir():
        shutil.rmtree(records)  # only runs of this report, not of an earlier grid
    published = {}
    for spec, directory in dirs.items():
        if not cache.is_complete(spec, directory):
            published[spec] = directory
            continue
        target = records / spec.task / directory.name
        target.mkdir(parents=True)
        names = (
            (cache.BENCH_FILE, cache.LOG_FILE) if spec.task == "bench" else (cache.RESULTS_FILE,)
        )
        for name in names:
            shutil.copyfile(directory / name, target / name)
        published[spec] = target
    return published


def commands(grid: grids.Grid) -> list[str]:
    """A collapsed list with the command behind each setting of ``grid``."""
    lines = ["<details><summary>Commands, one per setting</summary>", ""]
    for cell in grid.cells:
        spec = cell.specs[0]
        setting = ", ".join(f"{k}={v}" for k, v in cell.key.items() if k != "task")
        if spec.seed is None:
            lines.append(f"- {setting}: `{' '.join(spec.command())}`")
            continue
        command = " ".join(spec.command()[:-2])
        seeds = ", ".join(str(s.seed) for s in cell.specs)
        lines.append(f"- {setting}: `{command} --seed S --out DIR` (S = {seeds})")
    return [*lines, "", "</details>", ""]


def _figures(out: Path, results: Mapping[str, list[tables.CellResult]]) -> list[str]:
    """Draws the figures whose runs exist; returns their Markdown."""
    parts = []
    fig4 = results.get("figure4")
    if fig4 and figures.figure4(fig4, out / figures.FIGURE4_FILE):
        parts.append(
            f"![Figure 4: MNIST test accuracy against k, ours (solid) and the paper's "
            f"(dashed, read off the plot)]({figures.FIGURE4_FILE})"
        )
    series = {}
    if fig4:
        for model, name in (("meprop", "top-k"), ("random", "random-k"), ("kdim", "MLP(h=k)")):
            series[f"{name} (per-example, batch 10)"] = (fig4, model)
    if results.get("feedback"):
        series["plain meProp (unified, batch 50)"] = (results["feedback"], "plain")
        series["error feedback (unified, batch 50)"] = (results["feedback"], "feedback")
    if series and figures.accuracy_vs_k(series, out / figures.ACCURACY_VS_K_FILE):
        parts.append(f"![MNIST test accuracy against k]({figures.ACCURACY_VS_K_FILE})")
    t1 = results.get("table1")
    if t1:
        find = tables.finder(t1)
        panels = [
            (
                label,
                find(**where, optimizer="adam", model="dense"),
                find(**where, optimizer="adam", model="meprop"),
            )
            for label, where, _ in sections.TABLE1_TASKS
        ]
        if figures.learning_curves(panels, out / figures.LEARNING_CURVES_FILE):
            parts.append(
                f"![Dev accuracy per epoch, dense against meProp (Adam, mean over seeds)]"
                f"({figures.LEARNING_CURVES_FILE})"
            )
    return parts


def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _run_time_note(spent: cache.RunTime, total: int) -> str:
    note = (
        f"- Run time: {spent.runs} of the {total} runs have a timing record; they took "
        f"{cache.format_duration(spent.seconds)} in all (each run's wall time, summed)"
    )
    if spent.resumed:
        note += f"; {spent.resumed} of them resumed, and count only their last process"
    return note + "."


def write_report(
    out: Path,
    selected: Sequence[grids.Grid],
    dirs: Mapping[grids.RunSpec, Path],
    outcomes: Mapping[grids.RunSpec, cache.Outcome],
    *,
    quick: bool,
    seeds: int,
) -> Path:
    """Writes ``out/README.md`` (and the figures) and returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    spent = cache.run_time(list(dirs), dirs)  # before the records move: the timings stay
    dirs = publish_records(out, dirs)
    results = {g.name: tables.collect(g, dirs) for g in selected if not g.skipped}
    pending = [o for o in outcomes.values() if o.status == "not run"]
    failed = [o for o in outcomes.values() if o.status == "failed"]
    lines = [
        "# meProp: our runs against the paper",
        "",
        f"Paper: {paper.SOURCE}",
        "",
        f"Seeds per setting: {seeds}. Every number of ours is the mean ± sample standard "
        "deviation over the seeds of the test (or dev) score at the epoch with the best dev "
        "score, and links to the `results.json` of its first seed (the runs column links "
        "every seed). A verdict says whether our difference has the sign the paper claims "
        "(**holds**), has the other sign by at most the spread over seeds (**within seed "
        "spread**, sqrt of the summed variances; never with one seed), or neither (**does "
        "not hold**).",
        "",
    ]
    if quick:
        lines += [
            "**Quick run** (`--quick`): a few hundred examples, 2 epochs, fewer settings. "
            "It checks the pipeline; its numbers say nothing about the paper's claims.",
            "",
        ]
    lines += ["## Settings and data", ""]
    lines += [f"- {note}" for note in grids.SETTINGS_NOTES]
    lines += [
        f"- Report written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on a machine "
        f"with {os.cpu_count()} cores (load average {_load()}); {len(outcomes)} runs, "
        f"{sum(o.status == 'ran' for o in outcomes.values())} run now, "
        f"{sum(o.status == 'reused' for o in outcomes.values())} reused, {len(failed)} failed"
        + (f", {len(pending)} not run yet (written with `--write-only`)." if pending else "."),
        _run_time_note(spent, len(outcomes)),
        "- Commands run from the repository root with `MEPROP_DATA_DIR` naming the data "
        "folder; each section lists the command behind each of its settings.",
        "",
    ]
    for grid in selected:
        lines += [f"## {grid.title}", ""]
        if grid.skipped:
            lines += [f"Skipped: {grid.skipped}.", ""]
            continue
        lines += [sections.RENDERERS[grid.name](results[grid.name], out), ""]
        lines += commands(grid)
    figure_parts = _figures(out, results)
    if figure_parts:
        lines += ["## Figures", ""]
        for part in figure_parts:
            lines += [part, ""]
    if failed:
        lines += ["## Failed runs", ""]
        for o in failed:
            link = tables.relative(o.directory / cache.LOG_FILE, out)
            lines.append(f"- `{' '.join(o.spec.command())}`: [log]({link})")
        lines.append("")
    path = out / README
    path.write_text("\n".join(lines))
    return path
