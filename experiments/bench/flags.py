"""Parsers of the bench's flag values: each returns the value or raises
``argparse.ArgumentTypeError`` with a message that names the expected form."""

from __future__ import annotations

import argparse

import meprop_jax


def grid_entry(text: str) -> tuple[int, int, int, int]:
    """``--grid BxINxOUTxK``."""
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts[:3]) < 1 or parts[3] < 1:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxINxOUTxK with positive ints, e.g. 256x4096x4096x32; got {text!r}"
        )
    # k >= out keeps every column: that is dense backprop, not a meProp configuration.
    if parts[3] >= parts[2]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: K ({parts[3]}) must be below OUT ({parts[2]}); k >= out is dense backprop"
        )
    return parts  # type: ignore[return-value]


def mlp_entry(text: str) -> tuple[tuple[int, ...], int, int, int]:
    """``--mlp SIZES:BATCH:K[:STEPS]`` (10 steps when not given)."""
    try:
        parts = text.split(":")
        sizes = tuple(int(s) for s in parts[0].split("-"))
        rest = [int(p) for p in parts[1:]]
    except ValueError:
        parts, sizes, rest = [], (), []
    if len(sizes) < 3 or len(rest) not in (2, 3) or min(sizes + tuple(rest)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected SIZES:BATCH:K[:STEPS] with SIZES like 784-500-500-10 (at least one "
            f"hidden layer) and positive ints, e.g. 784-4096-4096-10:256:32:5; got {text!r}"
        )
    batch, k = rest[:2]
    steps = rest[2] if len(rest) == 3 else 10
    if k >= min(sizes[1:-1]):
        raise argparse.ArgumentTypeError(f"--mlp {text}: k must be below every hidden size")
    return sizes, batch, k, steps


def units_entry(text: str) -> tuple[int, ...]:
    """``--mesimp-sizes UNITS,UNITS``."""
    try:
        units = tuple(int(u) for u in text.split(","))
    except ValueError:
        units = ()
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(
            f"expected surviving units per hidden layer as positive ints, e.g. 154,154; got "
            f"{text!r}"
        )
    return units


def mode(text: str) -> str:
    """A ``--modes`` entry, ``per-example`` or ``per_example`` alike."""
    try:
        return meprop_jax.MODES[meprop_jax.MODES.index(text.replace("-", "_"))]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown mode {text!r}; choose from {', '.join(meprop_jax.MODES)}"
        ) from None
