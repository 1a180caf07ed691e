"""Writes ``<out>/README.md`` and the figures from the committed run records (and the run
cache's folders of the runs not finished yet)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.report import cache, figures, grids, paper, sections, tables

README = "README.md"
FIGURE_FILES: tuple[str, ...] = (
    figures.FIGURE4_FILE,
    figures.ACCURACY_VS_K_FILE,
    figures.LEARNING_CURVES_FILE,
    figures.MESIMP_SIZES_FILE,
)


def _setting(key: Mapping[str, object]) -> str:
    """A cell's key as ``name=value, ...``, without the task."""
    return ", ".join(f"{k}={v}" for k, v in key.items() if k != "task")


def commands(grid: grids.Grid) -> list[str]:
    """A collapsed list with the command behind each setting of ``grid``."""
    lines = ["<details><summary>Commands, one per setting</summary>", ""]
    for cell in grid.cells:
        spec = cell.specs[0]
        setting = _setting(cell.key)
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
                f"![Dev accuracy per epoch, dense against meProp (Adam, mean over the seeds "
                f"that reached the epoch)]({figures.LEARNING_CURVES_FILE})"
            )
    ms = results.get("mesimp")
    if ms:
        panels = []
        for task, label in sections.MESIMP_LABELS.items():
            cells = [r for r in ms if r.cell.matches(paper_task=task, model="mesimp")]
            panels.append((label, cells, paper.MESIMP[task]["dimension"]))
        if figures.mesimp_sizes(panels, out / figures.MESIMP_SIZES_FILE):
            parts.append(
                f"![meSimp: hidden units after each prune, one line per seed; dotted: the "
                f"best dev epoch; dashed: the authors' average size]({figures.MESIMP_SIZES_FILE})"
            )
    return parts


def missing_cells(
    selected: Sequence[grids.Grid], results: Mapping[str, list[tables.CellResult]]
) -> list[str]:
    """One line per cell with fewer finished runs than seeds: its grid, setting and count."""
    lines = []
    for grid in selected:
        if grid.skipped:
            lines.append(f"- {grid.name}: every cell (skipped: {grid.skipped})")
            continue
        lines += [f"- {grid.name}: {note}" for note in grid.left_out]
        for result in results[grid.name]:
            done, total = len(result.finished), len(result.runs)
            if done == total:
                continue
            key = result.cell.key
            setting = _setting(key)
            count = "not run" if total == 1 else f"{done} of {total} seeds"
            lines.append(f"- {grid.name}: {key.get('task')}, {setting}: {count}")
    return lines


def early_stops(
    selected: Sequence[grids.Grid], results: Mapping[str, list[tables.CellResult]]
) -> list[str]:
    """The finished training runs that the patience rule ended before their last epoch.

    Returns a summary by arm (the cell's ``model``) and one line per such run, each run
    once though grids share it; nothing when every finished run trained all its epochs.
    """
    stopped: list[str] = []
    arms: dict[str, list[int]] = {}  # model -> [stopped, finished]
    seen: set[Path] = set()
    for grid in selected:
        for result in results.get(grid.name, ()):
            key = result.cell.key
            setting = _setting(key)
            for run in result.finished:
                if run.spec.task == "bench" or not run.spec.epochs or run.directory in seen:
                    continue
                seen.add(run.directory)
                trained = len(run.results.get("epochs") or ())
                counts = arms.setdefault(str(key.get("model", "other")), [0, 0])
                counts[1] += 1
                if trained >= run.spec.epochs:
                    continue
                counts[0] += 1
                best = (run.results.get("best") or {}).get("epoch")
                stopped.append(
                    f"- {grid.name}: {key.get('task')}, {setting}, seed {run.spec.seed}: "
                    f"{trained} of {run.spec.epochs} epochs, best dev epoch {best}"
                )
    if not stopped:
        return []
    total = sum(n for _, n in arms.values())
    by_arm = ", ".join(f"{arm} {s} of {n}" for arm, (s, n) in sorted(arms.items()))
    return [
        f"{len(stopped)} of the {total} finished training runs stopped before their last "
        f"epoch because dev had not improved for {grids.PATIENCE} epochs. By arm: {by_arm}. "
        "The rule is the same for every arm, and the test score is still read at the best "
        "dev epoch.",
        "",
        "<details><summary>The runs, one per line</summary>",
        "",
        *stopped,
        "",
        "</details>",
    ]


def _stray_note(stray: Sequence[Path]) -> list[str]:
    if not stray:
        return []
    return [
        f"- {len(stray)} committed records under `runs/` belong to no cell of these grids "
        "(earlier grids'); they stay as records and are not used here."
    ]


def _code_note(dirs: Mapping[grids.RunSpec, Path]) -> str:
    """Which code versions the finished records ran on, per task."""
    versions: dict[str, set[str]] = {}
    for spec, directory in dirs.items():
        meta = cache.read_json(directory / cache.SPEC_FILE) or {}
        if cache.is_complete(spec, directory) and meta.get("code_version"):
            versions.setdefault(spec.task, set()).add(meta["code_version"])
    if not versions:
        return "- Code: no finished record yet."
    parts = [f"{task} {len(v)}" for task, v in sorted(versions.items())]
    return (
        "- Code: a record is reused whatever code has changed since it ran; its `spec.json` "
        "names the code version (a hash of the task's training sources) and the commit it "
        f"ran on. Code versions among the finished records: {', '.join(parts)}."
    )


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
    stray: Sequence[Path] = (),
) -> Path:
    """Writes ``out/README.md`` (and the figures) and returns its path.

    Args:
      dirs: each run's folder: its committed record once finished, else its run-cache folder.
      stray: committed record folders that belong to no cell of these grids.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # a figure without runs now is not drawn: no stale copy stays
        (out / name).unlink(missing_ok=True)
    spent = cache.run_time(list(dirs), dirs)
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
        _code_note(dirs),
        *_stray_note(stray),
        "- Commands run from the repository root with `MEPROP_DATA_DIR` naming the data "
        "folder; each section lists the command behind each of its settings.",
        "",
    ]
    missing = missing_cells(selected, results)
    lines += ["## Missing cells", ""]
    if missing:
        lines += [
            f"{len(missing)} settings have fewer finished runs than seeds (their table "
            "cells show how many seeds they average, or —). Running the same command "
            "again continues the grid from the committed records.",
            "",
            *missing,
            "",
        ]
    else:
        lines += [f"None: every setting has its {seeds} seeds.", ""]
    stops = early_stops(selected, results)
    if stops:
        lines += ["## Early stopping", "", *stops, ""]
    for grid in selected:
        lines += [f"## {grid.title}", ""]
        if grid.skipped:
            lines += [f"Skipped: {grid.skipped}.", ""]
            continue
        for note in grid.left_out:
            lines += [f"Missing: {note}.", ""]
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
