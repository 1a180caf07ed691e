"""meSimp: shrink a network by removing the hidden units meProp's top-k seldom selects.

meSimp (Sun et al. 2017, arXiv 1711.06528) trains with meProp and keeps, for every hidden unit,
an *activity record*: how many examples selected the unit in their top-k with a nonzero
gradient (so updated its weights) since the last prune, out of how many examples. A prune keeps
a unit only if ``hits >= floor(threshold * examples)`` (threshold 0.1 by default) and it
survived every earlier prune; then the record restarts.
Pruned units are removed for real: :func:`shrink` gathers the parameters and the optimizer
state to the survivors, and :func:`export` gives a plain parameter tree for a stock
``flax.linen`` MLP of the surviving sizes.

The pieces:

* ``meprop_jax.Dense(..., record=True)`` (and ``meprop_jax.LSTMCell(..., record=True)``) keep
  ``hits``, ``examples`` and ``mask`` in the ``"mesimp"`` collection and a zero
  :class:`RecordTap` in ``"mesimp_taps"``. The gradient with respect to the taps is the step's
  selection counts (see :class:`RecordTap` for what counts as selected in each mode), so a
  jitted step gets them from ``jax.grad`` without side effects; :func:`accumulate` adds them
  to the record. The layer's output is multiplied by ``mask``: a unit with mask 0 outputs 0 and
  its weights get zero gradient.
* :func:`prune_rule` and :func:`prune` apply the authors' ``Record.Update``: the new masks are
  the old ones and'ed with the rule, and the counts reset.
* :func:`shrink` removes the units whose mask is 0 from a chain of Dense layers, in the
  parameters and in every optimizer-state subtree that mirrors them (Adam's ``mu`` and ``nu``,
  ...), and pads each width up to a multiple of ``pad_to`` with masked units, so a schedule of
  prunes compiles a bounded number of shapes. :func:`shrink_lstm` does the same for an LSTM
  cell and the layers it feeds.
* :func:`export` drops the padding and returns the stock model's parameters and sizes.
* :func:`reset_moments` zeroes Adam's moments and AdaGrad's accumulator, keeping the step
  count, as the authors' ``Opt.Prepare`` does at the start of every cycle.

Removing a masked unit leaves the network's function unchanged when the activation maps 0 to
0 (ReLU, tanh): the unit's output, ``act(0)``, then contributes nothing to the next layer.

Layers are named by their path in the parameter tree, ``"/"``-separated (``"hidden_0"``,
``"encoder/hidden_1"``); :func:`keep_sets` uses the same names.

Example (a two-hidden-layer MLP, one step, one prune, one shrink, the export)::

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import linen as nn
    >>> from meprop_jax import Dense, mesimp
    >>> class MLP(nn.Module):
    ...     hidden: tuple = (32, 32)
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         for i, size in enumerate(self.hidden):
    ...             layer = Dense(size, k=4, mode="per_example", record=True, name=f"hidden_{i}")
    ...             x = nn.relu(layer(x))
    ...         return Dense(3, name="output")(x)
    >>> x, y = jax.random.normal(jax.random.key(0), (64, 8)), jnp.arange(64) % 3
    >>> variables = MLP().init(jax.random.key(1), x)
    >>> params, record = variables["params"], variables[mesimp.COLLECTION]
    >>> taps = variables[mesimp.TAP_COLLECTION]
    >>> opt = optax.adam(1e-3)
    >>> opt_state = opt.init(params)
    >>> def loss_fn(params, taps, record):
    ...     state = {"params": params, mesimp.COLLECTION: record, mesimp.TAP_COLLECTION: taps}
    ...     logits = MLP().apply(state, x)
    ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> grads, tap_grads = jax.grad(loss_fn, argnums=(0, 1))(params, taps, record)
    >>> record = mesimp.accumulate(record, tap_grads)
    >>> int(record["hidden_0"]["examples"]), int(record["hidden_0"]["hits"].sum())  # 64 * k
    (64, 256)
    >>> record = mesimp.prune(record)  # keeps units in >= floor(0.1 * 64) = 6 examples' top-k
    >>> layers = ["hidden_0", "hidden_1", "output"]
    >>> shrunk = mesimp.shrink(params, opt_state, mesimp.keep_sets(record), layers, record=record)
    >>> shrunk.units, shrunk.widths  # survivors, and the padded widths to rebuild the model with
    ((21, 14), (32, 16))
    >>> smaller = MLP(hidden=shrunk.widths)  # trains on with shrunk.params, .opt_state, .record
    >>> stock_params, sizes = mesimp.export(shrunk.params, mesimp.keep_sets(shrunk.record), layers)
    >>> sizes
    (21, 14)
"""

from meprop_jax._src.taps import RecordTap, record_tap
from meprop_jax.mesimp.record import (
    COLLECTION,
    DEFAULT_THRESHOLD,
    TAP_COLLECTION,
    accumulate,
    keep_sets,
    prune,
    prune_rule,
    reset_moments,
    zero_taps,
)
from meprop_jax.mesimp.shrink import (
    DEFAULT_PAD_TO,
    Shrunk,
    export,
    padded_width,
    shrink,
    shrink_lstm,
)

__all__ = [
    "COLLECTION",
    "DEFAULT_PAD_TO",
    "DEFAULT_THRESHOLD",
    "TAP_COLLECTION",
    "RecordTap",
    "Shrunk",
    "accumulate",
    "export",
    "keep_sets",
    "padded_width",
    "prune",
    "prune_rule",
    "record_tap",
    "reset_moments",
    "shrink",
    "shrink_lstm",
    "zero_taps",
]
