"""``results.json``, the plots, model selection and the log and summary lines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.loop.task import RunResult

RESULTS_FILE = "results.json"


ACCURACY_PLOT = "accuracy.png"


TIMING_PLOT = "timing.png"
SPLITS: tuple[str, ...] = ("dev", "test")


def extra_metrics(record: Mapping[str, Any], metric: str = "acc") -> list[str]:
    """The task's extra metrics in an epoch record (``dev_<name>`` beside the selection
    metric and the loss; see ``Task``)."""
    names = [k.removeprefix("dev_") for k in record if k.startswith("dev_")]
    return [n for n in names if n not in (metric, "loss")]


def best_epoch(history: Sequence[Mapping[str, Any]], metric: str = "acc") -> dict[str, Any] | None:
    """The paper's model selection: the epoch with the best dev ``metric`` (accuracy unless
    the task names another; the first epoch on ties), with the test ``metric`` and the extra
    metrics of that epoch."""
    if not history:
        return None
    best = max(history, key=lambda r: (r[f"dev_{metric}"], -r["epoch"]))
    names = [metric, *extra_metrics(best, metric)]
    return {"epoch": best["epoch"], **{f"{s}_{n}": best[f"{s}_{n}"] for n in names for s in SPLITS}}


def patience_exhausted(
    history: Sequence[Mapping[str, Any]], patience: int, metric: str = "acc"
) -> bool:
    """The early-stopping rule: dev ``metric`` has not improved for ``patience`` epochs (the
    best epoch, the first on ties as in :func:`best_epoch`, lies at least ``patience`` epochs
    before the last). Always False for ``patience`` 0 (off)."""
    if patience <= 0 or not history:
        return False
    return history[-1]["epoch"] - best_epoch(history, metric)["epoch"] >= patience


def mean_timing(history: Sequence[Mapping[str, Any]], field: str) -> float | None:
    values = [r["timing"][field] for r in history if r["timing"].get(field) is not None]
    return float(np.mean(values)) if values else None


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes through a temporary file so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def plot(history: Sequence[Mapping[str, Any]], out: Path, metric: str = "acc") -> None:
    """``accuracy.png`` (dev/test ``metric`` per epoch) and ``timing.png``."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r[f"dev_{metric}"] for r in history], marker="o", label="dev")
    ax.plot(epochs, [r[f"test_{metric}"] for r in history], marker="s", label="test")
    label = "accuracy" if metric == "acc" else metric
    ax.set(xlabel="epoch", ylabel=f"{label} (%)", title=f"{label} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / ACCURACY_PLOT, dpi=100)
    plt.close(fig)

    fields = [("forward_s", "forward"), ("backward_s", "backward"), ("update_s", "update")]
    if all(r["timing"].get("forward_s") is None for r in history):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(history))
    for field, label in fields:
        values = np.array([r["timing"].get(field) or 0.0 for r in history])
        ax.bar(epochs, values, bottom=bottom, label=label)
        bottom += values
    ax.plot(epochs, [r["timing"]["train_wall_s"] for r in history], "k.-", label="wall")
    ax.set(xlabel="epoch", ylabel="seconds per epoch", title="training time per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / TIMING_PLOT, dpi=100)
    plt.close(fig)


def results_payload(
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    status: str,
    mesh: jax.sharding.Mesh,
    metric: str = "acc",
) -> dict[str, Any]:
    """Everything ``results.json`` holds: config, per-epoch metrics, best epoch, mean
    timings and the platform; with ``--patience``, ``early_stop`` says whether the rule
    ended the run (``stopped_after_epoch``, None when every epoch ran)."""
    payload = {
        "config": dict(config),
        "status": status,
        "epochs": list(history),
        "best": best_epoch(history, metric),
        "mean_timing": {
            f: mean_timing(history, f)
            for f in ("forward_s", "backward_s", "update_s", "train_wall_s", "eval_s", "probe_s")
        },
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in mesh.devices.flat],
        "num_devices": int(mesh.devices.size),
    }
    patience = int(config.get("patience") or 0)
    if patience:
        stopped = status == "complete" and len(history) < config["epochs"]
        stopped = stopped and patience_exhausted(history, patience, metric)
        after = history[-1]["epoch"] if stopped else None
        payload["early_stop"] = {"patience": patience, "stopped_after_epoch": after}
    return payload


def log_epoch(
    record: Mapping[str, Any], epochs: int, log: Callable[[str], None], metric: str = "acc"
) -> None:
    """One line per epoch: loss, dev and test metrics, and the times."""
    t = record["timing"]
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}"]
    for name in (metric, *extra_metrics(record, metric)):
        label = "" if name == "acc" else f"{name} "
        parts.append(f"dev {label}{record[f'dev_{name}']:.2f}%")
        parts.append(f"test {label}{record[f'test_{name}']:.2f}%")
    parts.append(f"train {t['train_wall_s']:.2f}s")
    if t.get("forward_s") is not None:
        # A share of the measured time (see experiments.loop.probes), never more than it.
        scaled = t.get("probe_scale") is not None and t["probe_scale"] < 1.0
        parts.append(
            f"(of which est. fwd {t['forward_s']:.2f}s bwd {t['backward_s']:.2f}s "
            f"upd {t['update_s']:.2f}s{', probes scaled to fit' if scaled else ''})"
        )
    parts.append(f"eval {t['eval_s']:.2f}s")
    if t.get("probe_s"):
        parts.append(f"probes {t['probe_s']:.2f}s")
    if t["compile_s"] > 0:
        parts.append(f"compile {t['compile_s']:.2f}s")
    log("  ".join(parts))


def summary_line(result: RunResult) -> str:
    """One line: best epoch, its dev and test metrics, and the mean per-epoch times."""
    if result.best is None:
        return "no epoch completed"
    b = result.best
    text = f"best epoch {b['epoch']}:"
    for name in (result.metric, *extra_metrics(b, result.metric)):
        label = "" if name == "acc" else f"{name} "
        text += f" dev {label}{b[f'dev_{name}']:.2f}% test {label}{b[f'test_{name}']:.2f}%"
    means = {f: mean_timing(result.history, f) for f in ("forward_s", "backward_s", "update_s")}
    wall = mean_timing(result.history, "train_wall_s")
    if means["forward_s"] is not None:
        text += (
            f" | mean per epoch: forward {means['forward_s']:.3f}s, backward "
            f"{means['backward_s']:.3f}s, update {means['update_s']:.3f}s (estimated)"
        )
    text += f", train wall {wall:.3f}s"
    return text
