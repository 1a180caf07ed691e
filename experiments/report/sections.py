"""One Markdown section per grid: the paper's number beside ours, the difference and the
verdict on each claim; every number of ours links to its run's ``results.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from experiments.report import paper
from experiments.report.speed import speed
from experiments.report.tables import (
    CellResult,
    cell_text,
    compare,
    finder,
    fmt,
    fmt_paper,
    fmt_stat,
    linked,
    markdown,
    ratio_stat,
    run_links,
    seeds_note,
    verdict,
)

TABLE1_TASKS: tuple[tuple[str, dict[str, str], str], ...] = (
    ("MNIST", {"task": "mnist"}, "mnist"),
    ("POS, CoNLL-2000", {"task": "tagging", "corpus": "conll2000"}, "pos"),
    ("POS, PTB sample", {"task": "tagging", "corpus": "ptb-dep-sample"}, "pos"),
    ("Parsing (UAS), PTB sample", {"task": "parsing"}, "parsing"),
)


def _pair_rows(
    label: str,
    dense: CellResult | None,
    meprop: CellResult | None,
    paper_dense: float,
    paper_meprop: float,
    out: Path,
) -> list[str]:
    """One row comparing dense and meProp test accuracy with the paper's."""
    paper_diff = paper_meprop - paper_dense
    diff, spread, text = compare(dense, meprop, "test", paper_diff)
    return [
        label,
        fmt_paper(paper_dense),
        cell_text(dense, "test", out),
        fmt_paper(paper_meprop),
        cell_text(meprop, "test", out),
        fmt(paper_diff, sign=True),
        fmt(diff, sign=True) + ("" if spread is None else f" (spread {spread:.2f})"),
        text,
        f"{run_links(dense, out)} / {run_links(meprop, out)}",
    ]


PAIR_HEADER = (
    "setting",
    "paper dense",
    "ours dense",
    "paper meProp",
    "ours meProp",
    "paper Δ",
    "ours Δ",
    "verdict: meProp vs dense as the paper",
    "runs (dense / meProp)",
)


def table1(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    acc_rows, time_rows = [], []
    for optimizer in ("adam", "adagrad"):
        for label, where, paper_task in TABLE1_TASKS:
            dense = find(**where, optimizer=optimizer, model="dense")
            meprop = find(**where, optimizer=optimizer, model="meprop")
            if dense is None and meprop is None:
                continue
            numbers = paper.TABLE1[(paper_task, optimizer)]
            p_dense, p_meprop = numbers["dense"], numbers["meprop"]
            k = int(p_meprop["k"])
            name = f"{label}, {optimizer}, k={k}"
            row = _pair_rows(name, dense, meprop, p_dense["test"], p_meprop["test"], out)
            dev = [cell_text(dense, "dev", out), cell_text(meprop, "dev", out)]
            epochs = [cell_text(dense, "epoch", out, 1), cell_text(meprop, "epoch", out, 1)]
            acc_rows.append(
                [
                    *row[:1],
                    f"{fmt(p_dense['dev'])} / {fmt(p_meprop['dev'])}",
                    " / ".join(dev),
                    f"{p_dense['iter']:.0f} / {p_meprop['iter']:.0f}",
                    " / ".join(epochs),
                    *row[1:],
                ]
            )
            times = [
                " / ".join(cell_text(c, f, out, 3) for c in (dense, meprop))
                for f in ("fwd", "bwd", "upd", "wall")
            ]
            speed = ratio_stat(dense, meprop, "bwd")
            wall = ratio_stat(dense, meprop, "wall")
            paper_speed = p_dense["bp_s"] / p_meprop["bp_s"]
            spread = None if speed.std is None else speed.std
            claim = verdict(1, None if speed.mean is None else speed.mean - 1.0, spread)
            time_rows.append(
                [name, *times, f"{paper_speed:.1f}x", _times(speed), _times(wall), claim]
            )
    header = ["setting", "paper dev (dense / meProp)", "ours dev", "paper best iter"]
    header += ["ours best epoch", *PAIR_HEADER[1:]]
    time_header = [
        "setting",
        "fwd s/epoch (dense / meProp)",
        "bwd s/epoch",
        "update s/epoch",
        "train wall s/epoch",
        "paper backprop speedup",
        "ours backward speedup",
        "ours wall speedup",
        "verdict: meProp's backward is faster",
    ]
    return "\n\n".join(
        [
            "Test accuracy at the best dev epoch (mean ± std over seeds; Δ = meProp − dense).",
            markdown(header, acc_rows),
            "Times per epoch from `results.json` (`mean_timing`; forward/backward/update are "
            "the loop's probe estimates, absent where a task does not probe). The paper's "
            "time is the backprop of the linear transformations in its C# framework. These "
            "runs are the grid's: they shared the two cores with other runs and jobs, and "
            "some were paused while quiet timings ran, so their times are rough. The speed "
            "section's per-example bench times the same settings interleaved on a quiet "
            "machine.",
            markdown(time_header, time_rows),
        ]
    )


def _times(s) -> str:
    if s.mean is None:
        return "—"
    return f"{s.mean:.2f}x" + ("" if s.std is None else f" ± {s.std:.2f}")


def figure4(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    dense = find(model="dense")
    ks = sorted({int(r.cell.key["k"]) for r in results if r.cell.key.get("model") != "dense"})
    rows = []
    for k in ks:
        topk, random, kdim = (find(model=m, k=k) for m in ("meprop", "random", "kdim"))
        p_top, p_rand, p_kdim = (t.get(k) for t in paper_series())
        cells = []
        for p_b, b, p_a, a in ((p_top, topk, p_rand, random), (p_top, topk, p_kdim, kdim)):
            paper_diff = None if p_a is None or p_b is None else p_b - p_a
            diff, _, text = compare(a, b, "test", paper_diff if paper_diff else 1.0)
            cells.append(f"{fmt(diff, sign=True)}: {text}")
        p_vs_dense = None if p_top is None else p_top - paper.FIGURE4_DENSE
        diff, _, text = compare(dense, topk, "test", p_vs_dense)
        rows.append(
            [
                str(k),
                fmt_paper(p_top, True),
                cell_text(topk, "test", out),
                fmt_paper(p_rand, True),
                cell_text(random, "test", out),
                fmt_paper(p_kdim, True),
                cell_text(kdim, "test", out),
                *cells,
                f"{fmt(diff, sign=True)}: {text}",
            ]
        )
    header = [
        "k",
        "paper top-k",
        "ours top-k",
        "paper random-k",
        "ours random-k",
        "paper MLP(h=k)",
        "ours MLP(h=k)",
        "top-k − random-k: verdict (top-k better)",
        "top-k − MLP(h=k): verdict (meProp better)",
        "top-k − dense: verdict (paper's sign)",
    ]
    line = (
        f"Dense MLP (h=500): paper {paper.FIGURE4_DENSE:.2f}, ours "
        f"{cell_text(dense, 'test', out)} ({run_links(dense, out)})."
    )
    return "\n\n".join(["MNIST test accuracy at the best dev epoch.", line, markdown(header, rows)])


def paper_series():
    return paper.FIGURE4_TOPK, paper.FIGURE4_RANDOM, paper.FIGURE4_KDIM


def table4(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    rows = []
    for task, (k, rate, p_dense, p_meprop) in paper.TABLE4.items():
        dense = find(paper_task=task, model="dense")
        meprop = find(paper_task=task, model="meprop")
        if dense is None and meprop is None:
            continue
        label = {"pos": "POS, PTB sample", "parsing": "Parsing (UAS)", "mnist": "MNIST"}[task]
        rows.append(
            _pair_rows(f"{label}, dropout {rate:g}, k={k}", dense, meprop, p_dense, p_meprop, out)
        )
    return markdown(PAIR_HEADER, rows)


def table5(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    rows = []
    for layers, (p_dense, p_meprop) in paper.TABLE5.items():
        dense, meprop = find(layers=layers, model="dense"), find(layers=layers, model="meprop")
        if dense is None and meprop is None:
            continue
        label = f"{layers} hidden layers, k={paper.TABLE5_K}"
        rows.append(_pair_rows(label, dense, meprop, p_dense, p_meprop, out))
    return markdown(PAIR_HEADER, rows)


def table6(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    rows = []
    for layers, (k, p_dense, p_meprop) in paper.TABLE6.items():
        dense, meprop = find(layers=layers, model="dense"), find(layers=layers, model="meprop")
        if dense is None and meprop is None:
            continue
        label = f"{layers} hidden layers, unified k={k}"
        rows.append(_pair_rows(label, dense, meprop, p_dense, p_meprop, out))
    return markdown(PAIR_HEADER, rows)


MESIMP_LABELS = {"mnist": "MNIST", "pos": "POS, PTB sample", "parsing": "Parsing (UAS)"}


def mesimp(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    rows = []
    for task, p in paper.MESIMP.items():
        dense = find(paper_task=task, model="dense")
        for result in results:
            key = result.cell.key
            if key.get("model") != "mesimp" or key.get("paper_task") != task:
                continue
            paper_diff = p["test"] - p["dense_test"]
            diff, spread, text = compare(dense, result, "test", paper_diff)
            size = result.stat("size")
            rows.append(
                [
                    f"{MESIMP_LABELS[task]}, meSimp k={p['k']:.0f}, {key.get('mode')}",
                    f"{p['dimension']:.0f} ({100 * p['dimension'] / p['hidden']:.1f}%)",
                    linked(fmt_stat(size, 1), result, out) + seeds_note(result),
                    fmt_paper(p["dense_test"]),
                    cell_text(dense, "test", out),
                    fmt_paper(p["test"]),
                    cell_text(result, "test", out),
                    f"{fmt(paper_diff, sign=True)} / {fmt(diff, sign=True)}"
                    + ("" if spread is None else f" (spread {spread:.2f})"),
                    text,
                    f"{run_links(dense, out)} / {run_links(result, out)}",
                ]
            )
    header = [
        "setting",
        "paper hidden size",
        "ours: mean hidden size at the best dev epoch",
        "paper dense",
        "ours dense",
        "paper meSimp",
        "ours meSimp",
        "Δ vs dense (paper / ours)",
        "verdict: meSimp no worse than dense",
        "runs (dense / meSimp)",
    ]
    return "\n\n".join(
        [
            "The authors' meSimp table (README of their meSimp repository) beside ours; each "
            "dense arm has the meSimp arm's flags but k = 0 and no meSimp, and the same "
            "schedule. Hidden size: units kept per hidden layer, averaged over the layers.",
            markdown(header, rows),
        ]
    )


def feedback(results: Sequence[CellResult], out: Path) -> str:
    find = finder(results)
    rows = []
    for k in sorted({int(r.cell.key["k"]) for r in results}):
        plain, fb = find(model="plain", k=k), find(model="feedback", k=k)
        diff, spread, text = compare(plain, fb, "test", 1.0)
        rows.append(
            [
                str(k),
                cell_text(plain, "test", out),
                cell_text(fb, "test", out),
                fmt(diff, sign=True) + ("" if spread is None else f" (spread {spread:.2f})"),
                text,
                f"{run_links(plain, out)} / {run_links(fb, out)}",
            ]
        )
    header = ["k", "plain meProp test", "with error feedback", "Δ", "verdict: feedback helps"]
    return "\n\n".join(
        [
            "Not in the paper: the claim checked is this project's (feedback raises accuracy).",
            markdown([*header, "runs (plain / feedback)"], rows),
        ]
    )


RENDERERS = {
    "table1": table1,
    "figure4": figure4,
    "table4": table4,
    "table5": table5,
    "table6": table6,
    "mesimp": mesimp,
    "feedback": feedback,
    "speed": speed,
}
