"""Error feedback and adaptive k on the command lines, and the mean chosen k of a run.

Flags (every experiment):

* ``--error-feedback [DECAY]``: the sparse layers memorize the output gradient they did not
  propagate and feed it back (:mod:`meprop_jax.feedback`), decayed by ``DECAY`` in (0, 1].
* ``--adaptive-k``: TinyProp-style adaptive k (:class:`meprop_jax.AdaptiveK`): ``--k`` becomes
  the upper bound ``k_max`` and every step keeps, per layer, the fewest top columns (at least
  ``--adaptive-k-min``) that hold ``--adaptive-k-mass`` of the gradient's column mass.

Both need unified meProp layers. The chosen k is reported per epoch: the sparse layers'
chosen-k taps (``"meprop_adaptive"``) are differentiated with the parameters at every step
and added up in the model state :data:`STATS_COLLECTION` (:class:`AdaptiveKStats`, the hooks
of :class:`experiments.loop.Task`); after the epoch's last chunk the mean of every layer is
logged, stored in the epoch's record (``"events"`` of ``results.json``) and the sums restart.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from experiments.common.errors import require
from meprop_jax import AdaptiveK
from meprop_jax.linen import ADAPTIVE_TAP_COLLECTION

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_K_MIN",
    "DEFAULT_MASS",
    "STATS_COLLECTION",
    "AdaptiveKStats",
    "add_adaptive_arguments",
    "add_feedback_argument",
    "check_adaptive",
    "check_feedback",
    "mean_chosen_k",
    "out_parts",
    "stats_from_init",
]

DEFAULT_DECAY = 1.0
DEFAULT_MASS = 0.9
DEFAULT_K_MIN = 1

#: Model-state collection with every adaptive layer's running ``AdaptiveTap`` sums.
STATS_COLLECTION = "adaptive_k_stats"


def add_feedback_argument(group: argparse._ActionsContainer) -> None:
    """Adds ``--error-feedback [DECAY]`` (None when absent, ``DEFAULT_DECAY`` without value)."""
    group.add_argument(
        "--error-feedback",
        type=float,
        nargs="?",
        const=DEFAULT_DECAY,
        default=None,
        metavar="DECAY",
        help="memorize the sparse layers' unpropagated output gradient and feed it back "
        f"(meprop_jax.feedback), decayed by DECAY in (0, 1] (default {DEFAULT_DECAY:g} when "
        "given without a value); unified mode only",
    )


def add_adaptive_arguments(group: argparse._ActionsContainer) -> None:
    """Adds ``--adaptive-k``, ``--adaptive-k-mass`` and ``--adaptive-k-min``."""
    group.add_argument(
        "--adaptive-k",
        action="store_true",
        help="TinyProp-style adaptive k: --k is the upper bound and every step keeps, per "
        "layer, the fewest top columns that hold --adaptive-k-mass of the gradient's column "
        "mass; the mean chosen k is logged per epoch; unified mode only",
    )
    group.add_argument(
        "--adaptive-k-mass",
        type=float,
        default=None,
        help=f"share of the column mass to keep, in (0, 1] (default {DEFAULT_MASS:g})",
    )
    group.add_argument(
        "--adaptive-k-min",
        type=int,
        default=None,
        help=f"fewest columns kept per layer, 1..--k (default {DEFAULT_K_MIN})",
    )


def _mode(args: argparse.Namespace) -> str:
    mode = getattr(args, "mode", None)
    return "unified" if mode is None else str(mode)


def _refuse_with(args: argparse.Namespace, flag: str) -> None:
    """Refuses the flags whose per-step state or compact step the loop cannot run beside."""
    require(
        not getattr(args, "sparse_update", False),
        f"{flag} does not combine with --sparse-update",
    )
    require(not getattr(args, "mesimp", False), f"{flag} does not combine with --mesimp")


def check_feedback(args: argparse.Namespace, k: int) -> float:
    """The error-feedback decay the flags ask for (0 without ``--error-feedback``).

    Args:
      args: parsed flags with ``error_feedback`` (and possibly ``mode``, ``sparse_update``,
        ``mesimp``).
      k: the meProp k of the layers it applies to (0: dense, refused).

    Raises:
      ConfigError: naming the offending flags.
    """
    decay = args.error_feedback
    if decay is None:
        return 0.0
    require(0.0 < decay <= 1.0, f"--error-feedback DECAY must be in (0, 1], got {decay:g}")
    require(k >= 1, "--error-feedback needs meProp layers: --k >= 1 (without --kdim)")
    mode = _mode(args)
    require(
        mode == "unified",
        f"--error-feedback needs --mode unified (a memory per column), got {mode}",
    )
    _refuse_with(args, "--error-feedback")
    return float(decay)


def check_adaptive(args: argparse.Namespace, k: int) -> AdaptiveK | None:
    """The adaptive-k rule the flags ask for, or None without ``--adaptive-k``.

    Args:
      args: parsed flags with ``adaptive_k``, ``adaptive_k_mass`` and ``adaptive_k_min``.
      k: the meProp k of the layers it applies to, the upper bound (0: dense, refused).

    Raises:
      ConfigError: naming the offending flags.
    """
    if not args.adaptive_k:
        given = [
            flag
            for flag, value in (
                ("--adaptive-k-mass", args.adaptive_k_mass),
                ("--adaptive-k-min", args.adaptive_k_min),
            )
            if value is not None
        ]
        require(not given, f"{' and '.join(given)} only apply with --adaptive-k")
        return None
    mass = DEFAULT_MASS if args.adaptive_k_mass is None else args.adaptive_k_mass
    k_min = DEFAULT_K_MIN if args.adaptive_k_min is None else args.adaptive_k_min
    require(k >= 1, "--adaptive-k needs meProp layers: --k >= 1 (without --kdim), the bound")
    mode = _mode(args)
    require(mode == "unified", f"--adaptive-k needs --mode unified, got {mode}")
    require(0.0 < mass <= 1.0, f"--adaptive-k-mass must be in (0, 1], got {mass:g}")
    require(1 <= k_min <= k, f"--adaptive-k-min must be in 1..--k ({k}), got {k_min}")
    _refuse_with(args, "--adaptive-k")
    return AdaptiveK(mass=mass, k_min=k_min)


def out_parts(decay: float, adaptive: AdaptiveK | None) -> list[str]:
    """Run-folder name parts: ``fb<decay>`` and ``ak<mass>m<k_min>``.

    Example:
      >>> out_parts(0.5, AdaptiveK(0.9, 2))
      ['fb0.5', 'ak0.9m2']
    """
    parts = [f"fb{decay:g}"] if decay else []
    if adaptive is not None:
        parts.append(f"ak{adaptive.mass:g}m{adaptive.k_min}")
    return parts


def stats_from_init(variables: Mapping[str, Any]) -> dict[str, Any]:
    """A model's initial variables with its zero chosen-k taps turned into the statistics.

    The taps (``"meprop_adaptive"``) are made afresh at every step (:class:`AdaptiveKStats`);
    the variables keep zero sums of the same tree in :data:`STATS_COLLECTION`.
    """
    variables = dict(variables)
    taps = variables.pop(ADAPTIVE_TAP_COLLECTION, None)
    require(taps is not None, "--adaptive-k: the model has no sparse adaptive layer")
    variables[STATS_COLLECTION] = jax.tree.map(jnp.zeros_like, taps)
    return variables


def mean_chosen_k(stats: Mapping[str, Any]) -> dict[str, float]:
    """``{layer path: mean chosen k}`` of the statistics (``kept / calls``; layers not yet
    called are left out).

    Example:
      >>> from meprop_jax import AdaptiveTap
      >>> stats = {"hidden_0": {"k": AdaptiveTap(np.float32(30.0), np.float32(4.0))}}
      >>> mean_chosen_k(stats)
      {'hidden_0': 7.5}
    """
    means = {}
    for path, tap in traverse_util.flatten_dict(_plain(stats), is_leaf=_is_tap).items():
        kept, calls = (float(np.asarray(a)) for a in tap)
        if calls > 0:
            means["/".join(path[:-1])] = round(kept / calls, 3)
    return means


def _is_tap(_: Any, value: Any) -> bool:
    return isinstance(value, (tuple, list))


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


@dataclasses.dataclass(frozen=True)
class AdaptiveKStats:
    """The model-state and schedule hooks of :class:`experiments.loop.Task` for adaptive k."""

    state_collections: tuple[str, ...] = (STATS_COLLECTION,)

    def state_taps(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """Zero chosen-k taps, one per adaptive layer."""
        return {
            ADAPTIVE_TAP_COLLECTION: jax.tree.map(jnp.zeros_like, model_state[STATS_COLLECTION])
        }

    def fold_state(self, model_state: Mapping[str, Any], tap_grads: Mapping[str, Any]):
        """The statistics plus one step's ``(chosen k, calls)``."""
        stats = jax.tree.map(
            jnp.add, model_state[STATS_COLLECTION], tap_grads[ADAPTIVE_TAP_COLLECTION]
        )
        return {**model_state, STATS_COLLECTION: stats}

    def schedule(
        self, state: Any, epoch: int, done: int, chunks: int, log: Callable[[str], None]
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Restarts the sums before an epoch; after its last chunk, logs the mean chosen k of
        every layer and returns the event ``{"epoch", "adaptive_k_mean": {layer: k}}``."""
        if 0 < done < chunks:
            return state, []
        params = dict(state.params)
        events = []
        if done == chunks:
            means = mean_chosen_k(params[STATS_COLLECTION])
            shown = ", ".join(f"{name} {k:.2f}" for name, k in means.items())
            log(f"epoch {epoch}: mean adaptive k {shown}")
            events.append({"epoch": epoch, "adaptive_k_mean": means})
        params[STATS_COLLECTION] = jax.tree.map(jnp.zeros_like, params[STATS_COLLECTION])
        return state._replace(params=params), events
