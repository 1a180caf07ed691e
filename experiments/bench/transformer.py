"""Section ``transformer``: one Transformer encoder block's training step, dense against meProp.

The block is the tagger's (:class:`experiments.common.models.EncoderBlock`: pre-LayerNorm,
stock ``nn.MultiHeadDotProductAttention`` with ``d / 64`` heads, an MLP ``d -> 4d -> d``). A
training step is the forward pass, the backward pass to the parameters and to the block's input
(a block inside a stack hands ``dx`` down) and optax Adam on the parameters, for a squared
error against a fixed random target. Variants, timed interleaved on one data set
(:func:`experiments.bench.harness.time_fns`), on a donated state:

* ``dense``: ``model.apply``;
* ``unified`` (or the ``--modes`` value): :func:`meprop_jax.sparsify` over the same apply with
  ``k`` for every projection (query, key, value and output of the attention, both MLP
  layers; ``k`` over the flattened output features); ``extra["layers"]`` lists them;
* ``forward``: the loss alone, whose ratio to dense bounds any backward-side saving.

``speedup`` is the dense step's median over the row's, from the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import meprop_jax
from experiments import loop
from experiments.bench.harness import (
    ADAM_LR,
    DENSE,
    FORWARD,
    Carry,
    Record,
    _block,
    _compile_donated,
    _record,
    memory_stats,
    time_fns,
)
from experiments.common.models import EncoderBlock

__all__ = [
    "QUICK_TRANSFORMER_CONFIGS",
    "TRANSFORMER_CONFIGS",
    "add_arguments",
    "bench_transformer_config",
    "block",
    "block_apply",
    "check_arguments",
    "format_transformer_table",
    "run_transformer_section",
    "train_step_fn",
]

SECTION = "transformer"
#: Attention head width: ``d / HEAD_DIM`` heads.
HEAD_DIM = 64
#: (batch, length, d, k): batch x length = 8 x 64 and 32 x 128, d = 256 and 1024, k = d / 8.
TRANSFORMER_CONFIGS: tuple[tuple[int, int, int, int], ...] = tuple(
    (batch, length, d, d // 8) for batch, length in ((8, 64), (32, 128)) for d in (256, 1024)
)
QUICK_TRANSFORMER_CONFIGS: tuple[tuple[int, int, int, int], ...] = ((2, 8, 64, 8),)


def block(d: int) -> EncoderBlock:
    """The timed block at width ``d`` (``max(1, d // 64)`` heads, MLP ``4d``)."""
    return EncoderBlock(d_model=d, heads=max(1, d // HEAD_DIM), mlp_dim=4 * d)


def block_apply(model: EncoderBlock, k: int, mode: str) -> Callable[..., Any]:
    """``model.apply``; with ``k > 0`` its :func:`meprop_jax.sparsify` version, every
    supported layer selected (the block has no output layer to spare)."""
    if not k:
        return model.apply
    return meprop_jax.sparsify(model.apply, k=k, mode=mode, layers="*")


def block_data(
    batch: int, length: int, d: int, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """Standard-normal ``x`` and target ``y [batch, length, d]``, a mask of every key
    ``[batch, 1, 1, length]`` and the block's initial parameters."""
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, length, d), jnp.float32)
    y = jax.random.normal(ky, (batch, length, d), jnp.float32)
    mask = jnp.ones((batch, 1, 1, length), bool)
    params = jax.jit(block(d).init)(kp, x, mask)["params"]
    _block((x, y, params))
    return x, y, mask, params


def _loss(apply_fn: Callable[..., Any]) -> Callable[..., jax.Array]:
    def loss(params, x, y, mask):
        return jnp.mean((apply_fn({"params": params}, x, mask) - y) ** 2)

    return loss


def train_step_fn(apply_fn: Callable[..., Any], tx: optax.GradientTransformation) -> Callable:
    """``((params, opt_state), x, y, mask) -> (state, (loss, sum of dx))``: one step."""
    grad = jax.value_and_grad(_loss(apply_fn), argnums=(0, 1))

    def step(state, x, y, mask):
        params, opt_state = state
        loss, (grads, dx) = grad(params, x, y, mask)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, jnp.sum(dx))

    return step


def bench_transformer_config(
    batch: int,
    length: int,
    d: int,
    k: int,
    *,
    repeats: int,
    warmup: int,
    mode: str = "unified",
    seed: int = 0,
) -> list[Record]:
    """Times dense, meProp and forward (see the module docstring) for one shape.

    Returns:
      Records ``dense``, ``mode``, ``forward`` (``d_in = d_out = d``); ``extra`` holds
      ``length``, ``heads``, ``tokens``, ``memory`` and, for meProp, ``layers``: what
      :func:`meprop_jax.sparsify_report` says of each projection.
    """
    model = block(d)
    x, y, mask, params = block_data(batch, length, d, seed)
    tx = loop.make_optimizer("adam", ADAM_LR)
    sparse = block_apply(model, k, mode)
    layers = meprop_jax.sparsify_report(sparse, {"params": params}, x, mask)
    box = Carry((params, tx.init(params)))
    data = x.nbytes + y.nbytes
    fns: dict[str, tuple[Callable[..., Any], Sequence[Any]]] = {}
    memory: dict[str, dict[str, int]] = {}
    for name, apply_fn in ((DENSE, model.apply), (mode, sparse)):
        compiled = _compile_donated(train_step_fn(apply_fn, tx), (box.value, x, y, mask))
        fns[name] = (box.stepper(compiled, x, y, mask), ())
        memory[name] = memory_stats(compiled, data)
    forward = jax.jit(_loss(model.apply)).lower(params, x, y, mask).compile()
    fns[FORWARD] = (lambda: forward(box.value[0], x, y, mask), ())
    memory[FORWARD] = memory_stats(forward, data)
    stats = time_fns(fns, repeats, warmup)

    def record(name: str) -> Record:
        extra: dict[str, Any] = {
            "length": length,
            "heads": model.heads,
            "tokens": batch * length,
            "memory": memory[name],
        }
        if name == mode:
            extra["layers"] = [layer._asdict() for layer in layers]
        row_k = k if name == mode else 0
        dense = stats[DENSE]
        return _record(SECTION, batch, d, d, row_k, name, "float32", stats[name], dense, extra)

    return [record(DENSE), record(mode), record(FORWARD)]


def format_transformer_table(records: Sequence[Record], rounds: int | None = None) -> str:
    """The section's records as one table: a line per (shape, variant), with the speedup
    over the dense step of the same shape and how many projections meProp converted."""
    cols = ["batch x len", "d", "heads", "k", "variant", "step ms", "min ms", "speedup"]
    cols += ["converted", "peak MiB"]
    rows = []
    for r in records:
        layers = r.extra.get("layers")
        converted = ""
        if layers is not None:
            converted = f"{sum(1 for x in layers if x['k'])}/{len(layers)}"
        peak = (r.extra.get("memory") or {}).get("peak")
        rows.append(
            [
                f"{r.batch} x {r.extra['length']}",
                str(r.d_in),
                str(r.extra["heads"]),
                str(r.k) if r.k else "-",
                r.mode,
                f"{r.median_ms:.2f}",
                f"{r.min_ms:.2f}",
                f"{r.ratio_vs_dense:.2f}x",
                converted,
                "" if peak is None else f"{peak / 2**20:.1f}",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    first = records[0]
    head = (
        f"one encoder block's training step (forward + backward to params and input + Adam), "
        f"median of {rounds or len(first.times_ms)} interleaved calls"
    )
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def transformer_entry(text: str) -> tuple[int, int, int, int]:
    """Parses ``--transformer-grid BATCHxLENGTHxDxK`` (e.g. ``8x64x256x32``).

    Raises:
      argparse.ArgumentTypeError: not four positive ints, or ``K >= D`` (dense backprop).
    """
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxLENGTHxDxK with positive ints, e.g. 8x64x256x32; got {text!r}"
        )
    if parts[3] >= parts[2]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: K ({parts[3]}) must be below D ({parts[2]}); k >= d is dense backprop"
        )
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags: ``--transformer`` and ``--transformer-grid``."""
    p.add_argument(
        "--transformer",
        action="store_true",
        help="same as --section transformer: one Transformer encoder block's training step "
        "(pre-LayerNorm, d/64 heads, MLP 4d, Adam), dense vs meProp through sparsify vs "
        "forward, at batch x length 8x64 and 32x128, d 256 and 1024, k = d/8",
    )
    p.add_argument(
        "--transformer-grid",
        type=transformer_entry,
        action="append",
        metavar="BxLENxDxK",
        help="a --transformer configuration instead of the defaults, e.g. 8x64x256x32; repeatable",
    )


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of the section's flags (exit code 2, one line)."""
    if args.section != SECTION:
        if args.transformer_grid:
            p.error("--transformer-grid configures --transformer")
        return
    if args.paper_table7 or args.grid or args.with_update:
        p.error("--transformer times one encoder block's step: --paper-table7, --grid and "
                "--with-update are options of the layer section")  # fmt: skip
    if args.plot:
        p.error("--transformer prints a table and writes --out JSON; it draws no --plot")
    if args.modes and len(args.modes) > 1:
        p.error("--transformer times one meProp mode: give a single --modes value")
    if args.dtype != "float32":
        p.error("--transformer times float32 blocks only")


def run_transformer_section(args: argparse.Namespace) -> list[Record]:
    """Section ``transformer``: every configuration (``--transformer-grid``, or the defaults;
    :data:`QUICK_TRANSFORMER_CONFIGS` with ``--quick``)."""
    mode = (args.modes or ["unified"])[0]
    configs = args.transformer_grid or (
        QUICK_TRANSFORMER_CONFIGS if args.quick else TRANSFORMER_CONFIGS
    )
    records: list[Record] = []
    for i, (batch, length, d, k) in enumerate(configs):
        rows = bench_transformer_config(
            batch,
            length,
            d,
            k,
            repeats=args.repeats,
            warmup=args.warmup,
            mode=mode,
            seed=args.seed + i,
        )
        records.extend(rows)
        if not args.no_progress:
            print(format_transformer_table(rows, args.repeats), flush=True)
    return records
