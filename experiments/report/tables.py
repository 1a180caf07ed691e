"""Numbers of the report: each cell's mean and spread over seeds from ``results.json``, the
verdict on each of the paper's claims, and the Markdown tables with a link per number."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common.mesimp import prune_events
from experiments.report import cache, grids

HOLDS = "holds"
WITHIN_SPREAD = "within seed spread"
DOES_NOT_HOLD = "does not hold"
NO_DATA = "no data"

#: ``results.json`` ``mean_timing`` fields by the report's short names.
TIMING_FIELDS: Mapping[str, str] = {
    "fwd": "forward_s",
    "bwd": "backward_s",
    "upd": "update_s",
    "wall": "train_wall_s",
}


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (``std`` None for one seed)."""

    mean: float | None
    std: float | None
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        values = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not values:
            return Stat(None, None, 0)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return Stat(float(np.mean(values)), std, len(values))


@dataclasses.dataclass(frozen=True)
class Run:
    spec: grids.RunSpec
    directory: Path
    results: Mapping[str, Any] | None  # None: not finished


@dataclasses.dataclass(frozen=True)
class CellResult:
    """A cell's runs (one per seed), finished or not."""

    cell: grids.Cell
    runs: tuple[Run, ...]

    @property
    def metric(self) -> str:
        return grids.METRICS.get(self.cell.key.get("task", ""), "acc")

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.results is not None]

    def values(self, field: str) -> list[float]:
        return [v for r in self.finished if (v := value(r.results, field, self.metric)) is not None]

    def stat(self, field: str) -> Stat:
        return Stat.of(self.values(field))


def value(results: Mapping[str, Any], field: str, metric: str = "acc") -> float | None:
    """One number of a ``results.json``: ``dev``/``test`` (the selection metric at the best
    dev epoch), ``epoch`` (that epoch), ``fwd``/``bwd``/``upd``/``wall`` (mean seconds per
    epoch) or ``size`` (meSimp's mean hidden size at the best dev epoch: the size of the
    model whose accuracy is reported, which is larger than the final one when that epoch came
    before the last prune)."""
    best = results.get("best") or {}
    if field in ("dev", "test"):
        return best.get(f"{field}_{metric}")
    if field == "epoch":
        return best.get("epoch")
    if field in TIMING_FIELDS:
        return (results.get("mean_timing") or {}).get(TIMING_FIELDS[field])
    if field == "size":
        sizes = _sizes_at(results, best.get("epoch"))
        return float(np.mean(sizes)) if sizes else None
    raise KeyError(field)


def _sizes_at(results: Mapping[str, Any], epoch: int | None) -> list[int] | None:
    """meSimp's hidden sizes after ``epoch``: those of its last prune up to that epoch (the
    final sizes when the run logged no prune or ``epoch`` is None)."""
    final = (results.get("mesimp") or {}).get("final_sizes")
    if epoch is None:
        return final
    before = [e["sizes"] for e in prune_events(results) if e.get("epoch", 0) <= epoch]
    return before[-1] if before else final


def collect(grid: grids.Grid, dirs: Mapping[grids.RunSpec, Path]) -> list[CellResult]:
    """The results of every cell of ``grid`` (unfinished runs have ``results`` None)."""
    out = []
    for cell in grid.cells:
        runs = []
        for spec in cell.specs:
            directory = dirs[spec]
            done = cache.is_complete(spec, directory)
            # A bench section's record is its JSON; a training run's, its results.json.
            name = cache.BENCH_FILE if spec.task == "bench" else cache.RESULTS_FILE
            results = cache.read_json(directory / name) if done else None
            runs.append(Run(spec, directory, results))
        out.append(CellResult(cell, tuple(runs)))
    return out


def verdict(claim_sign: int, diff: float | None, spread: float | None) -> str:
    """Whether our difference supports a claim that it is positive (``claim_sign`` +1) or
    negative (-1): ``holds`` when it has that sign (zero counts), ``within seed spread``
    when it has the other sign by no more than ``spread`` (the spread over seeds; None with
    one seed), ``does not hold`` otherwise."""
    if diff is None:
        return NO_DATA
    if claim_sign * diff >= 0:
        return HOLDS
    if spread is not None and abs(diff) <= spread:
        return WITHIN_SPREAD
    return DOES_NOT_HOLD


def claim_sign(paper_diff: float | None) -> int:
    """The direction the paper claims: its difference's sign (no worse when it is 0)."""
    return -1 if paper_diff is not None and paper_diff < 0 else 1


def difference(a: Stat, b: Stat) -> tuple[float | None, float | None]:
    """``b - a`` and its spread ``sqrt(std_a^2 + std_b^2)`` (None without two seeds each)."""
    if a.mean is None or b.mean is None:
        return None, None
    if a.std is None or b.std is None:
        return b.mean - a.mean, None
    return b.mean - a.mean, math.hypot(a.std, b.std)


def compare(a: CellResult | None, b: CellResult | None, field: str, paper_diff: float | None):
    """``(our b - a, its spread, verdict)`` on the claim that ``b - a`` has the sign of
    ``paper_diff``."""
    if a is None or b is None:
        return None, None, NO_DATA
    diff, spread = difference(a.stat(field), b.stat(field))
    return diff, spread, verdict(claim_sign(paper_diff), diff, spread)


def ratio_stat(a: CellResult | None, b: CellResult | None, field: str) -> Stat:
    """``a / b`` per seed (a seed present in both), as a :class:`Stat`: a speedup of b."""
    if a is None or b is None:
        return Stat(None, None, 0)
    by_seed = {r.spec.seed: value(r.results, field, a.metric) for r in a.finished}
    ratios = []
    for r in b.finished:
        num, den = by_seed.get(r.spec.seed), value(r.results, field, b.metric)
        if num is not None and den:
            ratios.append(num / den)
    return Stat.of(ratios)


# ----------------------------------------------------------------------------- formatting


def fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_stat(s: Stat, digits: int = 2) -> str:
    if s.mean is None:
        return "—"
    return fmt(s.mean, digits) + ("" if s.std is None else f" ± {s.std:.{digits}f}")


def fmt_paper(x: float | None, approx: bool = False, digits: int = 2) -> str:
    if x is None:
        return "—"
    return ("≈" if approx else "") + fmt(x, digits)


def relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.absolute(), out.absolute())).as_posix()


def linked(text: str, result: CellResult | None, out: Path) -> str:
    """``text`` linked to the first finished run's ``results.json`` (unlinked without one)."""
    if result is None or not result.runs:
        return text
    finished = result.finished
    if not finished:
        return text  # the log of an unfinished run stays in the run cache, outside the report
    return f"[{text}]({relative(finished[0].directory / cache.RESULTS_FILE, out)})"


def seeds_note(result: CellResult | None) -> str:
    """`` (2 of 3 seeds)`` for a cell that has fewer finished runs than seeds, else ``""``."""
    if result is None or not result.finished or len(result.finished) == len(result.runs):
        return ""
    return f" ({len(result.finished)} of {len(result.runs)} seeds)"


def cell_text(result: CellResult | None, field: str, out: Path, digits: int = 2) -> str:
    stat = None if result is None else result.stat(field)
    if stat is None or stat.mean is None:
        return "—"  # nothing to link to: the run did not record it
    return linked(fmt_stat(stat, digits), result, out) + seeds_note(result)


def run_links(result: CellResult | None, out: Path) -> str:
    """One link per seed: ``s0 s1 ...`` to ``results.json``, ``s2 (failed)`` to the log."""
    if result is None:
        return "—"
    parts = []
    for run in result.runs:
        name = f"s{run.spec.seed}" if run.spec.seed is not None else "run"
        if run.results is not None:
            parts.append(f"[{name}]({relative(run.directory / cache.RESULTS_FILE, out)})")
        elif (run.directory / cache.LOG_FILE).exists():
            # Its log lives in the run cache, outside the report: named, not linked.
            parts.append(f"{name} (not finished)")
        else:
            parts.append(f"{name} (not run yet)")
    return " ".join(parts)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


Finder = Callable[..., CellResult | None]


def finder(results: Sequence[CellResult]) -> Finder:
    """``find(**key)``: the result of the cell whose key has those values, or None."""

    def find(**want: Any) -> CellResult | None:
        return next((r for r in results if r.cell.matches(**want)), None)

    return find
