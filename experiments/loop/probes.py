"""Per-epoch timing probes: forward, backward and update estimates.

Timing (what ``forward_s``, ``backward_s`` and ``update_s`` mean)
-----------------------------------------------------------------
A training epoch is one fused XLA program per chunk of minibatches, so forward, backward and
update cannot be timed inside it without changing it. After every epoch the loop therefore
times three separate jitted programs over the same ``S`` minibatches of that epoch (``S`` =
``timing_batches``, default 20, or all of them if the epoch has fewer; with several batch
groups, e.g. length buckets, each group contributes in proportion to its number of steps),
all with the epoch-end parameters and the training step keys:

(a) forward + loss, scanned over the ``S`` minibatches (the losses are summed);
(b) forward + backward, scanned (the gradients are summed across the minibatches, so no
    part of the backward pass can be removed as dead code);
(c) the full training step, forward + backward + optimizer update, scanned on a throwaway
    copy of the state (its result is discarded).

Every program is compiled ahead of time and run once untimed before its first timing; each
timing ends with ``block_until_ready``. Per minibatch, ``forward = a / S``,
``backward = (b - a) / S`` and ``update = (c - b) / S``; these are multiplied by the number
of steps in the epoch to give seconds per epoch. A difference that comes out negative
(timer noise, or XLA fusing differently across programs) is reported as 0; the raw probe
times are stored next to the estimates (``probe_*_s``). "Backward" thus covers the whole
backward pass (loss, activations, top-k selection and the sparse products), the paper's
"overall BP time" (its Table 2), plus one gradient accumulation per minibatch.

Bound. The probes run other programs than the epoch's fused chunks, so their sum can come out
above the measured training time (an epoch of 4.27 s was once estimated at 0.85 + 2.70 + 4.92
s). The three estimates are then scaled down by one factor, ``probe_scale`` (1 when no
scaling was needed), so that they add up to ``train_wall_s`` and keep their proportions
(:func:`bound_by_wall`): they never claim more time than the epoch took. The raw probe times
are kept unscaled.

Caveats. XLA optimises each program on its own, so work can move between the phases: with
meProp, the dense ``[in, out]`` weight gradient built from ``k`` columns can be fused into the
accumulation in (b) but has to be materialised before the optimizer in (c), where it counts
as update time. Each probe is one measurement, so on a busy machine single epochs are noisy;
the final summary averages the epochs.

Cost. The probes run about ``2 S`` minibatches' worth of training work per epoch ((a) is
roughly a third of a step, (b) two thirds, (c) a whole one), plus, in the epoch that compiles
them, one untimed run of each. ``probe_s`` records their own wall time per epoch (warm-up runs
included, compilation excluded: that is in ``compile_s``), so their share of an epoch,
``probe_s / (train_wall_s + eval_s + probe_s)``, can be read from the results. Measured on
MNIST (1,100 minibatches per epoch, three epochs on a loaded 2-core CPU host), ``S = 100``
took 22% of the epochs' wall time (24% in the first, warm-up included) and ``S = 25`` 8%
(12% in the first); the default ``S = 20`` stays under a tenth from the first epoch on. More
minibatches give steadier estimates at the price of longer epochs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from experiments.loop.programs import Programs, group_steps
from experiments.loop.task import Array, Batch, TrainState


def _time(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def probe_counts(steps: Sequence[int], budget: int) -> list[int]:
    """Minibatches to time per group: ``budget`` in all, in proportion to group sizes."""
    total = sum(steps)
    if budget >= total:
        return list(steps)
    return [min(n, max(1, round(budget * n / total))) if n else 0 for n in steps]


def probe_timings(
    programs: Programs,
    state: TrainState,
    groups: Sequence[Batch],
    step_keys: Sequence[Array],
    budget: int,
) -> tuple[dict[str, float | int | None], float]:
    """Per-epoch forward/backward/update estimates (see the module docstring)."""
    steps = [group_steps(g) for g in groups]
    counts = probe_counts(steps, budget)
    est = np.zeros(3)
    raw = np.zeros(3)
    compile_s = 0.0
    for group, key, n, total in zip(groups, step_keys, counts, steps, strict=True):
        if n == 0:
            continue
        calls = (
            ("probe_forward", (state.params,)),
            ("probe_backward", (state.params, state.taps)),
            ("probe_step", (state,)),
        )
        for j, (name, first) in enumerate(calls):
            fn, seconds = programs.compiled(name, *first, group, key, n=n)
            if seconds:
                compile_s += seconds
                jax.block_until_ready(fn(*first, group, key))  # warm-up run, untimed
            t = _time(fn, *first, group, key)
            raw[j] += t
            est[j] += t / n * total
    fwd, fwd_bwd, full = est
    timing = {
        "forward_s": float(fwd),
        "backward_s": float(max(fwd_bwd - fwd, 0.0)),
        "update_s": float(max(full - fwd_bwd, 0.0)),
        "probe_steps": int(sum(counts)),
        "probe_forward_s": float(raw[0]),
        "probe_forward_backward_s": float(raw[1]),
        "probe_step_s": float(raw[2]),
    }
    return timing, compile_s


def bound_by_wall(timing: dict[str, Any], train_wall_s: float) -> dict[str, Any]:
    """``timing`` with ``forward_s``, ``backward_s`` and ``update_s`` scaled down by one
    factor when their sum exceeds the measured ``train_wall_s``, and that factor as
    ``probe_scale`` (1.0 when they fit; None without probes).

    Example:
      >>> t = bound_by_wall({"forward_s": 1.0, "backward_s": 2.0, "update_s": 5.0}, 4.0)
      >>> t["forward_s"], t["backward_s"], t["update_s"], t["probe_scale"]
      (0.5, 1.0, 2.5, 0.5)
    """
    fields = ("forward_s", "backward_s", "update_s")
    if timing.get("forward_s") is None:
        return {**timing, "probe_scale": None}
    total = sum(timing[f] for f in fields)
    scale = min(1.0, train_wall_s / total) if total > 0 else 1.0
    return {**timing, **{f: timing[f] * scale for f in fields}, "probe_scale": float(scale)}


NO_PROBES: dict[str, float | int | None] = {
    "forward_s": None,
    "backward_s": None,
    "update_s": None,
    "probe_steps": 0,
    "probe_forward_s": None,
    "probe_forward_backward_s": None,
    "probe_step_s": None,
}
