"""Section ``mesimp``: the training step and the decoding of a meSimp-pruned MLP.

meSimp (:mod:`meprop_jax.mesimp`) removes the hidden units that meProp's top-k seldom selects,
so the forward pass shrinks too and a training step can beat meProp's bound, the dense step
over the forward pass. At the paper's MNIST shapes (784-500-500-10, batch 100, k 160, Adam with
element-wise clip 5) this section times, interleaved call by call in one run:

* ``dense``: the full network's training step (the reference, 1.00x);
* ``meprop``: the full network's step with meProp at ``k``;
* ``forward``: the full network's forward pass and loss alone (meProp's bound);
* ``mesimp``: the step of the pruned network as it trains on after a shrink:
  ``meprop_jax.Dense(record=True)`` hidden layers of the padded widths (the survivors rounded
  up to a multiple of 16, the padding masked), the activity record accumulated every step.
  With ``k`` at least the padded width every unit is selected: dense backprop on the survivors;
* ``mesimp:plain``: the same widths as a plain MLP (no mask, no record), so that the cost of
  the mask and the record is measured rather than assumed;
* ``decode:full``, ``decode:padded``, ``decode:exported``: a test-set-sized forward (10,000
  examples in evaluation batches of 1000) of the full model, of the padded masked model and of
  the exported one, a stock ``nn.Dense`` MLP of the survivors' sizes
  (:func:`meprop_jax.mesimp.export`). Decoding rows are compared with ``decode:full``.

The pruned model comes from the library's own path: random survivors (``units`` per hidden
layer) of the full model's parameters, :func:`meprop_jax.mesimp.shrink` (parameters, Adam
state and record) and :func:`meprop_jax.mesimp.export`. Times depend on the sizes only, so
the data are random. Training rows are per step (``steps`` minibatches scanned per call, on a
donated state), decoding rows per pass over the ``examples``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import lax

import meprop_jax
from experiments import loop
from experiments.bench.harness import (
    ADAM_LR,
    DENSE,
    FORWARD,
    Carry,
    Record,
    Stats,
    _compile_donated,
    _copy,
    _record,
    memory_stats,
    paired_ratio,
    time_fns,
)
from experiments.bench.steps import _cross_entropy, _forward_scan, _train_scan
from experiments.common.models import MLP
from meprop_jax import mesimp

MESIMP = "mesimp"
MESIMP_PLAIN = "mesimp:plain"
DECODE_FULL = "decode:full"
DECODE_PADDED = "decode:padded"
DECODE_EXPORTED = "decode:exported"
TRAIN_ROWS: tuple[str, ...] = (DENSE, "meprop", FORWARD, MESIMP, MESIMP_PLAIN)
DECODE_ROWS: tuple[str, ...] = (DECODE_FULL, DECODE_PADDED, DECODE_EXPORTED)
ROWS: tuple[str, ...] = TRAIN_ROWS + DECODE_ROWS

#: Speedups the pruned model should reach: its training step over the dense step, and the
#: exported model's decoding over the full model's.
STEP_TARGET = 3.0
DECODE_TARGET = 2.5


@dataclasses.dataclass(frozen=True)
class MeSimpConfig:
    """What the section times.

    Attributes:
      sizes: the full MLP, ``(in, hidden..., classes)``.
      batch: training minibatch.
      k: meProp's k (also handed to the pruned layers, where ``k >= width`` keeps every unit).
      units: surviving units per hidden layer.
      steps: minibatches scanned per timed training call.
      examples: examples decoded per timed call (the test set).
      eval_batch: decoding batch.
      clip: element-wise gradient clip before Adam.
      pad_to: pruned widths are rounded up to a multiple of this.
    """

    sizes: tuple[int, ...]
    batch: int
    k: int
    units: tuple[int, ...]
    steps: int
    examples: int
    eval_batch: int
    clip: float = 5.0
    pad_to: int = mesimp.DEFAULT_PAD_TO

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.sizes[1:-1])

    @property
    def widths(self) -> tuple[int, ...]:
        """The padded widths the pruned network trains with."""
        return tuple(
            mesimp.padded_width(n, w, self.pad_to)
            for n, w in zip(self.units, self.hidden, strict=True)
        )


#: The authors' MNIST meSimp run: 154 of 500 units per hidden layer survive (their README).
PAPER_CONFIG = MeSimpConfig((784, 500, 500, 10), 100, 160, (154, 154), 20, 10_000, 1000)
QUICK_CONFIG = MeSimpConfig((16, 32, 32, 10), 8, 4, (10, 10), 3, 64, 16)


class RecordMLP(nn.Module):
    """The MLP meSimp trains: ``meprop_jax.Dense(record=True)`` -> ReLU hidden layers, a dense
    output layer; parameters named as :class:`experiments.common.models.MLP`'s."""

    hidden: Sequence[int]
    k: int = 0
    mode: str = "unified"
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x`` ``[batch, features]``."""
        for i, size in enumerate(self.hidden):
            name = f"hidden_{i}"
            layer = meprop_jax.Dense(size, k=self.k, mode=self.mode, record=True, name=name)
            x = nn.relu(layer(x))
        return meprop_jax.Dense(self.num_classes, name="output")(x)


class StockMLP(nn.Module):
    """A stock ``nn.Dense`` ReLU MLP: what an exported model is deployed as."""

    hidden: Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x`` ``[batch, features]``."""
        for i, size in enumerate(self.hidden):
            x = nn.relu(nn.Dense(size, name=f"hidden_{i}")(x))
        return nn.Dense(self.num_classes, name="output")(x)


def _record_train_scan(model: RecordMLP, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``((params, opt_state, record), xs, ys, taps) -> (state, loss sum)``: meSimp's step
    scanned -- gradients of the parameters and of the record taps, the record accumulated,
    the optax update."""

    def loss_fn(params, taps, record, x, y):
        variables = {"params": params, mesimp.COLLECTION: record, mesimp.TAP_COLLECTION: taps}
        return _cross_entropy(model.apply(variables, x), y)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))

    def run(carry, xs, ys, taps):
        def body(carry, xy):
            params, opt_state, record = carry
            loss, (grads, tap_grads) = grad_fn(params, taps, record, *xy)
            record = mesimp.accumulate(record, tap_grads)
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            return (params, opt_state, record), loss

        carry, losses = lax.scan(body, carry, (xs, ys))
        return carry, jnp.sum(losses)

    return run


def _decode(apply: Callable[[Any, jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    """``(variables, xs [batches, eval_batch, in]) -> logits [batches, eval_batch, classes]``,
    one evaluation batch after another."""
    return lambda variables, xs: lax.map(lambda x: apply(variables, x), xs)


def _stepper(compiled: Any, box: Carry, *args: Any) -> Callable[[], Any]:
    """Runs ``compiled`` on the carried state; returns the loss and the new state, whose
    shapes show which model the row trained."""

    def call() -> Any:
        box.value, loss = compiled(box.value, *args)
        return loss, box.value

    return call


@dataclasses.dataclass
class Pruned:
    """The pruned network, as shrunk for training on and as exported."""

    params: Any  # padded widths
    opt_state: Any
    record: Any  # masks: 1 for the survivors, 0 for the padding
    stock_params: Any  # survivors only
    units: tuple[int, ...]
    widths: tuple[int, ...]


def prune_randomly(
    params: Any, record: Any, tx: optax.GradientTransformation, cfg: MeSimpConfig, seed: int
) -> Pruned:
    """Keeps ``cfg.units`` random units of each hidden layer: shrunk and exported."""
    rng = np.random.default_rng(seed)
    layers = [f"hidden_{i}" for i in range(len(cfg.hidden))] + ["output"]
    keep = {}
    for name, width, n in zip(layers[:-1], cfg.hidden, cfg.units, strict=True):
        mask = np.zeros(width, bool)
        mask[rng.choice(width, n, replace=False)] = True
        keep[name] = mask
    shrunk = mesimp.shrink(params, tx.init(params), keep, layers, pad_to=cfg.pad_to, record=record)
    stock, units = mesimp.export(shrunk.params, mesimp.keep_sets(shrunk.record), layers)
    return Pruned(shrunk.params, shrunk.opt_state, shrunk.record, stock, units, shrunk.widths)


def bench_mesimp(
    cfg: MeSimpConfig, *, repeats: int, warmup: int, mode: str = "unified", seed: int = 0
) -> list[Record]:
    """Times the rows of the module docstring; one :class:`Record` per row, in :data:`ROWS`
    order. Training rows compare with ``dense`` (per step), decoding rows with
    ``decode:full`` (per pass); ``extra`` holds each row's model ``sizes``, the ``reference``
    and, for the full network, the ``bound`` dense / forward."""
    if cfg.examples % cfg.eval_batch:
        raise ValueError(f"examples {cfg.examples} must be a multiple of {cfg.eval_batch}")
    d_in, classes = cfg.sizes[0], cfg.sizes[-1]
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((cfg.steps, cfg.batch, d_in), np.float32))
    ys = jnp.asarray(rng.integers(0, classes, (cfg.steps, cfg.batch)), jnp.int32)
    test_shape = (cfg.examples // cfg.eval_batch, cfg.eval_batch, d_in)
    test_xs = jnp.asarray(rng.standard_normal(test_shape, np.float32))

    full = RecordMLP(cfg.hidden, num_classes=classes)
    variables = jax.jit(full.init)(jax.random.key(seed), xs[0])
    params = variables["params"]
    tx = loop.make_optimizer("adam", ADAM_LR, cfg.clip)
    pruned = prune_randomly(params, variables[mesimp.COLLECTION], tx, cfg, seed)

    fns: dict[str, tuple[Callable[..., Any], Sequence[Any]]] = {}
    memory: dict[str, dict[str, int]] = {}
    train_data = xs.nbytes + ys.nbytes

    def add_train(name: str, fn: Callable[..., Any], state: Any, *args: Any) -> None:
        box = Carry(state)
        compiled = _compile_donated(fn, (box.value, *args))
        fns[name] = (_stepper(compiled, box, *args), ())
        memory[name] = memory_stats(compiled, train_data)

    def mlp(hidden: Sequence[int], k: int) -> MLP:
        return MLP(hidden=tuple(hidden), k=k, mode=mode, num_classes=classes)

    # Every training row owns its state: each donates it.
    add_train(DENSE, _train_scan(mlp(cfg.hidden, 0), tx), (_copy(params), tx.init(params)), xs, ys)
    meprop_state = (_copy(params), tx.init(params))
    add_train("meprop", _train_scan(mlp(cfg.hidden, cfg.k), tx), meprop_state, xs, ys)
    fwd = jax.jit(_forward_scan(mlp(cfg.hidden, 0))).lower(params, xs, ys).compile()
    fns[FORWARD] = (fwd, (params, xs, ys))
    memory[FORWARD] = memory_stats(fwd, train_data)
    record_model = RecordMLP(pruned.widths, cfg.k, mode, classes)
    taps = mesimp.zero_taps(pruned.record)
    # shrink() passes unchanged leaves (the output bias, ...) through: copy before donating.
    state = _copy((pruned.params, pruned.opt_state, pruned.record))
    add_train(MESIMP, _record_train_scan(record_model, tx), state, xs, ys, taps)
    plain_state = (_copy(pruned.params), tx.init(pruned.params))
    add_train(MESIMP_PLAIN, _train_scan(mlp(pruned.widths, cfg.k), tx), plain_state, xs, ys)

    decoders = {
        DECODE_FULL: (StockMLP(cfg.hidden, classes), {"params": params}),
        DECODE_PADDED: (
            record_model,
            {"params": _copy(pruned.params), mesimp.COLLECTION: _copy(pruned.record)},
        ),
        DECODE_EXPORTED: (StockMLP(pruned.units, classes), {"params": pruned.stock_params}),
    }
    for name, (model, model_vars) in decoders.items():
        compiled = jax.jit(_decode(model.apply)).lower(model_vars, test_xs).compile()
        fns[name] = (compiled, (model_vars, test_xs))
        memory[name] = memory_stats(compiled, test_xs.nbytes)

    stats = time_fns(fns, repeats, warmup)
    per_step = {
        name: Stats.from_seconds([t / 1e3 / cfg.steps for t in s.times_ms])
        for name, s in stats.items()
        if name in TRAIN_ROWS
    }
    timed = {**stats, **per_step}
    bound = paired_ratio(timed[DENSE], timed[FORWARD])
    model_sizes = {
        DENSE: cfg.hidden,
        "meprop": cfg.hidden,
        FORWARD: cfg.hidden,
        MESIMP: pruned.widths,
        MESIMP_PLAIN: pruned.widths,
        DECODE_FULL: cfg.hidden,
        DECODE_PADDED: pruned.widths,
        DECODE_EXPORTED: pruned.units,
    }
    row_k = {"meprop": cfg.k, MESIMP: cfg.k, MESIMP_PLAIN: cfg.k}

    def record(name: str) -> Record:
        train = name in TRAIN_ROWS
        hidden = model_sizes[name]
        extra: dict[str, Any] = {
            "sizes": [d_in, *hidden, classes],
            "full_sizes": list(cfg.sizes),
            "reference": DENSE if train else DECODE_FULL,
            "per": "step" if train else "pass",
            "memory": memory[name],
        }
        if train:
            extra["steps_per_call"] = cfg.steps
            extra["update"] = f"adam, clip {cfg.clip:g}" if name != FORWARD else None
            extra["bound"] = bound
        else:
            extra["examples"] = cfg.examples
        if name in (MESIMP, MESIMP_PLAIN, DECODE_PADDED, DECODE_EXPORTED):
            extra["units"] = list(pruned.units)
            extra["masked"] = name in (MESIMP, DECODE_PADDED)
        if name in (MESIMP, MESIMP_PLAIN):
            extra["selects_all"] = cfg.k >= min(pruned.widths)
        reference = timed[DENSE] if train else timed[DECODE_FULL]
        target = {MESIMP: STEP_TARGET, DECODE_EXPORTED: DECODE_TARGET}.get(name)
        if target is not None:
            extra["target"] = target
            extra["meets_target"] = paired_ratio(reference, timed[name]) >= target
        batch = cfg.batch if train else cfg.eval_batch
        return _record(
            MESIMP, batch, d_in, hidden[0], row_k.get(name, 0), name, "float32",
            timed[name], reference, extra,
        )  # fmt: skip

    return [record(name) for name in ROWS]
