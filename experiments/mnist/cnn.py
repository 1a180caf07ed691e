"""``--model cnn``: a small convolutional network with meProp convolutions and an MLP head.

:class:`CNN` is two (``--channels``) 3x3 ``meprop_jax.Conv`` layers, each -> ReLU -> 2x2 max
pooling, then the MLP of :class:`experiments.common.models.MLP` on the flattened feature maps
(``--layers`` meProp hidden ``Dense`` layers of ``--hidden`` units, a dense output layer). In
the backward pass each convolution keeps ``--k-conv`` of its output channels (default:
``--k``; see :func:`meprop_jax.conv`), each hidden ``Dense`` layer ``--k`` of its units, in
the same ``--mode``; ``--k 0`` (and no ``--k-conv``) is ordinary backprop throughout.

Flags of the MLP alone are refused with ``--model cnn``: ``--kdim``, ``--sparse-update``
(a convolution has no column-sparse update), ``--error-feedback`` and ``--mesimp``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn

import meprop_jax
from experiments import loop
from experiments.common.models import MLP

__all__ = ["CNN", "DEFAULT_CHANNELS", "MODELS", "add_cnn_arguments", "check_cnn", "out_tag"]

MODELS = ("mlp", "cnn")
DEFAULT_CHANNELS = (32, 64)
KERNEL_SIZE = (3, 3)
POOL = (2, 2)


class CNN(nn.Module):
    """meProp convolutions, max pooling and a meProp MLP head, on flattened square images.

    Attributes:
      channels: output channels of the convolutions, one 3x3 ``meprop_jax.Conv`` each.
      k_conv: output channels every convolution keeps in the backward pass (0 = dense).
      hidden: sizes of the head's hidden layers.
      k: meProp k of the head's hidden layers (0 = dense).
      mode: ``"unified"``, ``"per_example"`` or ``"random"``, for every meProp layer.
      k_output: meProp k of the output layer (0 = dense).
      dropout: dropout rate after each hidden ReLU of the head.
      num_classes: output size.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = CNN(channels=(4, 8), k_conv=2, hidden=(16,), k=4, num_classes=3)
      >>> x = jnp.ones((2, 64))  # two 8x8 images
      >>> params = jax.jit(lambda x: model.init(jax.random.key(0), x, False))(x)["params"]
      >>> jax.tree.map(jnp.shape, params)["conv_1"]
      {'bias': (8,), 'kernel': (3, 3, 4, 8)}
      >>> jax.jit(lambda p, x: model.apply({"params": p}, x, False))(params, x).shape
      (2, 3)
    """

    channels: Sequence[int] = DEFAULT_CHANNELS
    k_conv: int = 0
    hidden: Sequence[int] = (500,)
    k: int = 0
    mode: str = "unified"
    k_output: int = 0
    dropout: float = 0.0
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x`` ``[batch, side * side]`` (one channel)."""
        side = math.isqrt(x.shape[-1])
        if side * side != x.shape[-1]:
            raise ValueError(f"CNN needs square images, got {x.shape[-1]} pixels per example")
        x = x.reshape(x.shape[0], side, side, 1)
        for i, features in enumerate(self.channels):
            x = meprop_jax.Conv(
                features, KERNEL_SIZE, k=self.k_conv, mode=self.mode, name=f"conv_{i}"
            )(x)
            x = nn.max_pool(nn.relu(x), POOL, strides=POOL)
        head = MLP(
            hidden=self.hidden,
            k=self.k,
            mode=self.mode,
            k_output=self.k_output,
            dropout=self.dropout,
            num_classes=self.num_classes,
            name="head",
        )
        return head(x.reshape(x.shape[0], -1), train)


def _channels_entry(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(
            f"expected output channels per convolution as positive ints, e.g. 32,64; got {text!r}"
        )
    return channels


def add_cnn_arguments(model: Any, meprop: Any) -> None:
    """Adds ``--model`` and ``--channels`` to the ``model`` group (or parser) and
    ``--k-conv`` to the ``meprop`` one."""
    model.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="mlp (the paper's MLP, default) or cnn (meProp convolutions + an MLP head; "
        "see --channels, --k-conv)",
    )
    model.add_argument(
        "--channels",
        type=_channels_entry,
        default=None,
        metavar="C,C",
        help="--model cnn: output channels of its 3x3 convolutions, each followed by 2x2 max "
        f"pooling (default {','.join(map(str, DEFAULT_CHANNELS))})",
    )
    meprop.add_argument(
        "--k-conv",
        type=int,
        default=None,
        help="--model cnn: output channels each convolution keeps in the backward pass "
        "(default: --k; 0 = dense convolutions)",
    )


def check_cnn(args: argparse.Namespace) -> dict[str, Any]:
    """Validates the CNN flags; returns the :class:`~experiments.mnist.task.MnistSettings`
    fields they set (none for ``--model mlp``).

    Raises:
      ConfigError: naming the offending flag.
    """
    check = loop.require
    if args.model != "cnn":
        for flag, value in (("--channels", args.channels), ("--k-conv", args.k_conv)):
            check(value is None, f"{flag} configures --model cnn")
        return {}
    refused = [
        flag
        for flag, given in (
            ("--kdim", args.kdim),
            ("--sparse-update", args.sparse_update),
            ("--error-feedback", args.error_feedback is not None),
            ("--mesimp", args.mesimp),
        )
        if given
    ]
    check(
        not refused,
        f"{refused[0] if refused else ''} is an option of the MLP, not of --model cnn "
        "(its convolutions keep dense kernel gradients and have no memory or record)",
    )
    channels = DEFAULT_CHANNELS if args.channels is None else args.channels
    k_conv = args.k if args.k_conv is None else args.k_conv
    check(k_conv >= 0, f"--k-conv must be >= 0 (0 = dense convolutions), got {k_conv}")
    source = "--k-conv" if args.k_conv is not None else "--k-conv (from --k)"
    check(
        k_conv < min(channels),
        f"{source} {k_conv} must be below every convolution's channels "
        f"(--channels {','.join(map(str, channels))}); 0 = dense convolutions",
    )
    return {"network": "cnn", "channels": tuple(channels), "k_conv": k_conv}


def out_tag(channels: Sequence[int], k_conv: int) -> str:
    """The run folder's name part of a CNN: ``cnn32x64kc8``."""
    return f"cnn{'x'.join(map(str, channels))}kc{k_conv}"
