"""The loop's model-state and schedule hooks, shared by every task that offers adaptive k or
meSimp (see :class:`experiments.loop.Task`)."""

from __future__ import annotations

from typing import Any

from experiments.common import feedback_flags

__all__ = ["StateHooks"]


class StateHooks:
    """Forwards the loop's model-state hooks to adaptive k's statistics or meSimp's record.

    A task mixes this in and provides ``settings.adaptive`` and a ``mesimp`` property (the
    :class:`experiments.common.mesimp.MesimpSchedule`, or None); the flags never allow both.
    """

    settings: Any
    mesimp: Any

    @property
    def _state_hooks(self) -> Any:
        if self.settings.adaptive is not None:
            return feedback_flags.AdaptiveKStats()
        return self.mesimp

    @property
    def state_collections(self) -> tuple[str, ...]:
        return () if self._state_hooks is None else self._state_hooks.state_collections

    @property
    def state_taps(self) -> Any:
        return None if self._state_hooks is None else self._state_hooks.state_taps

    @property
    def fold_state(self) -> Any:
        return None if self._state_hooks is None else self._state_hooks.fold_state

    @property
    def schedule(self) -> Any:
        return None if self._state_hooks is None else self._state_hooks.schedule
