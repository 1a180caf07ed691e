"""The Transformer encoder tagger (``--model transformer``) and its meProp apply function.

Stock Flax layers only: the token embeddings of the LSTM tagger
(:func:`~experiments.tagging.model.embed_tokens`), a dense projection to ``d_model``, learned
position embeddings, ``layers`` pre-LayerNorm encoder blocks and a final LayerNorm before the
dense output layer. Each block is

  x = x + Attention(LayerNorm(x)),   x = x + MLP(LayerNorm(x)),

with ``nn.MultiHeadDotProductAttention`` (``heads`` heads over ``d_model`` features, padded
keys masked out) and an MLP ``d_model -> 4 d_model -> d_model`` with GELU. meProp comes from
:func:`meprop_jax.sparsify` over the stock model (:func:`sparse_apply`): ``k_attn`` for the
attention projections (query, key, value and output), ``k_mlp`` for the two MLP layers; the
input projection and the output layer stay dense, as do the LayerNorms and embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import meprop_jax
from experiments.common import inverted_dropout
from experiments.common.models import EncoderBlock
from experiments.tagging.model import embed_tokens

__all__ = [
    "ATTENTION_LAYERS",
    "MAX_LENGTH",
    "MLP_LAYERS",
    "TransformerTagger",
    "k_patterns",
    "layer_report",
    "sparse_apply",
]

#: Learned positions: sentences (padded) up to this many tokens.
MAX_LENGTH = 512
#: The module paths each of ``--k-attn`` and ``--k-mlp`` applies to (``*`` crosses ``/``).
ATTENTION_LAYERS = "block_*/attention/*"
MLP_LAYERS = "block_*/mlp_*"


class TransformerTagger(nn.Module):
    """Embeddings -> dense to ``d_model`` + positions -> encoder blocks -> LayerNorm -> output.

    Called like :class:`~experiments.tagging.model.Tagger`, so the task, the initialiser and
    ``--predict`` serve both.

    Attributes:
      vocab_size: word vocabulary size (with ``<pad>`` and ``<unk>``).
      feature_sizes: vocabulary size of each feature.
      num_tags: output classes.
      layers: encoder blocks.
      d_model: model width.
      heads: attention heads.
      dropout: inverted-dropout rate on the embeddings and on every block's branches.
      word_dim: word embedding size.
      feature_dim: size of each feature embedding.
      max_length: learned positions (longest padded sentence).
    """

    vocab_size: int
    feature_sizes: tuple[int, ...]
    num_tags: int
    layers: int = 2
    d_model: int = 256
    heads: int = 4
    dropout: float = 0.0
    word_dim: int = 50
    feature_dim: int = 20
    max_length: int = MAX_LENGTH

    @nn.compact
    def __call__(
        self,
        words: jax.Array,
        features: jax.Array,
        lengths: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        """Logits ``[batch, time, num_tags]`` of ``words [batch, time]``, ``features
        [batch, time, F]`` and true ``lengths [batch]`` (positions past a length are padding).

        Raises:
          ValueError: ``time`` above ``max_length``.
        """
        time = words.shape[1]
        if time > self.max_length:
            raise ValueError(
                f"words: padded length {time} exceeds the Transformer's {self.max_length} "
                "learned positions"
            )
        x = embed_tokens(self, words, features)
        if train and self.dropout > 0:
            x = inverted_dropout(x, self.dropout, self.make_rng("dropout"))
        x = nn.Dense(self.d_model, name="input")(x)
        positions = self.param(
            "position_embedding", nn.initializers.normal(0.02), (self.max_length, self.d_model)
        )
        x = x + positions[:time].astype(x.dtype)
        # Keys past a sentence's end are masked out; padded queries still see the real keys,
        # and their outputs are left out of the loss.
        mask = (jnp.arange(time)[None, :] < lengths[:, None])[:, None, None, :]
        for i in range(self.layers):
            block = EncoderBlock(
                self.d_model, self.heads, 4 * self.d_model, self.dropout, name=f"block_{i}"
            )
            x = block(x, mask, train)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(self.num_tags, name="output")(x)


def k_patterns(k_attn: int, k_mlp: int) -> dict[str, int]:
    """``sparsify``'s ``k=`` mapping: attention projections and MLP layers (0 = dense)."""
    return {ATTENTION_LAYERS: k_attn, MLP_LAYERS: k_mlp}


def sparse_apply(model: TransformerTagger, k_attn: int, k_mlp: int, mode: str) -> Callable:
    """``model.apply``, with meProp's backward through :func:`meprop_jax.sparsify` when either
    ``k`` is positive (the forward pass is unchanged)."""
    if not (k_attn or k_mlp):
        return model.apply
    return meprop_jax.sparsify(model.apply, k=k_patterns(k_attn, k_mlp), mode=mode)


def layer_report(apply_fn: Callable, variables: Any, args: tuple) -> list[dict[str, Any]]:
    """What :func:`meprop_jax.sparsify_report` says of every candidate layer of a
    :func:`sparse_apply` function (an empty list for the dense ``model.apply``)."""
    if not hasattr(apply_fn, "meprop_plan"):
        return []
    layers = meprop_jax.sparsify_report(apply_fn, variables, *args)
    return [layer._asdict() for layer in layers]
