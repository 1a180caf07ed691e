"""Output of the benchmarks: text tables, memory comparison, JSON and plots.

Tables print ``peak MiB`` (a compiled program's most memory at once, less the input batches
every variant reads alike; see :func:`experiments.bench.harness.memory_stats`) and
``temp MiB``; :func:`memory_report` checks that the compact (sparse-update) path needs no more
than dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

import meprop_jax
from experiments.bench.harness import DENSE, FORWARD, RATIO_KIND, Record
from experiments.bench.layer import PAPER_TABLE7_DENSE_MS, PAPER_TABLE7_SHAPE, PAPER_TABLE7_SPEEDUP
from experiments.bench.mesimp import DECODE_EXPORTED, MESIMP, ROWS, TRAIN_ROWS
from experiments.bench.steps import FWD_BWD, STEP_VARIANTS


def _mib(n_bytes: float | None) -> str:
    return "" if n_bytes is None else f"{n_bytes / 2**20:.2f}"


def memory_report(records: Sequence[Record]) -> str:
    """Lines comparing the peak memory of the compact (sparse-update) rows with dense's and
    with the masked-dense rows of the same meProp mode, per shape and mode."""
    lines = []
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for r in records:
        key = (r.section, r.batch, r.d_in, r.d_out, tuple(r.extra.get("sizes", ())))
        groups.setdefault(key, []).append(r)
    for (section, batch, d_in, d_out, sizes), rows in groups.items():
        peak = {(r.mode, r.k): (r.extra.get("memory") or {}).get("peak") for r in rows}
        dense = peak.get((DENSE, 0))
        shape = "-".join(map(str, sizes)) if sizes else f"{d_in}x{d_out}"
        by_mode: dict[str, list[tuple[int, int, int | None]]] = {}
        for (mode, k), value in peak.items():
            if _is_compact(mode) and value:
                base = mode.rsplit("+", 1)[0]
                masked = peak.get((f"{base}+adam", k)) or peak.get((base, k))
                by_mode.setdefault(base, []).append((k, value, masked))
        if not dense:
            continue
        for base, entries in by_mode.items():
            worst = max(entries, key=lambda e: e[1])
            ks = ",".join(str(k) for k, _, _ in entries)
            verdict = "OK, not above dense" if worst[1] <= dense else "ABOVE DENSE"
            masked = [m for _, _, m in entries if m]
            vs_masked = (
                f"; the masked dense gradient ({base}) peaks at {_mib(min(masked))}"
                f"-{_mib(max(masked))} MiB"
                if masked
                else ""
            )
            lines.append(
                f"memory ({section}, {shape}, batch {batch}, {base}, k={ks}): dense peak "
                f"{_mib(dense)} MiB, compact peak {_mib(min(e[1] for e in entries))}-"
                f"{_mib(worst[1])} MiB ({worst[1] / dense:.2f}x dense at most){vs_masked}: "
                f"{verdict}"
            )
    return "\n".join(lines)


def _is_compact(mode: str) -> bool:
    return mode.endswith(("+sparse_adam", "+sparse"))


# Minimum column widths, so that tables printed shape by shape line up.
_MIN_WIDTH = {"batch": 5, "in": 5, "out": 5, "k": 4, "mode": 11, "dtype": 8, "median ms": 10}
_MIN_WIDTH |= {"min ms": 10, "GFLOP": 7, "speedup": 8, "ideal": 7, "paper": 6}
_MIN_WIDTH |= {"peak MiB": 9, "temp MiB": 9}


def layer_table_modes() -> frozenset[str]:
    """The modes a row of :func:`format_table` may have: dense, forward, every meProp mode and
    its ``+adam`` / ``+sparse_adam`` variants (section ``layer+update``)."""
    modes = meprop_jax.MODES
    variants = {f"{m}{suffix}" for m in modes for suffix in ("+adam", "+sparse_adam")}
    return frozenset({DENSE, FORWARD, *modes, *variants})


def steps_table_modes() -> frozenset[str]:
    """The modes a row of :func:`format_steps_table` may have."""
    return frozenset({FORWARD, *STEP_VARIANTS, *(v + FWD_BWD for v in STEP_VARIANTS)})


def _check_modes(records: Sequence[Record], known: frozenset[str], table: str) -> None:
    # A row of another table (or a misspelt mode) would print with a meaningless speedup.
    for r in records:
        if r.mode not in known:
            raise ValueError(
                f"{table} table: unknown mode {r.mode!r} (section {r.section!r}); "
                f"expected one of {', '.join(sorted(known))}"
            )


def format_table(records: Sequence[Record], header: bool = True) -> str:
    """An aligned text table of the records, one line per record.

    Raises:
      ValueError: a record's mode is not one of :func:`layer_table_modes`.
    """
    _check_modes(records, layer_table_modes(), "layer")
    show_paper = any("paper_speedup" in r.extra for r in records)
    show_memory = any(r.extra.get("memory") for r in records)
    # Convolution rows (section conv) also name their image size.
    show_spatial = any("spatial" in r.extra for r in records)
    cols = ["batch", *(["size"] if show_spatial else []), "in", "out", "k", "mode", "dtype"]
    cols += ["median ms", "min ms", "GFLOP"]
    cols += ["speedup", "ideal"] + (["paper"] if show_paper else [])
    cols += ["peak MiB", "temp MiB"] if show_memory else []
    rows = []
    for r in records:
        ideal = r.extra.get("ideal_speedup")
        row = [
            str(r.batch),
            *(["x".join(map(str, r.extra.get("spatial", ())))] if show_spatial else []),
            str(r.d_in),
            str(r.d_out),
            str(r.k) if r.k else "-",
            r.mode,
            r.dtype,
            f"{r.median_ms:.3f}",
            f"{r.min_ms:.3f}",
            f"{r.extra.get('gflop', float('nan')):.3g}",
            f"{r.ratio_vs_dense:.2f}x",
            f"{ideal:.1f}x" if r.k and ideal else "",
        ]
        if show_paper:
            paper = r.extra.get("paper_speedup")
            row.append(f"{paper:.1f}x" if paper else "")
        if show_memory:
            memory = r.extra.get("memory") or {}
            row += [_mib(memory.get("peak")), _mib(memory.get("temp"))]
        rows.append(row)
    widths = [
        max(len(c), _MIN_WIDTH.get(c, 0), *(len(row[i]) for row in rows))
        for i, c in enumerate(cols)
    ]
    left = {"mode", "dtype"}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if name in left else c.rjust(w)
            for c, w, name in zip(cells, widths, cols, strict=True)
        ).rstrip()

    lines = [fmt(cols), fmt(["-" * w for w in widths])] if header else []
    return "\n".join(lines + [fmt(row) for row in rows])


def format_steps_table(records: Sequence[Record], rounds: int | None = None) -> str:
    """The ``steps`` records of one MLP as a table: a line per training variant with its
    per-step time, forward+backward and update estimates, speedup over dense, fraction of the
    bound and memory; then the forward pass (whose speedup is the bound).

    Raises:
      ValueError: a record's mode is not one of :func:`steps_table_modes`.
    """
    _check_modes(records, steps_table_modes(), "steps")
    by_mode = {r.mode: r for r in records}
    first = records[0]
    sizes = "-".join(map(str, first.extra.get("sizes", (first.d_in, first.d_out))))
    k = max(r.k for r in records)
    head = (
        f"MLP {sizes}, batch {first.batch}, k {k}: per training step, median of "
        f"{rounds or len(first.times_ms)} interleaved calls of "
        f"{first.extra.get('steps_per_call')} scanned steps"
    )
    cols = ["variant", "update", "step ms", "min ms", "fwd+bwd ms", "update ms"]
    cols += ["speedup", "of bound", "peak MiB", "temp MiB"]
    rows = []
    for name in (*STEP_VARIANTS, FORWARD):
        r = by_mode.get(name)
        if r is None:
            continue
        e = r.extra
        memory = e.get("memory") or {}
        fwd_bwd, update = e.get("fwd_bwd_ms"), e.get("update_ms")
        rows.append(
            [
                "forward (bound)" if name == FORWARD else name,
                e.get("update") or "-",
                f"{r.median_ms:.3f}",
                f"{r.min_ms:.3f}",
                "" if fwd_bwd is None else f"{fwd_bwd:.3f}",
                "" if update is None else f"{update:.3f}",
                f"{r.ratio_vs_dense:.2f}x",
                f"{100 * e['fraction_of_bound']:.0f}%" if "fraction_of_bound" in e else "",
                _mib(memory.get("peak")),
                _mib(memory.get("temp")),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [head, fmt(cols), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(row) for row in rows])


def mesimp_verdicts(records: Sequence[Record]) -> list[str]:
    """One line per target of the ``mesimp`` section: the pruned step over dense, and the
    exported model's decoding over the full model's."""
    by_mode = {r.mode: r for r in records}
    lines = []
    step, decode = by_mode.get(MESIMP), by_mode.get(DECODE_EXPORTED)
    if step is not None:
        bound = step.extra["bound"]
        lines.append(
            f"meSimp step: {step.ratio_vs_dense:.2f}x dense (target >= "
            f"{step.extra['target']:.1f}x: {'met' if step.extra['meets_target'] else 'NOT MET'}"
            f"; meProp's bound dense / forward {bound:.2f}x: "
            f"{'beaten' if step.ratio_vs_dense > bound else 'not beaten'})"
        )
    if decode is not None:
        verdict = "met" if decode.extra["meets_target"] else "NOT MET"
        lines.append(
            f"decoding: exported {'-'.join(map(str, decode.extra['sizes']))} "
            f"{decode.ratio_vs_dense:.2f}x the full model (target >= "
            f"{decode.extra['target']:.1f}x: {verdict})"
        )
    return lines


def format_mesimp_table(records: Sequence[Record], rounds: int | None = None) -> str:
    """The ``mesimp`` records as a table: a line per row with its model, time, speedup over
    its reference (``dense`` for training steps, ``decode:full`` for decoding) and memory;
    then the verdicts of :func:`mesimp_verdicts`.

    Raises:
      ValueError: a record's mode is not one of the section's rows.
    """
    _check_modes(records, frozenset(ROWS), "mesimp")
    first = records[0]
    full = "-".join(map(str, first.extra["full_sizes"]))
    units = next((r.extra["units"] for r in records if "units" in r.extra), None)
    kept = f"; meSimp keeps {','.join(map(str, units))} units" if units else ""
    head = (
        f"meSimp vs MLP {full}, batch {first.batch}{kept}: median of "
        f"{rounds or len(first.times_ms)} interleaved calls; training rows per step, "
        f"decoding rows per pass"
    )
    cols = ["row", "model", "k", "per", "median ms", "min ms", "speedup", "vs", "peak MiB"]
    rows = []
    for r in records:
        e = r.extra
        model = "-".join(map(str, e["sizes"]))
        if e.get("masked"):
            model += " masked"
        rows.append(
            [
                "forward (bound)" if r.mode == FORWARD else r.mode,
                model,
                str(r.k) if r.k else "-",
                f"{e['per']} ({e.get('examples', r.batch)})",
                f"{r.median_ms:.3f}",
                f"{r.min_ms:.3f}",
                f"{r.ratio_vs_dense:.2f}x",
                e["reference"],
                _mib((e.get("memory") or {}).get("peak")),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if cols[i] in ("row", "model", "per", "vs") else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [head, fmt(cols), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(row) for row in rows] + mesimp_verdicts(records))


def environment() -> dict[str, Any]:
    """Where and when the benchmark ran."""
    device = jax.devices()[0]
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # The allocator decides whether each call's fresh output buffers page-fault (see
        # experiments.bench.cli), and XLA_FLAGS may change the compiled code: both are recorded.
        "env": {
            name: os.environ[name]
            for name in sorted(os.environ)
            if name.startswith(("GLIBC_TUNABLES", "MALLOC_", "XLA_FLAGS", "LD_PRELOAD"))
        },
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def write_json(
    path: Path, args: argparse.Namespace, records: Sequence[Record], argv: Sequence[str]
) -> None:
    args_dict = {
        k: str(v) if isinstance(v, Path) else [list(e) for e in v] if k == "grid" and v else v
        for k, v in vars(args).items()
    }
    payload: dict[str, Any] = {
        **environment(),
        "argv": list(argv),
        "args": args_dict,
        "ratio": RATIO_KIND,
        "records": [dataclasses.asdict(r) for r in records],
    }
    if args.paper_table7:
        payload["paper_table7"] = {
            "shape": list(PAPER_TABLE7_SHAPE),
            "dense_ms": PAPER_TABLE7_DENSE_MS,
            "speedup": {str(k): v for k, v in PAPER_TABLE7_SPEEDUP.items()},
        }
    report = memory_report(records)
    if report:
        payload["memory_report"] = report.splitlines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_speedup(path: Path, records: Sequence[Record], paper: bool = False) -> None:
    """Speedup over dense vs ``k`` for the shape with the most ``k`` values.

    Draws one line per mode, the ideal ``out / k`` and, with ``paper``, the paper's GPU
    speedups (Table 7).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sparse = [r for r in records if r.mode not in (DENSE, FORWARD)]
    if not sparse:
        raise ValueError("no meProp rows to plot")
    shapes: dict[tuple[int, int, int, str], set[int]] = {}
    for r in sparse:
        shapes.setdefault((r.batch, r.d_in, r.d_out, r.dtype), set()).add(r.k)
    shape = max(shapes, key=lambda s: len(shapes[s]))  # first shape among equals
    batch, d_in, d_out, dtype = shape
    rows = [r for r in sparse if (r.batch, r.d_in, r.d_out, r.dtype) == shape]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ks = sorted(shapes[shape])
    for mode in dict.fromkeys(r.mode for r in rows):
        pts = sorted((r.k, r.ratio_vs_dense) for r in rows if r.mode == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{mode} (this machine)")
    ax.plot(ks, [d_out / k for k in ks], "k--", lw=1, label="ideal out/k")
    if paper:
        pk = sorted(PAPER_TABLE7_SPEEDUP)
        ax.plot(pk, [PAPER_TABLE7_SPEEDUP[k] for k in pk], "s:", label="paper, GPU (Table 7)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("k")
    update = any(r.section == "layer+update" for r in rows)
    what = "backward + Adam update" if update else "backward"
    ax.set_ylabel(f"{what} speedup over dense")
    backend = jax.default_backend()
    if rows[0].section == "conv":
        size = "x".join(map(str, rows[0].extra["spatial"]))
        where = f"one 3x3 convolution {what}\nbatch {batch}, {size}, {d_in}->{d_out} channels"
    else:
        where = f"one layer {what}\nbatch {batch}, {d_in}x{d_out}"
    ax.set_title(f"{where}, {dtype}, {backend}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(path: Path, records: Sequence[Record]) -> None:
    """Whole-step speedup over dense per MLP: a bar per training variant, the bound
    (dense / forward) as a dashed line over each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs: dict[tuple[Any, ...], dict[str, Record]] = {}
    for r in records:
        if r.section == "steps":
            key = (tuple(r.extra.get("sizes", ())), r.batch)
            configs.setdefault(key, {})[r.mode] = r
    if not configs:
        raise ValueError("no steps records to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    width = 0.8 / len(STEP_VARIANTS)
    for i, variant in enumerate(STEP_VARIANTS):
        xs = [j + (i - (len(STEP_VARIANTS) - 1) / 2) * width for j in range(len(configs))]
        ys = [rows[variant].ratio_vs_dense if variant in rows else 0 for rows in configs.values()]
        bars = ax.bar(xs, ys, width, label=variant)
        ax.bar_label(bars, fmt="%.2fx", fontsize="small")
    for j, rows in enumerate(configs.values()):
        bound = rows[FORWARD].ratio_vs_dense if FORWARD in rows else None
        if bound:
            label = "bound: dense / forward" if j == 0 else None
            ax.hlines(bound, j - 0.45, j + 0.45, colors="k", linestyles="--", label=label)
    labels = []
    for (sizes, batch), rows in configs.items():
        k = max(r.k for r in rows.values())
        labels.append(f"{'-'.join(map(str, sizes))}\nbatch {batch}, k {k}")
    ax.set_xticks(range(len(configs)), labels)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("training step speedup over dense")
    ax.set_title(f"whole training step (forward + backward + Adam), {jax.default_backend()}")
    ax.set_ylim(0, 1.15 * ax.get_ylim()[1])
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mesimp(path: Path, records: Sequence[Record]) -> None:
    """Two bar charts: training-step speedups over dense (with meProp's bound and the step
    target) and decoding speedups over the full model (with the decoding target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.section == MESIMP]
    if not rows:
        raise ValueError("no mesimp records to plot")
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.4), width_ratios=(5, 3))
    for ax, train in zip(axes, (True, False), strict=True):
        part = [r for r in rows if (r.mode in TRAIN_ROWS) == train]
        labels = [f"{r.mode}\n{'-'.join(map(str, r.extra['sizes'][1:-1]))}" for r in part]
        bars = ax.bar(range(len(part)), [r.ratio_vs_dense for r in part])
        ax.bar_label(bars, fmt="%.2fx", fontsize="small")
        ax.set_xticks(range(len(part)), labels, fontsize="small")
        ax.axhline(1.0, color="grey", lw=0.8)
        for r in part:
            target = r.extra.get("target")
            if target:
                ax.axhline(target, color="r", ls=":", label=f"target {target:g}x")
        if train and part:
            ax.axhline(part[0].extra["bound"], color="k", ls="--", label="bound: dense / forward")
        ax.set_ylabel("speedup over dense step" if train else "speedup over full model")
        ax.set_title("training step" if train else "decoding")
        ax.set_ylim(0, 1.2 * ax.get_ylim()[1])
        ax.legend(fontsize="small", loc="upper left")
    full = "-".join(map(str, rows[0].extra["full_sizes"]))
    fig.suptitle(f"meSimp vs MLP {full}, {jax.default_backend()}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
