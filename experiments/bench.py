"""Wall-clock benchmarks of meProp's backward pass against dense backprop.

Run as ``python -m experiments.bench``. The ``layer`` section times the backward pass of one
linear layer ``y = x W + b`` -- the VJP that returns ``dx``, ``dW`` and ``db`` for a random
cotangent ``g`` -- for dense backprop (``k = 0``) and for each meProp mode, on a grid of
``(batch, in, out, k)``. For every configuration it also times the forward pass alone, so the
two can be compared: the timed backward is ``jit(lambda x, W, b, g: vjp(f, x, W, b)[1](g))``,
whose forward output is unused and removed by XLA (the residuals of a linear layer are its
inputs), and XLA's own flop estimate, printed beside each row, confirms that a dense backward
costs two forward-sized products, not three.

Every backward call returns a fresh dense ``[in, out]`` ``dW`` (meProp's, too, is zero outside
the kept columns), and producing it is not free: glibc's allocator serves a buffer above its
mmap threshold (at most 32 MiB by default) with a new ``mmap`` on every call, which is then
page-faulted in 4 KiB at a time -- at ``in = out = 4096`` in float32 (64 MiB) that is 16385
faults per call and most of the unified backward's time. Starting Python with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296``
keeps such buffers in the heap and removes the faults (for dense and meProp alike); the
allocator-related environment is recorded in the JSON output.

All functions of one configuration are timed in the same run, interleaved call by call, so
that a change in the machine's load affects them alike; each row reports the median over
``--repeats`` calls after ``--warmup`` untimed calls, and ``speedup`` is the dense backward's
median divided by the row's median.

``--paper-table7`` runs the shape of the paper's GPU measurement (Sun et al. 2017, Table 7:
batch 1024, ``in = out = 8192``) and prints the published speedups beside ours.

Other sections (e.g. a whole training step) plug in through :data:`SECTIONS`: a function
``(args) -> list[Record]`` built on :func:`time_fns` / :func:`time_fn`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import meprop_jax

# (batch, in, out, k). (256, 4096, 4096, 32) is the acceptance case.
DEFAULT_GRID: tuple[tuple[int, int, int, int], ...] = (
    (50, 784, 500, 30),
    (50, 500, 500, 30),
    (10, 500, 500, 20),
    (256, 4096, 4096, 32),
    (256, 4096, 4096, 128),
)
QUICK_GRID: tuple[tuple[int, int, int, int], ...] = (
    (8, 64, 48, 4),
    (8, 64, 48, 12),
)
DEFAULT_MODES: tuple[str, ...] = ("unified", "per_example", "random")

# Sun et al. 2017, Table 7: one linear layer's backward on a GPU, batch 1024, in = out = 8192,
# unified top-k; speedup over the dense backward (308 ms).
PAPER_TABLE7_SHAPE = (1024, 8192, 8192)
PAPER_TABLE7_SPEEDUP: dict[int, float] = {
    8: 36.8,
    16: 33.6,
    32: 27.5,
    64: 21.4,
    128: 14.5,
    256: 8.0,
    512: 4.4,
}
PAPER_TABLE7_DENSE_MS = 308.0

DENSE = "dense"
FORWARD = "forward"


@dataclasses.dataclass(frozen=True)
class Stats:
    """Timings of one function, in milliseconds."""

    median_ms: float
    min_ms: float
    times_ms: tuple[float, ...]

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> Stats:
        ms = tuple(1e3 * s for s in seconds)
        return cls(statistics.median(ms), min(ms), ms)


@dataclasses.dataclass
class Record:
    """One timed (configuration, mode) row.

    ``mode`` is ``"dense"`` for the ordinary backward, ``"forward"`` for the forward pass
    alone, or a meProp mode. ``ratio_vs_dense`` is the dense backward's median time divided by
    this row's median (so ``1.0`` for the dense row). ``extra`` holds section-specific values
    (XLA's flop estimate, the paper's speedup, ...).
    """

    section: str
    batch: int
    d_in: int
    d_out: int
    k: int
    mode: str
    dtype: str
    median_ms: float
    min_ms: float
    times_ms: list[float]
    ratio_vs_dense: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _block(tree: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.block_until_ready()


def time_fns(
    fns: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]],
    repeats: int,
    warmup: int,
) -> dict[str, Stats]:
    """Times several functions, interleaved call by call.

    Args:
      fns: name -> ``(fn, args)``; each ``fn(*args)`` returns arrays (any pytree).
      repeats: timed calls of each function.
      warmup: untimed calls of each function first (compilation, caches, thread pools).

    Returns:
      name -> :class:`Stats`. Every call is waited for with ``block_until_ready``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for fn, args in fns.values():
        for _ in range(warmup):
            _block(fn(*args))
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            start = time.perf_counter()
            _block(fn(*args))
            seconds[name].append(time.perf_counter() - start)
    return {name: Stats.from_seconds(s) for name, s in seconds.items()}


def time_fn(fn: Callable[..., Any], args: Sequence[Any], repeats: int, warmup: int) -> Stats:
    """Median/min/all wall-clock times of ``fn(*args)`` (see :func:`time_fns`)."""
    return time_fns({"fn": (fn, args)}, repeats, warmup)["fn"]


def _compile(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[..., Any], float]:
    """Ahead-of-time compiles ``jit(fn)`` for ``args``; returns it and XLA's flop estimate."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        flops = float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort and backend-dependent
        flops = float("nan")
    return compiled, flops


# ----------------------------------------------------------------------------------------
# Section "layer": backward of one linear layer.
# ----------------------------------------------------------------------------------------


def layer_forward_fn() -> Callable[..., jax.Array]:
    """``(x, W, b) -> x W + b``, the (unchanged) forward pass."""
    return lambda x, w, b: meprop_jax.linear(x, w, b, k=0)


def layer_grad_fn(k: int, mode: str) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """``(x, W, b, g, key) -> (dx, dW, db)``: the VJP of one meProp linear layer.

    ``k = 0`` is dense backprop. ``key`` is the PRNG key of ``mode="random"`` (an argument, so
    that the random mask is drawn at run time rather than folded into a constant) and is
    ignored by the other modes.
    """

    def grads(x, w, b, g, key):
        def f(x, w, b):
            return meprop_jax.linear(x, w, b, k=k, mode=mode, key=key)

        _, vjp_fn = jax.vjp(f, x, w, b)
        return vjp_fn(g)

    return grads


def layer_data(
    batch: int, d_in: int, d_out: int, dtype: Any, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fresh standard-normal ``(x, W, b, g)`` and a PRNG key for the random mode."""
    kx, kw, kb, kg, kr = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(kx, (batch, d_in), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d_in, d_out), jnp.float32) * d_in**-0.5).astype(dtype)
    b = jax.random.normal(kb, (d_out,), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (batch, d_out), jnp.float32).astype(dtype)
    _block((x, w, b, g))
    return x, w, b, g, kr


def bench_layer_shape(
    batch: int,
    d_in: int,
    d_out: int,
    ks: Sequence[int],
    modes: Sequence[str],
    *,
    repeats: int,
    warmup: int,
    dtype: str = "float32",
    seed: int = 0,
    paper_speedups: Mapping[int, float] | None = None,
) -> list[Record]:
    """Times, on one data set, the forward pass, the dense backward and each (k, mode) backward.

    Returns records in the order dense, then each ``k`` with its modes, then forward.
    """
    x, w, b, g, key = layer_data(batch, d_in, d_out, jnp.dtype(dtype), seed)
    grad_args = (x, w, b, g, key)
    fwd, fwd_flops = _compile(layer_forward_fn(), (x, w, b))
    dense, dense_flops = _compile(layer_grad_fn(0, "unified"), grad_args)
    fns: dict[Any, tuple[Callable[..., Any], Sequence[Any]]] = {
        DENSE: (dense, grad_args),
        FORWARD: (fwd, (x, w, b)),
    }
    flops: dict[Any, float] = {DENSE: dense_flops, FORWARD: fwd_flops}
    for k in ks:
        for mode in modes:
            fn, flops[k, mode] = _compile(layer_grad_fn(k, mode), grad_args)
            fns[k, mode] = (fn, grad_args)
    stats = time_fns(fns, repeats, warmup)
    dense_ms = stats[DENSE].median_ms
    paper_speedups = paper_speedups or {}

    def record(name: Any, k: int, mode: str) -> Record:
        s = stats[name]
        extra: dict[str, Any] = {"gflop": flops[name] / 1e9}
        if k:
            extra["ideal_speedup"] = d_out / k
            if k in paper_speedups:
                extra["paper_speedup"] = paper_speedups[k]
        return Record(
            section="layer",
            batch=batch,
            d_in=d_in,
            d_out=d_out,
            k=k,
            mode=mode,
            dtype=str(jnp.dtype(dtype)),
            median_ms=s.median_ms,
            min_ms=s.min_ms,
            times_ms=list(s.times_ms),
            ratio_vs_dense=dense_ms / s.median_ms,
            extra=extra,
        )

    records = [record(DENSE, 0, DENSE)]
    records += [record((k, mode), k, mode) for k in ks for mode in modes]
    records.append(record(FORWARD, 0, FORWARD))
    return records


def layer_grid(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    if args.paper_table7:
        batch, d_in, d_out = PAPER_TABLE7_SHAPE
        return [(batch, d_in, d_out, k) for k in PAPER_TABLE7_SPEEDUP]
    if args.grid:
        return list(args.grid)
    return list(QUICK_GRID if args.quick else DEFAULT_GRID)


def run_layer_section(args: argparse.Namespace) -> list[Record]:
    """Section ``layer``: configurations of one shape share their data and dense timing."""
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for batch, d_in, d_out, k in layer_grid(args):
        ks = shapes.setdefault((batch, d_in, d_out), [])
        if k not in ks:
            ks.append(k)
    modes = args.modes or (("unified",) if args.paper_table7 else DEFAULT_MODES)
    paper = PAPER_TABLE7_SPEEDUP if args.paper_table7 else None
    records: list[Record] = []
    for i, ((batch, d_in, d_out), ks) in enumerate(shapes.items()):
        rows = bench_layer_shape(
            batch,
            d_in,
            d_out,
            ks,
            modes,
            repeats=args.repeats,
            warmup=args.warmup,
            dtype=args.dtype,
            seed=args.seed + i,
            paper_speedups=paper,
        )
        records.extend(rows)
        if not args.no_progress:
            print(format_table(rows, header=i == 0), flush=True)
    return records


# Further sections (e.g. "train": forward + backward + optimizer update of whole MLPs) are
# added here; each maps the parsed arguments to a list of records.
SECTIONS: dict[str, Callable[[argparse.Namespace], list[Record]]] = {
    "layer": run_layer_section,
}


# ----------------------------------------------------------------------------------------
# Output: table, JSON, plot.
# ----------------------------------------------------------------------------------------


# Minimum column widths, so that tables printed shape by shape line up.
_MIN_WIDTH = {"batch": 5, "in": 5, "out": 5, "k": 4, "mode": 11, "dtype": 8, "median ms": 10}
_MIN_WIDTH |= {"min ms": 10, "GFLOP": 7, "speedup": 8, "ideal": 7, "paper": 6}


def format_table(records: Sequence[Record], header: bool = True) -> str:
    """An aligned text table of the records, one line per record."""
    show_paper = any("paper_speedup" in r.extra for r in records)
    cols = ["batch", "in", "out", "k", "mode", "dtype", "median ms", "min ms", "GFLOP"]
    cols += ["speedup", "ideal"] + (["paper"] if show_paper else [])
    rows = []
    for r in records:
        ideal = r.extra.get("ideal_speedup")
        row = [
            str(r.batch),
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
        # The allocator decides whether each call's fresh output buffers page-fault (see the
        # module docstring), and XLA_FLAGS may change the compiled code: both are recorded.
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
        "records": [dataclasses.asdict(r) for r in records],
    }
    if args.paper_table7:
        payload["paper_table7"] = {
            "shape": list(PAPER_TABLE7_SHAPE),
            "dense_ms": PAPER_TABLE7_DENSE_MS,
            "speedup": {str(k): v for k, v in PAPER_TABLE7_SPEEDUP.items()},
        }
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
    ax.set_ylabel("backward speedup over dense")
    backend = jax.default_backend()
    ax.set_title(f"one layer backward, batch {batch}, {d_in}x{d_out}, {dtype}, {backend}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------


def _grid_entry(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts[:3]) < 1 or parts[3] < 1:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxINxOUTxK with positive ints, e.g. 256x4096x4096x32; got {text!r}"
        )
    return parts  # type: ignore[return-value]


def _mode(text: str) -> str:
    try:
        return meprop_jax.MODES[meprop_jax.MODES.index(text.replace("-", "_"))]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown mode {text!r}; choose from {', '.join(meprop_jax.MODES)}"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="Time meProp's sparsified backward pass against dense backprop.",
    )
    p.add_argument(
        "--section", choices=sorted(SECTIONS), default="layer", help="what to time (layer)"
    )
    p.add_argument(
        "--grid",
        type=_grid_entry,
        action="append",
        metavar="BxINxOUTxK",
        help="a (batch, in, out, k) configuration, e.g. 256x4096x4096x32; repeatable",
    )
    p.add_argument(
        "--paper-table7",
        action="store_true",
        help="the paper's GPU shape: batch 1024, in=out=8192, k=8..512 (unified only)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny grid (for tests)")
    p.add_argument(
        "--modes",
        type=_mode,
        nargs="+",
        metavar="MODE",
        help="meProp modes to time besides dense (default: all; unified for --paper-table7)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 11; 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="draw speedup vs k (PNG) here")
    p.add_argument("--no-progress", action="store_true", help="print the table once, at the end")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick or args.paper_table7 else 11
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.paper_table7 else 2
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> list[Record]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    env = environment()
    print(
        f"jax {env['jax_version']}, backend {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, load {env['load_average']}, "
        f"{args.repeats} repeats after {args.warmup} warm-up",
        flush=True,
    )
    records = SECTIONS[args.section](args)
    if args.no_progress:
        print(format_table(records))
    if args.out:
        write_json(args.out, args, records, argv)
        print(f"wrote {args.out}")
    if args.plot:
        plot_speedup(args.plot, records, paper=args.paper_table7)
        print(f"wrote {args.plot}")
    return records


if __name__ == "__main__":
    main()
