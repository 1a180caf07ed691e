"""Command line of the benchmarks: ``python -m experiments.bench``.

Wall-clock benchmarks of meProp's backward pass against dense backprop, in sections, each
a module of this package: ``layer`` (one layer's backward, or with ``--with-update`` also its
Adam update), ``steps`` (whole MNIST MLP training steps), ``mesimp`` (the MLP pruned by
meSimp), ``conv`` (a 3x3 convolution's backward), ``per_example`` (the paper's CPU
setting) and ``transformer`` (one Transformer encoder block's training step). Timing is
interleaved call by call (``harness``); tables, JSON and plots come from ``report``.

``--paper-table7`` runs the shape of the paper's GPU measurement (Sun et al. 2017, Table 7:
batch 1024, ``in = out = 8192``) and prints the published speedups beside ours.

Every backward call returns a fresh dense ``[in, out]`` ``dW`` (meProp's, too, is zero outside
the kept columns), and producing it is not free: glibc serves a large block requested from one
of XLA's worker threads with a new ``mmap`` on every call, which is then page-faulted in 4 KiB
at a time -- at ``in = out = 4096`` in float32 (64 MiB) that is 16385 faults per call and most
of the unified backward's time. ``--reuse-memory`` runs the benchmark again under
:data:`REUSE_MEMORY_TUNABLES` (one malloc arena and high mmap and trim thresholds) merged into
any ``GLIBC_TUNABLES`` already set (see :func:`merge_tunables`), which keeps such buffers in the
heap and removes the faults, for dense and meProp alike; the allocator-related environment the
run saw is recorded in the JSON output (``env``).

Sections plug in through :data:`SECTIONS`: a function ``(args) -> list[Record]`` built on
:func:`experiments.bench.harness.time_fns`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.bench import flags, transformer
from experiments.bench.conv import bench_conv_shape, conv_configs, conv_entry
from experiments.bench.harness import Record
from experiments.bench.layer import (
    DEFAULT_GRID,
    DEFAULT_MODES,
    PAPER_TABLE7_SHAPE,
    PAPER_TABLE7_SPEEDUP,
    QUICK_GRID,
    bench_layer_shape,
    bench_layer_update_shape,
)
from experiments.bench.mesimp import PAPER_CONFIG, QUICK_CONFIG, MeSimpConfig, bench_mesimp
from experiments.bench.per_example import bench_per_example, format_per_example
from experiments.bench.report import (
    environment,
    format_mesimp_table,
    format_steps_table,
    format_table,
    memory_report,
    plot_mesimp,
    plot_speedup,
    plot_steps,
    write_json,
)
from experiments.bench.steps import QUICK_STEP_CONFIGS, STEP_CONFIGS, bench_steps_config
from experiments.common.cli import OneLineErrorParser


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
    bench_shape = bench_layer_update_shape if args.with_update else bench_layer_shape
    for i, ((batch, d_in, d_out), ks) in enumerate(shapes.items()):
        rows = bench_shape(
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
    if args.with_update and not args.no_progress:
        print(memory_report(records), flush=True)
    return records


def steps_configs(args: argparse.Namespace) -> list[tuple[tuple[int, ...], int, int, int]]:
    if args.mlp:
        return list(args.mlp)
    return list(QUICK_STEP_CONFIGS if args.quick else STEP_CONFIGS)


def run_steps_section(args: argparse.Namespace) -> list[Record]:
    """Section ``steps``: whole training steps per MLP configuration."""
    mode = (args.modes or ["unified"])[0]
    records: list[Record] = []
    for i, (sizes, batch, k, steps) in enumerate(steps_configs(args)):
        rows = bench_steps_config(
            sizes,
            batch,
            k,
            steps,
            repeats=args.repeats,
            warmup=args.warmup,
            mode=mode,
            seed=args.seed + i,
        )
        records.extend(rows)
        if not args.no_progress:
            print(format_steps_table(rows, args.repeats), flush=True)
    if not args.no_progress:
        print(memory_report(records), flush=True)
    return records


def mesimp_config(args: argparse.Namespace) -> MeSimpConfig:
    cfg = QUICK_CONFIG if args.quick else PAPER_CONFIG
    return dataclasses.replace(cfg, units=tuple(args.mesimp_sizes)) if args.mesimp_sizes else cfg


def run_mesimp_section(args: argparse.Namespace) -> list[Record]:
    """Section ``mesimp``: the pruned network's step and decoding against the full one's."""
    mode = (args.modes or ["unified"])[0]
    cfg = mesimp_config(args)
    records = bench_mesimp(cfg, repeats=args.repeats, warmup=args.warmup, mode=mode, seed=args.seed)
    if not args.no_progress:
        print(format_mesimp_table(records, args.repeats), flush=True)
    return records


def run_conv_section(args: argparse.Namespace) -> list[Record]:
    """Section ``conv``: one convolution's backward per shape, dense and meProp."""
    modes = args.modes or DEFAULT_MODES
    records: list[Record] = []
    for i, (batch, size, c_in, c_out, ks) in enumerate(conv_configs(args.conv_grid, args.quick)):
        rows = bench_conv_shape(
            batch,
            size,
            c_in,
            c_out,
            ks,
            modes,
            repeats=args.repeats,
            warmup=args.warmup,
            dtype=args.dtype,
            seed=args.seed + i,
        )
        records.extend(rows)
        if not args.no_progress:
            print(format_table(rows, header=i == 0), flush=True)
    return records


def run_per_example_section(args: argparse.Namespace) -> list[Record]:
    """Section ``per_example``: the paper's CPU setting (:mod:`experiments.bench.per_example`)."""
    records = bench_per_example(
        quick=args.quick, repeats=args.repeats, warmup=args.warmup, seed=args.seed
    )
    if not args.no_progress:
        print(format_per_example(records), flush=True)
    return records


# Sections map the parsed arguments to a list of records.
SECTIONS: dict[str, Callable[[argparse.Namespace], list[Record]]] = {
    "layer": run_layer_section,
    "steps": run_steps_section,
    "mesimp": run_mesimp_section,
    "conv": run_conv_section,
    "per_example": run_per_example_section,
    "transformer": transformer.run_transformer_section,
}
#: Sections with a flag of their own (``--steps`` for ``--section steps``, ...).
SECTION_FLAGS = ("steps", "mesimp", "conv", "per_example", "transformer")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(
        prog="python -m experiments.bench",
        description="Time meProp's sparsified backward pass against dense backprop: one "
        "layer's backward (default), its backward + Adam update (--with-update), whole "
        "training steps of the MNIST MLP (--steps), or the MLP pruned by meSimp (--mesimp).",
        epilog="Examples: python -m experiments.bench --steps --out bench_out/steps.json "
        "--plot bench_out/steps.png;  python -m experiments.bench --paper-table7 --with-update "
        "--out bench_out/table7_steps.json --plot bench_out/table7_steps.png",
    )
    p.add_argument(
        "--section",
        choices=sorted(SECTIONS),
        default="layer",
        help="what to time: layer (one layer; see --with-update), steps (see --steps), "
        "mesimp (see --mesimp), conv (see --conv), per_example (see --per-example) or "
        "transformer (see --transformer); default layer",
    )
    p.add_argument(
        "--steps",
        action="store_true",
        help="same as --section steps: whole training steps (forward + backward + Adam) of "
        "the MLPs 784-500-500-10 (batch 50, k 30) and 784-4096-4096-10 (batch 256, k 32): "
        "dense, meprop (masked dense gradient + optax Adam), meprop+sparse (compact gradients "
        "+ sparse_adam, as --sparse-update trains) and forward only, whose ratio to dense is "
        "the bound; with fwd+bwd rows for the update estimates and peak memory per variant",
    )
    p.add_argument(
        "--mesimp",
        action="store_true",
        help="same as --section mesimp: the MLP 784-500-500-10 (batch 100, k 160, Adam, clip "
        "5) pruned by meSimp to --mesimp-sizes units per hidden layer (padded to a multiple of "
        "16, masked, with its activity record): its training step against the full network's "
        "dense and meProp steps and forward pass, and decoding 10,000 examples (batches of "
        "1000) with the full, the padded and the exported stock model",
    )
    p.add_argument(
        "--conv",
        action="store_true",
        help="same as --section conv: one 3x3 convolution's backward (NHWC, SAME), dense and "
        "meProp over k output channels, on 28x28 32->64 and 14x14 64->128 channels (batch 64, "
        "k up to out/4), with the forward pass",
    )
    p.add_argument(
        "--per-example",
        action="store_true",
        help="same as --section per_example: the paper's CPU setting, per-example top-k at "
        "batch 10: layer backward (784->500, 500->500, k 20), backward + Adam, the LSTM gates "
        "(h 500, batch 8, k 5 and 10) and whole MNIST training steps, each against dense",
    )
    transformer.add_arguments(p)
    p.add_argument(
        "--conv-grid",
        type=conv_entry,
        action="append",
        metavar="BxSIZExINxOUTxK",
        help="a --conv configuration (SIZE x SIZE images), e.g. 64x28x32x64x8; repeatable",
    )
    p.add_argument(
        "--mesimp-sizes",
        type=flags.units_entry,
        metavar="UNITS,UNITS",
        help="surviving units of each hidden layer for --mesimp (default 154,154, the "
        "authors' MNIST result)",
    )
    p.add_argument(
        "--mlp",
        type=flags.mlp_entry,
        action="append",
        metavar="SIZES:BATCH:K[:STEPS]",
        help="a --steps configuration instead of the defaults, e.g. 784-4096-4096-10:256:32:5 "
        "(STEPS: minibatches scanned per timed call); repeatable",
    )
    p.add_argument(
        "--with-update",
        action="store_true",
        help="layer section: time backward + Adam update of the layer (kernel and bias): "
        "dense + optax Adam, <mode>+adam (masked dense dW + optax Adam) and "
        "<mode>+sparse_adam (compact dW + column-sparse Adam), with peak memory; with "
        "--paper-table7, the paper's grid as a training step of one layer",
    )
    p.add_argument(
        "--grid",
        type=flags.grid_entry,
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
        type=flags.mode,
        nargs="+",
        metavar="MODE",
        help="meProp modes to time besides dense (default: all; unified for --paper-table7)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls (rounds) of each function (default 11; --steps 7; 3 for --quick "
        "and --paper-table7)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls first (default 2; 1 for --steps, --quick and --paper-table7)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        help="draw speedup vs k with the ideal out/k (PNG) here; for --steps, the speedup "
        "of each training variant beside the bound",
    )
    p.add_argument("--no-progress", action="store_true", help="print the table once, at the end")
    p.add_argument(
        "--reuse-memory",
        action="store_true",
        help="re-run under GLIBC_TUNABLES that let glibc reuse large freed blocks (Linux); "
        "without it every call maps its [in, out] outputs afresh and pays a page fault per "
        "4 KiB, which on a CPU costs about as much as a k=32 backward itself",
    )
    args = p.parse_args(argv)
    chosen = [name for name in SECTION_FLAGS if getattr(args, name)]
    if len(chosen) > 1:
        p.error(f"{' and '.join('--' + c for c in chosen)} are separate sections: give one")
    if chosen:
        args.section = chosen[0]
    if args.section == "conv" and (args.paper_table7 or args.grid or args.with_update):
        p.error("--conv times one convolution: --paper-table7, --grid and --with-update are "
                "options of the layer section (--conv-grid gives its shapes)")  # fmt: skip
    if args.section == "per_example" and (
        args.paper_table7 or args.grid or args.with_update or args.modes or args.plot
    ):
        p.error("--per-example has fixed shapes and variants: it takes no --paper-table7, "
                "--grid, --with-update, --modes or --plot")  # fmt: skip
    transformer.check_arguments(p, args)
    if args.section != "conv" and args.conv_grid:
        p.error("--conv-grid configures --conv")
    mlp_section = args.section in ("steps", "mesimp")
    if mlp_section and (args.paper_table7 or args.grid or args.with_update):
        p.error(f"--{args.section} times whole MLP steps: --paper-table7, --grid and "
                "--with-update are options of the layer section")  # fmt: skip
    if args.section != "mesimp" and args.mesimp_sizes:
        p.error("--mesimp-sizes configures --mesimp")
    if args.section == "mesimp" and args.mesimp_sizes:
        cfg = mesimp_config(args)
        if len(cfg.units) != len(cfg.hidden) or any(
            u > h for u, h in zip(cfg.units, cfg.hidden, strict=False)
        ):
            hidden = ",".join(map(str, cfg.hidden))
            p.error(f"--mesimp-sizes: give {len(cfg.hidden)} sizes, each at most the hidden "
                    f"size ({hidden}); got {','.join(map(str, cfg.units))}")  # fmt: skip
    if args.section != "steps" and args.mlp:
        p.error("--mlp configures --steps")
    if mlp_section and args.modes and len(args.modes) > 1:
        p.error(f"--{args.section} times one meProp mode: give a single --modes value")
    if mlp_section and args.dtype != "float32":
        p.error(f"--{args.section} times float32 models only")
    if args.repeats is None:
        args.repeats = 3 if args.quick or args.paper_table7 else 7 if mlp_section else 11
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.paper_table7 or mlp_section else 2
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


#: One malloc arena, so that XLA's worker threads allocate from the main heap, where blocks below
#: the mmap threshold are reused instead of being mapped (and faulted in) on every call.
REUSE_MEMORY_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:"
    "glibc.malloc.trim_threshold=4294967296"
)


def merge_tunables(user: str | None, ours: str = REUSE_MEMORY_TUNABLES) -> str:
    """``GLIBC_TUNABLES`` with the user's settings kept and ours added for the keys they lack.

    Both are ``key=value`` lists joined by ``:``; the user's entries come first, in their order.

    Example:
      >>> merge_tunables("glibc.malloc.arena_max=4:glibc.rtld.nns=2", "glibc.malloc.arena_max=1:"
      ...                "glibc.malloc.mmap_threshold=9")
      'glibc.malloc.arena_max=4:glibc.rtld.nns=2:glibc.malloc.mmap_threshold=9'
      >>> merge_tunables(None, "glibc.malloc.arena_max=1")
      'glibc.malloc.arena_max=1'
    """
    entries = [e for e in (user or "").split(":") if e]
    taken = {e.split("=", 1)[0] for e in entries}
    entries += [e for e in ours.split(":") if e and e.split("=", 1)[0] not in taken]
    return ":".join(entries)


def main(argv: Sequence[str] | None = None) -> list[Record]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.reuse_memory:
        tunables = merge_tunables(os.environ.get("GLIBC_TUNABLES"))
        if os.environ.get("GLIBC_TUNABLES") != tunables:
            # glibc reads its tunables at process start: start again with them set. The merge
            # is idempotent, so the restarted process runs on.
            os.execve(
                sys.executable,
                [sys.executable, "-m", "experiments.bench", *argv],
                {**os.environ, "GLIBC_TUNABLES": tunables},
            )
    env = environment()
    print(
        f"jax {env['jax_version']}, backend {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, load {env['load_average']}, "
        f"{args.repeats} repeats after {args.warmup} warm-up",
        flush=True,
    )
    records = SECTIONS[args.section](args)
    if args.no_progress:
        if args.section == "steps":
            configs: dict[tuple[Any, ...], list[Record]] = {}
            for r in records:
                configs.setdefault((tuple(r.extra["sizes"]), r.batch), []).append(r)
            print("\n\n".join(format_steps_table(rows, args.repeats) for rows in configs.values()))
        elif args.section == "mesimp":
            print(format_mesimp_table(records, args.repeats))
        elif args.section == "per_example":
            print(format_per_example(records))
        elif args.section == "transformer":
            print(transformer.format_transformer_table(records, args.repeats))
        else:
            print(format_table(records))
        report = memory_report(records)
        if report:
            print(report)
    if args.out:
        write_json(args.out, args, records, argv)
        print(f"wrote {args.out}")
    if args.plot:
        if args.section == "steps":
            plot_steps(args.plot, records)
        elif args.section == "mesimp":
            plot_mesimp(args.plot, records)
        else:
            plot_speedup(args.plot, records, paper=args.paper_table7)
        print(f"wrote {args.plot}")
    return records
