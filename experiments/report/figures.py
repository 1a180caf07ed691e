"""The report's PNG figures (matplotlib, Agg): Figure 4's three panels, test accuracy
against k, learning curves of dense and meProp, and meSimp's hidden size over training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.common.mesimp import prune_events
from experiments.report import paper
from experiments.report.tables import CellResult, finder

FIGURE4_FILE = "figure4.png"
ACCURACY_VS_K_FILE = "accuracy_vs_k.png"
LEARNING_CURVES_FILE = "learning_curves.png"
MESIMP_SIZES_FILE = "mesimp_sizes.png"


def _save(fig, path) -> None:
    """Writes ``fig`` to ``path`` at the report's resolution and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _series(
    results: Sequence[CellResult], model: str
) -> tuple[list[int], list[float], list[float]]:
    """``(ks, mean test, std test)`` of the cells of ``model`` that have a finished run."""
    points = []
    for r in results:
        if r.cell.key.get("model") != model or "k" not in r.cell.key:
            continue
        s = r.stat("test")
        if s.mean is not None:
            points.append((int(r.cell.key["k"]), s.mean, s.std or 0.0))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def _log2_axis(ax) -> None:
    """A log-2 k axis labelled with plain numbers."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())


def _paper(ax, values: Mapping[int, float | None], label: str, color: str) -> None:
    ks = [k for k, v in sorted(values.items()) if v is not None]
    ax.plot(ks, [values[k] for k in ks], "--", marker="x", color=color, alpha=0.6, label=label)


def _ours(ax, results: Sequence[CellResult], model: str, label: str, color: str) -> None:
    ks, mean, std = _series(results, model)
    if ks:
        ax.errorbar(ks, mean, yerr=std, marker="o", color=color, capsize=3, label=label)


def figure4(results: Sequence[CellResult], path: Path) -> bool:
    """The paper's Figure 4 with our runs: meProp against dense, top-k against random-k,
    meProp(k) against MLP(h=k). Returns False (and writes nothing) without a finished run."""
    if not any(r.finished for r in results):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dense = finder(results)(model="dense")
    panels = (
        ("reduce overfitting", None, paper.FIGURE4_TOPK),
        ("top-k vs random-k", ("random", "random-k", paper.FIGURE4_RANDOM), None),
        ("meProp(k) vs MLP(h=k)", ("kdim", "MLP(h=k)", paper.FIGURE4_KDIM), None),
    )
    for ax, (title, other, _) in zip(axes, panels, strict=True):
        _ours(ax, results, "meprop", "meProp top-k (ours)", "C0")
        _paper(ax, paper.FIGURE4_TOPK, "meProp top-k (paper ≈)", "C0")
        if other is None:
            s = dense.stat("test") if dense is not None else None
            if s is not None and s.mean is not None:
                ax.axhline(s.mean, color="k", label="dense MLP h=500 (ours)")
            ax.axhline(paper.FIGURE4_DENSE, color="k", ls="--", alpha=0.6, label="dense (paper)")
        else:
            model, label, values = other
            _ours(ax, results, model, f"{label} (ours)", "C3")
            _paper(ax, values, f"{label} (paper ≈)", "C3")
        _log2_axis(ax)
        ax.set(title=title, xlabel="k (of h = 500)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def accuracy_vs_k(series: Mapping[str, tuple[Sequence[CellResult], str]], path: Path) -> bool:
    """Test accuracy against k for each named ``(results, model)`` series with data."""
    lines = [(name, _series(results, model)) for name, (results, model) in series.items()]
    lines = [(name, s) for name, s in lines if s[0]]
    if not lines:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (ks, mean, std) in lines:
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=name)
    _log2_axis(ax)
    ax.set(xlabel="k", ylabel="test accuracy (%)", title="MNIST test accuracy against k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _curve(result: CellResult) -> tuple[np.ndarray, np.ndarray] | None:
    """Epochs and the dev metric per epoch, averaged over the seeds that reached it (runs
    stopped early are shorter)."""
    histories = [r.results.get("epochs") or [] for r in result.finished]
    n = max((len(h) for h in histories), default=0)
    if n == 0:
        return None
    key = f"dev_{result.metric}"
    values = [np.mean([h[i][key] for h in histories if len(h) > i]) for i in range(n)]
    return np.arange(1, n + 1), np.array(values)


def learning_curves(
    panels: Sequence[tuple[str, CellResult | None, CellResult | None]], path: Path
) -> bool:
    """Dev metric per epoch, dense against meProp, one panel per ``(title, dense, meprop)``."""
    panels = [p for p in panels if any(c is not None and c.finished for c in p[1:])]
    if not panels:
        return False
    plt = _pyplot()
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, dense, meprop) in zip(axes[0], panels, strict=True):
        for result, label in ((dense, "dense"), (meprop, "meProp")):
            curve = None if result is None else _curve(result)
            if curve is not None:
                ax.plot(*curve, marker="o", label=label)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        metric = "UAS" if "Parsing" in title else "accuracy"
        ax.set(title=title, xlabel="epoch", ylabel=f"dev {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    return True


def _size_curve(results: dict) -> tuple[list[float], list[float]]:
    """meSimp's hidden size (mean over layers) after each prune, against training progress
    in epochs (prune ``p`` of ``P`` in epoch ``e`` at ``e - 1 + p / P``): from the full size
    at 0 to the end of the run's last epoch, a step at each prune."""
    events = prune_events(results)
    per_epoch: dict[int, int] = {}
    for e in events:
        per_epoch[e["epoch"]] = max(per_epoch.get(e["epoch"], 0), e["prune"])
    full = results.get("config", {}).get("hidden", 500)
    xs, ys = [0.0], [float(full)]
    for e in events:
        xs.append(e["epoch"] - 1 + e["prune"] / per_epoch[e["epoch"]])
        ys.append(float(np.mean(e["sizes"])))
    last = max((r["epoch"] for r in results.get("epochs", [])), default=0)
    if last > xs[-1]:
        xs.append(float(last))
        ys.append(ys[-1])
    return xs, ys


def mesimp_sizes(
    panels: Sequence[tuple[str, Sequence[CellResult], float | None]], path: Path
) -> bool:
    """meSimp's hidden size over training, one panel per ``(title, meSimp cells, the
    paper's average size)``, a line per seed; False (nothing written) without a run."""
    panels = [p for p in panels if any(c.finished for c in p[1])]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (title, cells, paper_size) in zip(axes[0], panels, strict=True):
        for i, cell in enumerate(cells):
            label = cell.cell.key.get("mode", "meSimp")
            for j, run in enumerate(cell.finished):
                xs, ys = _size_curve(run.results)
                best = (run.results.get("best") or {}).get("epoch")
                ax.plot(
                    xs,
                    ys,
                    drawstyle="steps-post",
                    color=f"C{i}",
                    alpha=0.8,
                    label=label if j == 0 else None,
                )
                if best is not None:
                    ax.axvline(best, color=f"C{i}", ls=":", alpha=0.4)
        if paper_size is not None:
            ax.axhline(paper_size, color="k", ls="--", alpha=0.6, label="paper (average)")
        ax.set(title=title, xlabel="epoch", ylabel="hidden units (mean over layers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return True
