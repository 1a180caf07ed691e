"""A stand-in for :func:`experiments.bench.harness.time_fns` with known durations.

The real ``time_fns`` runs, calling every function for real, but reads a fake clock that a
call of function ``name`` advances by ``durations[name][i]`` seconds on its ``i``-th timed call
(warm-up calls advance it by nothing). The timings a section reports are then known in advance,
independently of the machine, and the functions it timed are kept for inspection.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.bench import harness


class ScriptedTiming:
    """Replaces a section module's ``time_fns`` (``monkeypatch.setattr(mod, "time_fns", t)``).

    Args:
      durations: timed-call durations in seconds of a function, from its name.
    """

    def __init__(self, durations: Callable[[Any], Sequence[float]]) -> None:
        self.durations = durations
        self.fns: dict[Any, tuple[Callable[..., Any], Sequence[Any]]] = {}
        self.now = 0.0

    def __call__(
        self,
        fns: Mapping[Any, tuple[Callable[..., Any], Sequence[Any]]],
        repeats: int,
        warmup: int,
    ) -> dict[Any, harness.Stats]:
        self.fns = dict(fns)
        calls = dict.fromkeys(fns, 0)

        def timed(name: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                out = fn(*args)
                index = calls[name] - warmup
                calls[name] += 1
                if index >= 0:
                    self.now += self.durations(name)[index]
                return out

            return call

        wrapped = {name: (timed(name, fn), args) for name, (fn, args) in fns.items()}
        return harness.time_fns(wrapped, repeats, warmup, clock=lambda: self.now)
