"""A stand-in for the training subprocesses: writes ``results.json`` files of the real
format (and bench records), with numbers that depend on the flags and the seed."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from experiments.loop.results import best_epoch
from experiments.report import cache, grids


def _score(spec: grids.RunSpec, epoch: int) -> float:
    base = zlib.crc32(" ".join(spec.args).encode()) % 300 / 100.0
    return 95.0 + base + 0.1 * (spec.seed or 0) + 0.5 * epoch


def results(spec: grids.RunSpec, status: str = "complete", epochs: int = 2) -> dict:
    metric = grids.METRICS[spec.task]
    history = []
    for e in range(1, epochs + 1):
        timing = {"forward_s": 0.1, "backward_s": 0.2 if "--k" in spec.args else 0.4}
        timing |= {"update_s": 0.05, "train_wall_s": 1.0, "eval_s": 0.1, "compile_s": 0.0}
        record = {"epoch": e, "loss": 1.0 / e, "timing": timing}
        record |= {f"dev_{metric}": _score(spec, e), f"test_{metric}": _score(spec, e) - 0.3}
        if "--mesimp" in spec.args:  # two prunes an epoch, as the quick grid asks
            sizes = [[500 - 60 * (2 * e + p), 500 - 40 * (2 * e + p)] for p in (-1, 0)]
            record["events"] = [
                {"epoch": e, "prune": p + 1, "sizes": z, "widths": z} for p, z in enumerate(sizes)
            ]
        history.append(record)
    payload = {
        "config": {"task": spec.task, "seed": spec.seed, "hidden": 500},
        "status": status,
        "epochs": history,
        "best": best_epoch(history, metric),
        "mean_timing": {"forward_s": 0.1, "backward_s": 0.2, "update_s": 0.05, "train_wall_s": 1.0},
    }
    if "--mesimp" in spec.args and status == "complete":
        payload["mesimp"] = {"final_sizes": [160, 150], "export_test_acc": 97.0}
    return payload


#: A record file of ``python -m experiments.bench --per-example --quick`` (its ``--out``
#: renamed), the section's real structure.
PER_EXAMPLE_FILE = Path(__file__).parent / "data" / "bench_per_example_quick.json"


def bench_payload(section: str) -> dict:
    """A bench record file for ``section``: the real quick per-example one, or one unified
    row at Table 7's k = 32 for the other sections."""
    if section == "per_example":
        return json.loads(PER_EXAMPLE_FILE.read_text())
    record = {"section": section, "batch": 256, "d_in": 4096, "d_out": 4096}
    record |= {"k": 32, "mode": "unified", "median_ms": 0.25, "ratio_vs_dense": 2.0}
    when = {"date": "2026-12-01T20:00:00+00:00", "cpu_count": 2}
    return {"load_average": [1.0, 0.5, 0.25], **when, "records": [record]}


class StubRunner:
    """Records its calls as ``(spec, mode)``; ``interrupt_at`` makes that call (0-based)
    leave a checkpoint and an interrupted ``results.json``, and return 130 like a run
    stopped by Ctrl-C."""

    def __init__(self, interrupt_at: int | None = None, stop_early=lambda spec: False):
        self.calls: list[tuple[grids.RunSpec, str]] = []
        self.interrupt_at = interrupt_at
        self.stop_early = stop_early  # spec -> whether the run ends after its first epoch

    def __call__(self, spec: grids.RunSpec, directory: Path, mode: str) -> int:
        self.calls.append((spec, mode))
        (directory / cache.LOG_FILE).write_text("stub log\n")
        if spec.task == "bench":
            (directory / cache.BENCH_FILE).write_text(json.dumps(bench_payload(spec.args[1])))
            return 0
        if len(self.calls) - 1 == self.interrupt_at:
            (directory / cache.CHECKPOINT_DIR / "1").mkdir(parents=True)
            payload = results(spec, "interrupted", epochs=1)
            (directory / cache.RESULTS_FILE).write_text(json.dumps(payload))
            return 130
        epochs = 1 if self.stop_early(spec) else spec.epochs
        (directory / cache.RESULTS_FILE).write_text(json.dumps(results(spec, epochs=epochs)))
        return 0


def all_flags(quick: bool = True) -> dict[str, frozenset[str]]:
    """Every flag the grids use, per task: a command line that has them all."""
    flags: dict[str, set[str]] = {t: set() for t in grids.TASKS}
    for grid in grids.build(grids.GRID_NAMES, 1, quick):
        for spec in grid.specs():
            flags[spec.task].update(spec.flags())
    return {t: frozenset(f) for t, f in flags.items()}
