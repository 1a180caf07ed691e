"""Timing harness of the benchmarks: interleaved wall-clock timing, compilation, memory.

All functions of one configuration are timed in the same run, interleaved call by call, so that
a change in the machine's load affects them alike; each row reports the median over ``repeats``
calls after ``warmup`` untimed calls, and its ratio to dense is the median over those rounds of
the dense call's time divided by the row's (:func:`paired_ratio`).

Memory: every compiled program's ``memory_analysis()`` (arguments + outputs - donated aliases
+ XLA temporaries, deterministic) is recorded by :func:`memory_stats`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

DENSE = "dense"
FORWARD = "forward"
#: How ``Record.ratio_vs_dense`` is formed, as the JSON records say (``"ratio"``): the median
#: over rounds of the reference's time over the row's (:func:`paired_ratio`). Records written
#: before the field existed hold the ratio of the two medians.
RATIO_KIND = "paired"


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
    alone, or a meProp mode. ``ratio_vs_dense`` is how many times faster than the dense
    backward this row ran, round by round (:func:`paired_ratio`; ``1.0`` for the dense row).
    ``extra`` holds section-specific values (XLA's flop estimate, the paper's speedup, ...).
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


def paired_ratio(reference: Stats, row: Stats) -> float:
    """How many times faster ``row`` ran than ``reference``: the median over the timed rounds
    of ``reference`` time / ``row`` time.

    :func:`time_fns` runs every function once per round, back to back, so the two times of a
    round share the machine's state. Where the machine changes speed between rounds (a CPU
    shared with other jobs, or one whose memory bandwidth comes and goes), the ratio of the
    two medians can set one function's fast rounds against the other's slow ones; the
    median of the rounds' ratios cannot. With different numbers of times (not timed
    together) it is the ratio of the medians.
    """
    if not row.times_ms or len(reference.times_ms) != len(row.times_ms):
        return reference.median_ms / row.median_ms
    return statistics.median(r / t for r, t in zip(reference.times_ms, row.times_ms, strict=True))


def _record(
    section: str,
    batch: int,
    d_in: int,
    d_out: int,
    k: int,
    mode: str,
    dtype: str,
    stats: Stats,
    reference: Stats,
    extra: dict[str, Any],
) -> Record:
    """A :class:`Record` from one row's timings and those of the row it is compared with
    (the dense backward)."""
    return Record(
        section=section,
        batch=batch,
        d_in=d_in,
        d_out=d_out,
        k=k,
        mode=mode,
        dtype=dtype,
        median_ms=stats.median_ms,
        min_ms=stats.min_ms,
        times_ms=list(stats.times_ms),
        ratio_vs_dense=paired_ratio(reference, stats),
        extra=extra,
    )


def _block(tree: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.block_until_ready()


def time_fns(
    fns: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]],
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Stats]:
    """Times several functions, interleaved call by call.

    Args:
      fns: name -> ``(fn, args)``; each ``fn(*args)`` returns arrays (any pytree).
      repeats: timed calls of each function.
      warmup: untimed calls of each function first (compilation, caches, thread pools).
      clock: seconds, read before and after every timed call (a fake one in tests).

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
            start = clock()
            _block(fn(*args))
            seconds[name].append(clock() - start)
    return {name: Stats.from_seconds(s) for name, s in seconds.items()}


def time_fn(fn: Callable[..., Any], args: Sequence[Any], repeats: int, warmup: int) -> Stats:
    """Median/min/all wall-clock times of ``fn(*args)`` (see :func:`time_fns`)."""
    return time_fns({"fn": (fn, args)}, repeats, warmup)["fn"]


def _compile(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[..., Any], float]:
    """Ahead-of-time compiles ``jit(fn)`` for ``args``; returns it and XLA's flop estimate."""
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, _flops(compiled)


#: Learning rate of every timed Adam update (the paper's; the value does not change the cost).
ADAM_LR = 1e-3


class Carry:
    """A donated state handed from call to call: ``box.value, out = fn(box.value, *args)``.

    Several timed functions may share one box (they need the same state layout), so that a
    large state exists once rather than once per function.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def stepper(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """A no-argument callable for :func:`time_fns` that runs ``fn`` on the carried state;
        a :class:`Live` argument is read anew at every call."""

        def call() -> Any:
            self.value, out = fn(self.value, *_resolve(args))
            return out

        return call


class Live:
    """An argument read at call time, e.g. parameters that another function donates and
    replaces: ``Live(lambda: box.value[0])``."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self.get = get


def _resolve(args: Sequence[Any]) -> list[Any]:
    return [a.get() if isinstance(a, Live) else a for a in args]


def _compile_donated(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    """``jit(fn, donate_argnums=0)`` compiled ahead of time for ``args``."""
    return jax.jit(fn, donate_argnums=0).lower(*_resolve(args)).compile()


def memory_stats(compiled: Any, data: int = 0) -> dict[str, int]:
    """XLA's buffer sizes for a compiled program, in bytes (deterministic, unlike RSS).

    ``total`` = arguments + outputs - outputs aliased to donated arguments + temporaries: the
    most memory the call holds at once, its inputs included. ``peak`` is ``total`` less the
    ``data`` bytes of input batches that every compared variant reads alike (minibatches,
    ``x`` and ``g``), so that it compares what the variants themselves need: state, outputs
    and temporaries.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # best-effort and backend-dependent, like cost_analysis
        m = None
    if m is None:
        return {}
    stats = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
    stats["data"] = int(data)
    stats["peak"] = stats["total"] - stats["data"]
    return stats


def _flops(compiled: Any) -> float:
    """XLA's flop estimate of a compiled program, NaN where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        return float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort and backend-dependent
        return float("nan")


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.copy(), tree)
